"""Convergence verdict on a fit's epoch history. Pure: no ray, no torch.

``assess_convergence(history, ...)`` reads the per-epoch records the training loop
reports (``train_loss``, ``val_loss`` when there is a validation set, ``lr_factor``,
``stopped_reason``, ``initial_loss``) and returns a :class:`Verdict`. Reasons, checked
in this order:

``non_finite``
    The last epoch's loss is NaN or infinite. The loop stops at once.
``diverged``
    Training made the loss far worse: the epoch's mean training loss is over
    ``DIVERGED_VS_INITIAL`` times the untrained model's loss on the first batch, or the
    monitored loss rose in each of the last ``DIVERGED_RISING_EPOCHS`` epochs and is over
    ``DIVERGED_VS_BEST`` times its best. The loop stops at once.
``worse_than_start``
    The best monitored loss of the whole run stayed above ``WORSE_THAN_START`` times the
    starting model's loss: training made the model worse and never recovered (a warm start
    that a too-high LR knocked into a poor region, where the loss then settles).
``stopped_before_decay``
    A cosine run ended before its planned epochs with the LR factor still above
    ``DECAYED_FACTOR``. The loop's own early stopping never does this; an outside stop
    (a Tune scheduler, a hand-edited checkpoint) can.
``too_few_epochs``
    One epoch: there is no trend to judge.
``still_improving``
    The monitored loss fell by more than ``tol`` per epoch (relative) over the last
    ``window`` epochs **and** the last epoch's mean gradient of some parameter tensor stands
    out of its step-to-step noise (``grad_snr`` above ``GRAD_SNR_MOVING``): the weights were still being pushed
    downhill, so more epochs (or a higher LR) would likely still help.
``converged``
    None of the above.

Why the gradient, not the loss alone: on a cosine schedule the loss keeps falling in the
last epochs even at the optimum, because the shrinking LR shrinks SGD's noise around it
(the "annealing drop", 0.3-2.6 % per epoch on the issue-10 warehouse runs that end on the
``feols`` solution). The loss curve of a run that is still far from the optimum looks the
same (its progress also shrinks with the LR), so no rule on the loss curve alone tells them
apart. The gradient does: around an optimum the per-step gradients average out over an
epoch (the mean is within noise, ``grad_snr`` about 1-2: a stationarity test in the spirit
of Pflug's and Yaida's for SGD), while a run that is still descending sees the same
downhill direction step after step (``grad_snr`` far above 1). See :func:`gradient_snr`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from distributed_hte.errors import ConvergenceError
from distributed_hte.train.schedule import DECAYED_FACTOR

if TYPE_CHECKING:
    from distributed_hte.spec import JobSpec

Reason = Literal[
    "converged",
    "still_improving",
    "stopped_before_decay",
    "diverged",
    "worse_than_start",
    "non_finite",
    "too_few_epochs",
]

# Diverged: the mean training loss is this many times the untrained model's loss ...
DIVERGED_VS_INITIAL = 10.0
# ... or the monitored loss rose this many epochs in a row to this many times its best.
DIVERGED_RISING_EPOCHS = 3
DIVERGED_VS_BEST = 2.0
# Worse than the start: the run's best loss is above this many times the starting loss.
WORSE_THAN_START = 1.5
# Epochs over which "still improving" is measured.
WINDOW = 3
# The last epoch's gradient signal-to-noise ratio (the largest over parameter tensors)
# above which the weights count as still moving downhill. Stationary SGD gives about 1-2 per
# tensor (see gradient_snr); i.i.d. noise on a one-number tensor (a bias) exceeds 5 with
# probability 0.025, and Adam's oscillation across a valley pulls the ratio below 1.
# Measured: 0.05-1.4 on runs that end on the optimum; 8 to 7,000 on runs still descending
# (benchmarks/README.md, "Convergence verdict").
GRAD_SNR_MOVING = 5.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a fit converged, why not, and what to try.

    ``rel_improvement_per_epoch`` is the relative fall of the monitored loss per epoch
    over the last ``window`` epochs (positive: still falling). ``grad_snr`` is the last
    epoch's gradient signal-to-noise ratio (:func:`gradient_snr`; None when the loop did not
    measure it). ``final_lr_factor`` is the
    LR multiplier of the last step; ``lr`` the base LR (``train.lr``).
    """

    converged: bool
    reason: Reason
    message: str
    monitored: str
    epochs_run: int
    best_epoch: int
    best_loss: float | None
    final_loss: float | None
    initial_loss: float | None
    rel_improvement_per_epoch: float | None
    grad_snr: float | None
    lr: float
    final_lr_factor: float | None
    suggestion: str

    def as_metrics(self) -> dict[str, Any]:
        """Flat fields for reported metrics: ``converged``, ``convergence_reason``, ..."""
        d = asdict(self)
        return {
            "converged": d.pop("converged"),
            "convergence_reason": d.pop("reason"),
            "convergence_message": d.pop("message"),
            **{f"convergence_{k}": v for k, v in d.items()},
        }


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(float(x))


def monitored_key(history: Sequence[dict[str, Any]]) -> str:
    """The loss early stopping watches: ``val_loss`` when every epoch has one."""
    if history and all("val_loss" in h for h in history):
        return "val_loss"
    return "train_loss"


def divergence(history: Sequence[dict[str, Any]]) -> Literal["non_finite", "diverged"] | None:
    """Whether the run so far has blown up (the loop stops when this is not None)."""
    if not history:
        return None
    key = monitored_key(history)
    last = history[-1]
    if not (_finite(last.get("train_loss")) and _finite(last.get(key))):
        return "non_finite"
    initial = last.get("initial_loss")
    if _finite(initial) and initial > 0 and last["train_loss"] > DIVERGED_VS_INITIAL * initial:
        return "diverged"
    losses = [h[key] for h in history]
    best = min(losses)
    tail = losses[-(DIVERGED_RISING_EPOCHS + 1) :]
    rising = len(tail) == DIVERGED_RISING_EPOCHS + 1 and all(
        b > a for a, b in zip(tail, tail[1:], strict=False)
    )
    if rising and best > 0 and losses[-1] > DIVERGED_VS_BEST * best:
        return "diverged"
    return None


def gradient_snr(grad_sum: np.ndarray, grad_sq_sum: float, steps: int) -> float | None:
    """How far an epoch's mean gradient stands out of its step-to-step noise.

    With ``g_t`` the (all-reduced) gradient of step ``t``, flattened over all parameters,
    ``grad_sum`` = sum of ``g_t`` (shape ``(n_params,)``), ``grad_sq_sum`` = sum of
    ``||g_t||^2`` and ``steps`` = n::

        mean = grad_sum / n
        V    = (grad_sq_sum - n ||mean||^2) / (n - 1)     # trace of the steps' covariance
        snr  = n ||mean||^2 / V

    If the steps' gradients scatter around zero (SGD at stationarity), ``||mean||^2`` is
    about ``V / n`` and the ratio about 1 (up to 2 with the correlation the iterate's own
    noise brings); a consistent downhill direction makes it grow with ``n``. None with
    fewer than two steps or no gradient noise at all.
    """
    if steps < 2:
        return None
    mean_sq = float(np.dot(grad_sum, grad_sum)) / steps**2
    var = (grad_sq_sum - steps * mean_sq) / (steps - 1)
    if not (math.isfinite(var) and var > 0.0):
        return None
    return steps * mean_sq / var


def recent_improvement(losses: Sequence[float], window: int = WINDOW) -> float | None:
    """Relative fall per epoch of ``losses`` over the last ``window`` epochs.

    ``(B - min(L[-w:])) / |B| / w`` where ``B = min(L[:-w])`` is the best before the
    window and ``w = min(window, len - 1)``; zero or negative when the last ``w`` epochs
    brought nothing new. None with fewer than two epochs.
    """
    if len(losses) < 2:
        return None
    w = min(window, len(losses) - 1)
    ref = min(losses[:-w])
    return (ref - min(losses[-w:])) / max(abs(ref), 1e-12) / w


def assess_convergence(
    history: Sequence[dict[str, Any]],
    *,
    epochs: int,
    schedule: str,
    lr: float,
    tol: float = 1e-3,
    window: int = WINDOW,
) -> Verdict:
    """The verdict on a fit from its per-epoch ``history`` (see the module docstring).

    Args:
        history: one dict per epoch, oldest first, as the training loop reports them.
        epochs: the planned number of epochs (``train.epochs``).
        schedule: ``train.lr_schedule``.
        lr: the base learning rate (``train.lr``).
        tol: ``train.convergence_tol``.
        window: epochs over which "still improving" is measured.
    """
    key = monitored_key(history)
    losses = [float(h.get(key, math.nan)) for h in history]
    finite = [x for x in losses if math.isfinite(x)]
    best_loss = min(finite) if finite else None
    best_epoch = int(history[losses.index(best_loss)]["epoch"]) if best_loss is not None else 0
    last = history[-1] if history else {}
    factor = last.get("lr_factor")
    initial = last.get("initial_loss")
    common = {
        "monitored": key,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_loss": best_loss,
        "final_loss": losses[-1] if losses else None,
        "initial_loss": float(initial) if initial is not None else None,
        "lr": lr,
        "final_lr_factor": float(factor) if factor is not None else None,
        "grad_snr": float(last["grad_snr"]) if _finite(last.get("grad_snr")) else None,
    }
    moving = last.get("grad_snr_param") or "the weights"
    lower = f"lower train.lr (e.g. to {lr / 10:g})"

    blown = divergence(history) if history else None
    if blown == "non_finite":
        at = next(
            (int(h["epoch"]) for h, x in zip(history, losses, strict=True) if not math.isfinite(x)),
            common["epochs_run"],
        )
        return Verdict(
            converged=False,
            reason="non_finite",
            message=f"the {key} became NaN/inf at epoch {at} with train.lr={lr:g}; "
            f"training stopped there and the best weights (epoch {best_epoch}) are kept",
            rel_improvement_per_epoch=None,
            suggestion=f"{lower}, or check the data for extreme values",
            **common,
        )
    if blown == "diverged":
        train_loss = float(last["train_loss"])
        if initial and train_loss > DIVERGED_VS_INITIAL * initial:
            what = (
                f"the mean training loss in epoch {last['epoch']} was {train_loss:.4g}, "
                f"{train_loss / initial:.0f}x the untrained model's {initial:.4g}"
            )
        else:
            what = (
                f"the {key} rose {DIVERGED_RISING_EPOCHS} epochs in a row to "
                f"{losses[-1]:.4g}, {losses[-1] / best_loss:.1f}x its best ({best_loss:.4g}, "
                f"epoch {best_epoch})"
            )
        return Verdict(
            converged=False,
            reason="diverged",
            message=f"the loss diverged with train.lr={lr:g}: {what}; training stopped there "
            f"and the best weights (epoch {best_epoch}) are kept",
            rel_improvement_per_epoch=None,
            suggestion=lower,
            **common,
        )
    rel = recent_improvement(finite, window)
    common["rel_improvement_per_epoch"] = rel
    if (
        best_loss is not None
        and _finite(initial)
        and initial > 0
        and best_loss > WORSE_THAN_START * initial
    ):
        return Verdict(
            converged=False,
            reason="worse_than_start",
            message=f"training made the model worse: the best {key} ({best_loss:.4g}, epoch "
            f"{best_epoch}) stayed {best_loss / initial:.1f}x the starting model's loss "
            f"({initial:.4g}) with train.lr={lr:g}",
            suggestion=lower,
            **common,
        )
    if (
        schedule == "cosine"
        and len(history) < epochs
        and factor is not None
        and factor > DECAYED_FACTOR
    ):
        return Verdict(
            converged=False,
            reason="stopped_before_decay",
            message=f"the run stopped at epoch {len(history)} of {epochs} with the LR still at "
            f"{factor:.0%} of train.lr: the cosine schedule had not decayed",
            suggestion="let the run finish its schedule (the loop's early stopping anneals "
            "first; an outside stop such as a Tune scheduler does not)",
            **common,
        )
    if rel is None:
        return Verdict(
            converged=False,
            reason="too_few_epochs",
            message=f"{len(history)} epoch: no trend to judge convergence by",
            suggestion="raise train.epochs",
            **common,
        )
    snr = common["grad_snr"]
    if rel > tol and (snr is None or snr > GRAD_SNR_MOVING):
        return Verdict(
            converged=False,
            reason="still_improving",
            message=f"the {key} still fell by {rel:.2%} per epoch over the last "
            f"{min(window, len(finite) - 1)} epochs (tolerance {tol:.2%}) when the run ended"
            + (
                f", and the last epoch's mean gradient of {moving} was {snr:.3g}x its noise "
                f"level (above {GRAD_SNR_MOVING:g}): it was still moving downhill"
                if snr is not None
                else ""
            ),
            suggestion=f"raise train.epochs (e.g. to {2 * epochs}) or train.lr",
            **common,
        )
    settled = f"the {key} settled at {best_loss:.5g} (best epoch {best_epoch} of {len(history)})"
    if rel > tol:
        # Only reachable with a measured snr at or below the threshold.
        settled += (
            f"; it still fell {rel:.2%} per epoch at the end, but the last epoch's mean "
            f"gradient was within noise ({snr:.3g}x, threshold {GRAD_SNR_MOVING:g}): the "
            "fall is the LR decay shrinking SGD's noise around the optimum"
        )
    return Verdict(
        converged=True,
        reason="converged",
        message=settled,
        suggestion="",
        **common,
    )


def check_convergence(spec: JobSpec, verdict: Verdict) -> None:
    """Raise :class:`ConvergenceError` (exit code 3) when the spec requires convergence.

    The runner calls this after the run's artefacts are written: a run that did not
    converge keeps its outputs and fails only when ``train.require_convergence`` is set.
    """
    if verdict.converged or not spec.train.require_convergence:
        return
    raise ConvergenceError(
        f"the fit did not converge ({verdict.reason}): {verdict.message}. "
        f"Try: {verdict.suggestion}. The run's outputs are kept; "
        "set train.require_convergence=false to accept it."
    )
