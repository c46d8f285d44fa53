"""Run the stages a spec asks for into one run directory.

simulate (optional) → prepare (data checks; before anything is written) → fit, or a
Tune sweep of fits → estimate → report. The run directory is marked complete only when
every stage succeeded; any failure marks it failed and re-raises.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from distributed_hte.errors import ConvergenceError
from distributed_hte.evaluation.metrics import flatten_metrics
from distributed_hte.kinds import get_kind
from distributed_hte.rundir import COMPLETE, RunDir
from distributed_hte.runtime import RayTarget, embedded_num_cpus, init_ray, resolve_target
from distributed_hte.spec import JobSpec, validate_spec
from distributed_hte.train.ingest import configure_ray_data

log = logging.getLogger(__name__)


def ray_target_for(spec: JobSpec, cli_address: str | None = None) -> RayTarget:
    """The Ray a spec runs on, with an embedded Ray sized for its workers (and trials)."""
    trials = 1
    if spec.tune is not None:
        trials = spec.tune.max_concurrent_trials or 1
    cpw = float((spec.scaling.resources_per_worker or {}).get("CPU", 1))
    workers = spec.scaling.num_workers
    uncertainty = getattr(spec, "uncertainty", None)
    if uncertainty is not None:  # bootstrap replicas (mmm): room for two side by side
        workers = max(workers, min(uncertainty.replicas, 2) * uncertainty.workers)
    num_cpus = spec.runtime.num_cpus or embedded_num_cpus(workers, cpw, trials)
    return resolve_target(cli_address, spec.runtime.address, num_cpus, spec.runtime.object_store_gb)


def with_simulated_data(spec: JobSpec, progress: bool = True) -> JobSpec:
    """Run the simulate stage if the spec has one; return the spec pointing at its data.

    A local ``data.path`` is made absolute: Ray workers and Tune trials run elsewhere.
    """
    kind = get_kind(spec.kind)
    raw = spec.to_dict()
    if getattr(spec, "simulate", None) is not None:
        raw["data"]["path"] = str(kind.simulate(spec, progress=progress))
    path = raw.get("data", {}).get("path")
    if path and "://" not in path:
        raw["data"]["path"] = str(Path(path).expanduser().resolve())
    return validate_spec(raw, source="(resolved spec)")


def run_job(
    spec: JobSpec,
    run_dir: str | None = None,
    address: str | None = None,
    as_of: str | None = None,
) -> Path:
    """Execute ``spec`` end to end; return the complete run directory.

    ``as_of`` (a schedule tick; ``{as_of}`` is already filled in the spec): the run goes to
    ``<outputs.dir>/<name>/as-of-<as_of>`` unless ``run_dir`` says otherwise, and a tick
    whose run is complete returns it without training again.
    """
    from distributed_hte import lifecycle

    kind = get_kind(spec.kind)
    if as_of is not None and not run_dir:
        run_dir = str(lifecycle.scheduled_run_dir(spec, as_of))
    if as_of is not None and (Path(run_dir) / COMPLETE).exists():
        return finished_tick(spec, Path(run_dir), as_of)
    if run_dir:
        RunDir.check_reusable(run_dir)  # before any work: a complete run is never redone
    registry = lifecycle.open_registry(spec)  # unreachable: exit 2 before Ray starts
    retrain = None
    if getattr(spec, "simulate", None) is None:
        kind.check(spec)  # metadata checks first: bad data fails before Ray starts
        if registry is not None:  # holdout, schema and shift against the champion
            retrain = lifecycle.before_data(spec, kind, registry)
    init_ray(ray_target_for(spec, address), spec.runtime.runtime_env)
    if getattr(spec.train, "reproducible", False):
        configure_ray_data(spec.train)  # before any read: reproducible shards and orders
    t0 = time.perf_counter()
    spec = with_simulated_data(spec)
    prepared = kind.prepare(spec)  # bad data fails here, before the run directory exists
    if registry is not None:
        if retrain is None:  # simulated data: checked now that it exists
            retrain = lifecycle.before_data(spec, kind, registry)
        lifecycle.before_training(retrain, spec, kind)  # the champion's holdout score
    run = RunDir.open(spec.to_dict(), spec.outputs.dir, spec.name, run_dir)
    run.attach_log()
    log.info("[run] %s (%s) → %s", spec.name, spec.kind, run.path)
    try:
        if retrain is not None:
            lifecycle.write_warm_start(retrain, kind, spec, prepared, run)
        if spec.tune is not None:
            from distributed_hte.tune.sweep import run_sweep

            metrics = run_sweep(kind, spec, prepared, run)
        else:
            metrics = kind.execute(spec, prepared, run)
        check_verdict(spec, metrics)  # after the artefacts: a failed verdict loses nothing
        promotion = None
        if retrain is not None:
            promotion = lifecycle.after_fit(retrain, spec, kind, run, metrics, as_of)
        summary = {
            "seconds": round(time.perf_counter() - t0, 2),
            "kind": spec.kind,
            "name": spec.name,
        }
        if promotion is not None:
            summary["registered"] = {
                k: promotion.get(k) for k in ("model", "version", "promoted", "reason")
            }
        run.mark_complete(summary)
        print_summary(spec, metrics, run.path)
        if promotion is not None:
            print_promotion(promotion)
        return run.path
    except BaseException as exc:
        run.mark_failed(exc)
        log.error(
            "[run] failed: %s: %s (run directory marked failed: %s)",
            type(exc).__name__,
            exc,
            run.path,
        )
        raise
    finally:
        run.detach_log()


def finished_tick(spec: JobSpec, path: Path, as_of: str) -> Path:
    """A schedule tick whose run is complete: say so, train nothing, return its run."""
    done = json.loads((path / COMPLETE).read_text() or "{}")
    registered = done.get("registered")
    log.info(
        "[run] as of %s: %s is complete; not training again%s",
        as_of,
        path,
        f" ({registered['model']} version {registered['version']})" if registered else "",
    )
    if registered:
        print(
            f"already done: {registered['model']} version {registered['version']} "
            f"({'promoted' if registered['promoted'] else 'not promoted'})",
            flush=True,
        )
    return path


def print_promotion(promotion: dict[str, Any]) -> None:
    """One line on stdout: what the registry now says about this run."""
    head = f"{promotion['model']} version {promotion['version']}"
    if promotion["promoted"]:
        print(f"promoted: {head} is champion ({promotion['reason']})", flush=True)
    else:
        print(f"not promoted: {head}: {promotion['reason']}", flush=True)


def check_verdict(spec: JobSpec, metrics: dict[str, Any]) -> None:
    """Warn when the fit did not converge; raise ConvergenceError if the spec requires it."""
    training = metrics.get("training") or {}
    if training.get("converged", True):
        return
    reason = training.get("convergence_reason")
    message = training.get("convergence_message") or reason
    suggestion = training.get("convergence_suggestion")
    log.warning(
        "[run] WARNING: the fit did not converge (%s): %s%s",
        reason,
        message,
        f"; try: {suggestion}" if suggestion else "",
    )
    if getattr(spec.train, "require_convergence", False):
        raise ConvergenceError(
            f"the fit did not converge ({reason}): {message}"
            + (f". Try: {suggestion}" if suggestion else "")
            + ". The run's outputs are kept; set train.require_convergence=false to accept it"
        )


def print_summary(spec: JobSpec, metrics: dict[str, Any], path: Path) -> None:
    """A readable result summary on stdout (the CLI prints the run directory after it)."""
    flat = flatten_metrics(metrics)
    width = max((len(k) for k in flat), default=10)
    lines = [f"== {spec.name} ({spec.kind}) result =="]
    for k, v in flat.items():
        shown = (
            f"{v:.6g}" if isinstance(v, float) else json.dumps(v) if not isinstance(v, str) else v
        )
        lines.append(f"  {k:<{width}}  {shown}")
    lines.append(f"  {'run directory':<{width}}  {path}")
    print("\n".join(lines), flush=True)
