"""Ray Tune over any spec field, wrapping the same trainer every kind uses.

Each trial is a small Tune function that applies its dotted-path values to the spec
(``train.lr``, ``model.beta_net.dropout`` ...), re-validates it, and runs the kind's
``execute`` into its own run directory under ``<run>/trials/<trial_id>/``. Ray Train
metrics reach Tune per epoch through ``TuneReportCallback``, so ASHA can stop poor
trials early. The sweep writes ``trials.parquet`` / ``trials.csv``, ``best_config.json``,
``tune_summary.json`` and copies the best trial's artefacts into the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

from distributed_hte.evaluation.metrics import flatten_metrics
from distributed_hte.kinds import Kind
from distributed_hte.rundir import COMPLETE, RunDir, write_json
from distributed_hte.runtime import DATA_CPUS
from distributed_hte.spec import JobSpec, TuneSpec, with_overrides

log = logging.getLogger(__name__)

# Artefacts of the best trial promoted to the sweep's run directory.
PROMOTED = ["metrics.json", "fit.json", "model", "plots"]


def param_space(tune_spec: TuneSpec) -> dict[str, Any]:
    """Ray Tune search space keyed by dotted spec path."""
    from ray import tune

    space: dict[str, Any] = {}
    for path, p in tune_spec.params.items():
        if p.grid is not None:
            space[path] = tune.grid_search(list(p.grid))
        elif p.choice is not None:
            space[path] = tune.choice(list(p.choice))
        elif p.uniform is not None:
            space[path] = tune.uniform(*p.uniform)
        elif p.loguniform is not None:
            space[path] = tune.loguniform(*p.loguniform)
        elif p.randint is not None:
            space[path] = tune.randint(p.randint[0], p.randint[1] + 1)
    return space


def check_params(spec: JobSpec) -> None:
    """Fail before any trial starts if a swept path or value does not fit the spec."""
    assert spec.tune is not None
    for path, p in spec.tune.params.items():
        samples = p.grid or p.choice or [v for v in (p.uniform or p.loguniform or p.randint or ())]
        for value in samples:
            with_overrides(spec, {path: value})


def concurrent_trials(spec: JobSpec, cluster: dict[str, float]) -> int:
    """How many trials fit at once: Train workers of each trial plus Ray Data's reserve."""
    assert spec.tune is not None
    per_worker = spec.scaling.resources_per_worker or {"CPU": 1}
    cpu_per_trial = spec.scaling.num_workers * float(per_worker.get("CPU", 1))
    fit = max(int((cluster.get("CPU", 1) - DATA_CPUS) // max(cpu_per_trial, 1e-9)), 1)
    if spec.scaling.use_gpu:
        gpu_per_trial = spec.scaling.num_workers * float(per_worker.get("GPU", 1))
        fit = min(fit, max(int(cluster.get("GPU", 0) // gpu_per_trial), 1))
    wanted = spec.tune.max_concurrent_trials or fit
    return max(min(wanted, fit), 1)


def _trial(
    config: dict[str, Any], kind: Kind, spec: JobSpec, prepared: Any, trials_root: str
) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_spec = with_overrides(spec, config).model_copy(update={"tune": None})
    trial_id = tune.get_context().get_trial_id()
    run = RunDir.open(trial_spec.to_dict(), "", trial_spec.name, str(Path(trials_root) / trial_id))
    t0 = time.perf_counter()
    try:
        metrics = kind.execute(trial_spec, prepared, run, callbacks=[TuneReportCallback()])
    except BaseException as exc:
        run.mark_failed(exc)
        raise
    seconds = time.perf_counter() - t0
    run.mark_complete({"seconds": seconds})
    # Tune reports numbers only; keys match the per-epoch ones (val_loss, val_r2, ...).
    final = {
        k: float(v)
        for k, v in flatten_metrics(metrics, sep="_").items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
    final.update(trial_seconds=seconds, final=1.0)
    tune.report(final)


def run_sweep(kind: Kind, spec: JobSpec, prepared: Any, run: RunDir) -> dict[str, Any]:
    """Run the spec's ``tune`` section; return the best trial's metrics."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    ts = spec.tune
    assert ts is not None
    check_params(spec)
    concurrency = concurrent_trials(spec, ray.cluster_resources())
    trials_root = run.file("trials", ".keep").parent
    if ts.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=kind.report_iterations(spec) + 1,
            grace_period=ts.asha.grace_period,
            reduction_factor=ts.asha.reduction_factor,
        )
    else:
        scheduler = FIFOScheduler()
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial, kind=kind, spec=spec, prepared=prepared, trials_root=str(trials_root)
        ),
        # The trial function only drives the trainer; its workers hold the resources.
        {"cpu": 0.01},
    )
    log.info(
        "[tune] %s search over %s, %d concurrent trial(s)",
        ts.search,
        ", ".join(ts.params),
        concurrency,
    )
    t0 = time.perf_counter()
    tuner = tune.Tuner(
        trainable,
        param_space=param_space(ts),
        tune_config=tune.TuneConfig(
            metric=ts.metric,
            mode=ts.mode,
            num_samples=ts.num_samples,
            scheduler=scheduler,
            search_alg=BasicVariantGenerator(random_state=ts.seed, max_concurrent=concurrency),
            max_concurrent_trials=concurrency,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(run.path), verbose=0),
    )
    grid = tuner.fit()
    wall = time.perf_counter() - t0

    rows = []
    for r in grid:
        trial_id = Path(r.path).name if r.path else ""
        tid = (r.metrics or {}).get("trial_id", trial_id)
        row: dict[str, Any] = {"trial_id": tid}
        row.update({f"config.{k}": v for k, v in (r.config or {}).items()})
        m = r.metrics or {}
        row.update(
            {k: v for k, v in m.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        )
        trial_dir = trials_root / str(tid)
        row["completed"] = bool(m.get("final")) and (trial_dir / COMPLETE).exists()
        row["status"] = (
            "error" if r.error else ("complete" if row["completed"] else "stopped early")
        )
        row["trial_dir"] = str(trial_dir)
        if not row["completed"] and (trial_dir / "status.json").exists():
            # The scheduler killed it mid-training, or it failed: say so in its folder.
            RunDir(trial_dir).set_status("failed" if r.error else "stopped", reason=row["status"])
        rows.append(row)
    import pandas as pd

    table = pd.DataFrame(rows)
    table.to_parquet(run.file("trials.parquet"))
    table.to_csv(run.file("trials.csv"), index=False)

    done = table[table["completed"]] if "completed" in table else table.iloc[0:0]
    if done.empty or ts.metric not in done:
        raise RuntimeError(
            f"no trial completed with metric {ts.metric!r}; see {run.path / 'trials.csv'}"
        )
    best = done.sort_values(ts.metric, ascending=(ts.mode == "min")).iloc[0]
    best_config = {
        k[len("config.") :]: _plain(best[k]) for k in table.columns if k.startswith("config.")
    }
    write_json(
        run.file("best_config.json"),
        {
            "metric": ts.metric,
            "mode": ts.mode,
            "value": float(best[ts.metric]),
            "trial_id": best["trial_id"],
            "config": best_config,
        },
    )
    sum_trials = float(table.get("trial_seconds", pd.Series(dtype=float)).fillna(0).sum())
    summary = {
        "trials": len(table),
        "completed": int(table["completed"].sum()),
        "concurrent_trials": concurrency,
        "wall_seconds": wall,
        "sum_trial_seconds": sum_trials,
        # Time the sweep spends beyond its trials' own time, had they run one after another.
        "overhead_seconds": wall - sum_trials / concurrency,
    }
    write_json(run.file("tune_summary.json"), summary)
    for name in PROMOTED + kind.artefacts:
        src = Path(best["trial_dir"]) / name
        if src.is_dir():
            shutil.copytree(src, run.path / name, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, run.path / name)
    log.info(
        "[tune] best %s=%.6g with %s (%d/%d trials complete, %.0fs)",
        ts.metric,
        best[ts.metric],
        best_config,
        summary["completed"],
        summary["trials"],
        wall,
    )
    kind.after_sweep(spec, run, table)
    metrics = json.loads((run.path / "metrics.json").read_text())
    metrics["tune"] = {"best_config": best_config, **summary}
    write_json(run.file("metrics.json"), metrics)
    return metrics


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v
