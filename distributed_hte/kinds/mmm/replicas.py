"""Intervals for kind ``mmm``: region-bootstrap replicas, fitted as parallel Ray work.

With ``uncertainty: {replicas: K, level: L}`` the fit stage fits K more models after the
main one. Replica ``k`` trains on a bootstrap sample of the regions (R draws with
replacement, a function of ``uncertainty.seed`` and ``k`` only; a region drawn twice is
two regions, each with its own baseline) through the same Ray Train path as the main fit
(:func:`distributed_hte.train.trainer.fit`, ``uncertainty.workers`` Train workers each),
with the main fit's scalers. Each replica is driven by a Ray task that holds no CPU
itself; at most ``(logical CPUs − DATA_CPUS) // workers`` replicas run at once, so their
Train workers never take the CPUs that Ray Data needs (the deadlock of
``shared/notes/ray_on_small_machines.md``). A replica whose model is already in the run
directory is not fitted again.

The report evaluates every replica's model on the original panel (the media part of the
model needs no region embedding: ``kpi_scale · β · exp(δ) · hill(adstock(x))``), so a
replica's ROI, share and contribution are the same quantities as the point estimate's,
and their percentiles are the interval (:func:`percentile_intervals`).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

REPLICAS_DIR = "replicas"
STATS = ("roi", "share", "contribution")


def bootstrap_regions(n_regions: int, seed: int, replica: int) -> np.ndarray:
    """Region indices ``(R,)`` drawn with replacement; depends on ``(seed, replica)`` only."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(replica)]))
    return rng.integers(0, n_regions, n_regions)


def replica_dir(run_path: Path, replica: int) -> Path:
    """Where replica ``replica`` keeps its Ray Train storage and ``model/best_model.pt``."""
    return Path(run_path) / REPLICAS_DIR / f"r{replica:03d}"


def replica_spec(spec: Any, replica: int) -> Any:
    """The spec a replica trains with: ``uncertainty.workers`` workers, its own seed."""
    u = spec.uncertainty
    return spec.model_copy(
        update={
            "scaling": spec.scaling.model_copy(update={"num_workers": u.workers}),
            "train": spec.train.model_copy(update={"seed": spec.train.seed + 1 + replica}),
            "uncertainty": None,
        }
    )


def replica_rows(prepared: Any, idx: np.ndarray) -> list[dict[str, Any]]:
    """Training samples of the bootstrap panel ``idx`` ``(R,)``, with the main scalers."""
    from distributed_hte.kinds.mmm.data import scaled
    from distributed_hte.kinds.mmm.plugin import region_rows

    inputs = scaled(prepared.panel, prepared.scalers)
    boot = {k: v[idx] for k, v in inputs.items()}
    return region_rows(boot, prepared.panel.fit[idx], prepared.week)


def _fit_one(spec: Any, plugin: Any, rows: list[dict[str, Any]], out: str) -> str:
    """Body of the replica task: one Ray Train fit into ``out``; returns the model path."""
    import ray.data

    from distributed_hte.kinds.mmm import per_worker_batch
    from distributed_hte.train.ingest import configure_ray_data
    from distributed_hte.train.trainer import fit

    configure_ray_data(spec.train)  # a task starts with a default Ray Data context
    passes = spec.train.region_passes
    ds = ray.data.from_items(rows * passes, override_num_blocks=passes).materialize()
    result = fit(per_worker_batch(spec), plugin, {"train": ds}, len(rows) * passes, Path(out))
    return str(result.best_model_path)


def fit_replicas(spec: Any, prepared: Any, plugin: Any, run_path: Path) -> list[Path]:
    """Fit ``spec.uncertainty.replicas`` bootstrap replicas; return their model paths."""
    import ray

    from distributed_hte.runtime import DATA_CPUS
    from distributed_hte.train.trainer import cpus_per_worker

    u = spec.uncertainty
    n_regions = len(prepared.panel.regions)
    per_replica = u.workers * cpus_per_worker(spec)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    at_once = max(1, min(u.replicas, int((cpus - DATA_CPUS) // max(per_replica, 1e-9))))
    task = ray.remote(num_cpus=0, max_retries=0)(_fit_one)
    paths: dict[int, Path] = {}
    todo = []
    for k in range(u.replicas):
        done = replica_dir(run_path, k) / "model" / "best_model.pt"
        if done.exists():
            paths[k] = done
        else:
            todo.append(k)
    log.info(
        "[fit] %d bootstrap replicas (%d already fitted), %d at once, %d worker(s) each",
        u.replicas, u.replicas - len(todo), at_once, u.workers,
    )  # fmt: skip
    t0 = time.perf_counter()
    pending: dict[Any, int] = {}
    while todo or pending:
        while todo and len(pending) < at_once:
            k = todo.pop(0)
            rows = replica_rows(prepared, bootstrap_regions(n_regions, u.seed, k))
            ref = task.remote(replica_spec(spec, k), plugin, rows, str(replica_dir(run_path, k)))
            pending[ref] = k
        ready, _ = ray.wait(list(pending), num_returns=1)
        k = pending.pop(ready[0])
        paths[k] = Path(ray.get(ready[0]))
        log.info("[fit] replica %d done (%d of %d, %.0fs)", k, len(paths), u.replicas,
                 time.perf_counter() - t0)  # fmt: skip
    return [paths[k] for k in range(u.replicas)]


def percentile_intervals(values: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over replicas.

    Args: values ``(K, C)`` one statistic per replica and channel (NaN where undefined);
    level in (0, 1). Returns ``(low, high)``, each ``(C,)``: the ``(1 − level)/2`` and
    ``(1 + level)/2`` quantiles (linear interpolation) of each column.
    """
    a = (1.0 - level) / 2.0
    with warnings.catch_warnings():  # a channel without spend has no ROI: NaN, quietly
        warnings.simplefilter("ignore", RuntimeWarning)
        low = np.nanquantile(values, a, axis=0)
        high = np.nanquantile(values, 1.0 - a, axis=0)
    return low, high
