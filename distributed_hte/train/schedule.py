"""LR schedule and the early-stopping rule that respects it. Pure: no ray, no torch.

The rule (``early_stopping_action``), for ``lr_schedule: cosine``:

1. An epoch *improves* when the monitored loss (``val_loss``, else ``train_loss``) is
   below the best so far; the best epoch's weights are what the run keeps.
2. After ``patience`` epochs without improvement, the run stops only if the LR factor
   has already decayed to ``DECAYED_FACTOR`` (5% of the base LR) or below.
3. Otherwise the plateau starts a compressed decay, once per run: from the current
   factor, a cosine down to the schedule's floor ``FINAL_FACTOR`` over ``patience``
   epochs (or what is left of the run), and the patience count restarts. Once the decay
   has reached the floor, ``patience`` more epochs without improvement stop the run.

So an early stop never happens before the LR has decayed, and a plateau costs about
``2 × patience`` epochs instead of the whole remaining schedule. The plateau that stopped
runs at epoch 5 of 20 (issue 10) now anneals first: the low-LR epochs are where the
cosine schedule earns its last digits of validation loss.

For ``lr_schedule: constant`` the user asked for no decay, so none is added: the run
stops after ``patience`` epochs without improvement (classic early stopping, best weights
kept), and the convergence verdict does not count that as stopping too early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# The cosine schedule ends at 1% of the base LR.
FINAL_FACTOR = 0.01
# At or below this factor the schedule counts as decayed: early stopping may end the run.
DECAYED_FACTOR = 0.05

Schedule = Literal["cosine", "constant"]
StopAction = Literal["continue", "anneal", "stop"]


def lr_factor(step: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base LR at ``step``: cosine decay to ``FINAL_FACTOR`` or constant."""
    if schedule == "constant" or total_steps <= 0:
        return 1.0
    progress = min(step / total_steps, 1.0)
    return FINAL_FACTOR + (1.0 - FINAL_FACTOR) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True, slots=True)
class Anneal:
    """A compressed cosine decay started by a plateau.

    ``start_factor`` at ``start_step`` down to ``FINAL_FACTOR`` at ``start_step + steps``.
    """

    start_step: int
    steps: int
    start_factor: float


def anneal_factor(step: int, anneal: Anneal) -> float:
    """LR factor of the compressed decay at ``step`` (``FINAL_FACTOR`` after its end)."""
    progress = min(max(step - anneal.start_step, 0) / max(anneal.steps, 1), 1.0)
    span = anneal.start_factor - FINAL_FACTOR
    return FINAL_FACTOR + span * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduled_factor(step: int, total_steps: int, schedule: str, anneal: Anneal | None) -> float:
    """The LR factor the loop uses: the schedule, or the compressed decay once started.

    The decay never raises the LR above where the plain schedule would be.
    """
    base = lr_factor(step, total_steps, schedule)
    if anneal is None or step < anneal.start_step:
        return base
    return min(base, anneal_factor(step, anneal))


def start_anneal(
    step: int, total_steps: int, steps_per_epoch: int, patience: int, factor: float
) -> Anneal:
    """The compressed decay a plateau at ``step`` starts: ``patience`` epochs or what is left."""
    steps = max(min(patience * steps_per_epoch, total_steps - step), 1)
    return Anneal(start_step=step, steps=steps, start_factor=factor)


def early_stopping_action(
    bad_epochs: int,
    patience: int | None,
    schedule: str,
    factor: float,
    annealing: bool,
) -> StopAction:
    """What the loop does after an epoch (see the module docstring for the rule).

    Args:
        bad_epochs: epochs since the monitored loss last improved.
        patience: ``train.early_stopping_patience`` (None: never stop early).
        schedule: ``train.lr_schedule``.
        factor: the LR factor of the epoch's last step.
        annealing: a compressed decay has already started in this run.
    """
    if patience is None or bad_epochs < patience:
        return "continue"
    if schedule == "constant" or factor <= DECAYED_FACTOR:
        return "stop"
    # A plateau at a high LR: decay first (once); while decaying, keep going.
    return "continue" if annealing else "anneal"
