"""Build a Ray ``TorchTrainer`` from a spec and run the generic loop.

Ray's own config objects (``ScalingConfig``, ``RunConfig``, ``FailureConfig``,
``DataConfig``) are built from the spec rather than re-invented. Checkpoints live under
``<run_dir>/train``; running again with the same run directory resumes from the last
checkpoint (Ray Train restores a run with the same ``RunConfig(name, storage_path)``).

What a kind calls: ``fit`` (returns a :class:`FitResult` with the convergence
``verdict``), ``training_summary`` for the ``training`` block of its metrics.json, and,
in the runner after the artefacts are written, ``check_convergence(spec, verdict)``
(raises ``ConvergenceError``, exit code 3, only with ``train.require_convergence``).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed_hte.spec import JobSpec
from distributed_hte.train.convergence import Verdict, assess_convergence, check_convergence
from distributed_hte.train.loop import BEST_MODEL_FILE, TrainPlugin, train_loop_per_worker

__all__ = ["FitResult", "Verdict", "check_convergence", "fit", "training_summary"]

log = logging.getLogger("distributed_hte.train")

TRAIN_SUBDIR = "train"
# A warm start: ``<run_dir>/init/state.pt``, a state_dict for the kind's freshly built
# model (written by the life cycle from a champion, see ``Kind.warm_start_state``). The
# loop loads it when there is no checkpoint to resume from; a resume ignores it.
INIT_STATE = ("init", "state.pt")


@dataclass(frozen=True)
class FitResult:
    """What the driver gets back from training."""

    best_model_path: Path  # state_dict of the best epoch (by validation loss)
    final_metrics: dict[str, Any]  # metrics of the last reported epoch
    history: list[dict[str, Any]]  # one dict per epoch
    checkpoint_dir: Path
    verdict: Verdict  # convergence verdict on ``history``

    @property
    def converged(self) -> bool:
        """Whether the fit converged (``verdict.converged``)."""
        return self.verdict.converged

    @property
    def convergence_reason(self) -> str:
        """``converged``, ``still_improving``, ``diverged``, ... (``verdict.reason``)."""
        return self.verdict.reason


def warm_started(run_dir: Path) -> bool:
    """Whether the fit in ``run_dir`` starts from a warm-start state (``init/state.pt``)."""
    return Path(run_dir).joinpath(*INIT_STATE).exists()


def scaling_config(spec: JobSpec):
    """Ray ``ScalingConfig`` from the spec's ``scaling`` section."""
    from ray.train import ScalingConfig

    resources = dict(spec.scaling.resources_per_worker or {})
    if not resources:
        resources = {"CPU": 1}
    if spec.scaling.use_gpu:
        resources.setdefault("GPU", 1)
    return ScalingConfig(
        num_workers=spec.scaling.num_workers,
        use_gpu=spec.scaling.use_gpu,
        resources_per_worker=resources,
    )


def fit(
    spec: JobSpec,
    plugin: TrainPlugin,
    datasets: dict[str, Any],
    train_rows: int,
    run_dir: Path,
    callbacks: list | None = None,
) -> FitResult:
    """Train ``plugin``'s model on ``datasets`` ("train", optional "val") with DDP.

    With ``train.shuffle`` every epoch sees a fresh seeded row order; with
    ``train.reproducible`` the same spec, data and seed give the same weights on a
    re-run (``distributed_hte/train/ingest.py`` says what that takes from Ray Data).
    A fit that did not converge logs a WARNING; it raises nothing.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from distributed_hte.train.ingest import ReproducibleDataConfig, shuffle_datasets

    storage = Path(run_dir).resolve()
    init = storage.joinpath(*INIT_STATE)
    datasets = shuffle_datasets(datasets, spec.train)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "plugin": plugin,
            "train": spec.train.model_dump(),
            "train_rows": train_rows // spec.scaling.num_workers,
            "datasets": sorted(datasets),
            "init_state": init.read_bytes() if init.exists() else None,
        },
        scaling_config=scaling_config(spec),
        torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=ReproducibleDataConfig(spec.train.reproducible),
        run_config=RunConfig(
            name=TRAIN_SUBDIR,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            # A dead worker (preempted node, OOM kill) restarts the group from the last
            # epoch's checkpoint; the history in it keeps every epoch exactly once.
            failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
            callbacks=callbacks or None,
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}
            if not spec.scaling.use_gpu
            else None,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    # Copy what the driver needs out of the checkpoint (which may live on remote storage).
    model_dir = storage / "model"
    model_dir.mkdir(exist_ok=True)
    with result.checkpoint.as_directory() as d:
        shutil.copy(Path(d) / BEST_MODEL_FILE, model_dir / BEST_MODEL_FILE)
        final = json.loads((Path(d) / "metrics.json").read_text())
        # Every epoch's metrics, including those before a resume.
        history = json.loads((Path(d) / "history.json").read_text())
    t = spec.train
    verdict = assess_convergence(
        history, epochs=t.epochs, schedule=t.lr_schedule, lr=t.lr, tol=t.convergence_tol
    )
    # A resumed run's last report may predate the verdict fields: the driver's word wins.
    final.update(verdict.as_metrics())
    if not verdict.converged:
        log.warning(
            "[train] WARNING: not converged (%s): %s. Try: %s",
            verdict.reason,
            verdict.message,
            verdict.suggestion,
        )
    return FitResult(
        best_model_path=model_dir / BEST_MODEL_FILE,
        final_metrics=final,
        history=history,
        checkpoint_dir=Path(result.checkpoint.path),
        verdict=verdict,
    )


def training_summary(result: FitResult, fit_seconds: float, num_workers: int) -> dict[str, Any]:
    """The ``training`` block of a kind's metrics.json, the same for every kind.

    Args:
        result: what :func:`fit` returned.
        fit_seconds: wall time of the fit as the kind measured it (driver side).
        num_workers: Ray Train workers (``spec.scaling.num_workers``).
    """
    m, v = result.final_metrics, result.verdict
    return {
        "epochs_run": int(m.get("epoch", 0)),
        "best_epoch": int(m.get("best_epoch", 0)),
        "early_stopped": bool(m.get("early_stopped", False)),
        "stopped_reason": m.get("stopped_reason") or None,
        "best_val_loss": m.get("best_val_loss"),
        "rows_per_s": m.get("rows_per_s"),
        "rows_per_s_per_worker": m.get("rows_per_s_per_worker"),
        "fit_seconds": fit_seconds,
        "num_workers": num_workers,
        "resumed_from_epoch": int(m.get("resumed_from_epoch", 0)),
        "lr": v.lr,
        "final_lr": m.get("lr"),
        "final_lr_factor": v.final_lr_factor,
        "converged": v.converged,
        "convergence_reason": v.reason,
        "convergence_message": v.message,
        "convergence_suggestion": v.suggestion,
        "rel_improvement_per_epoch": v.rel_improvement_per_epoch,
        "grad_snr": v.grad_snr,
        "initial_loss": v.initial_loss,
        "final_loss": v.final_loss,
    }


def cpus_per_worker(spec: JobSpec) -> float:
    """Logical CPUs one Train worker asks for."""
    return float((spec.scaling.resources_per_worker or {}).get("CPU", 1))
