"""The production life cycle around one run: registry, data checks, warm start,
champion/challenger. Talks to kinds only through ``evaluate``, ``requirements`` and
``warm_start_state``, so it never learns what a kind is.

Order (the runner calls these):

1. :func:`open_registry` before Ray starts: a registry that cannot be reached is exit 2
   before anything else happens.
2. :func:`before_data` after the kind's metadata checks, before Ray starts (pyarrow
   only): the holdout must select rows; with a champion, the new data must have the
   champion's schema (DataError otherwise) and its shift against the champion's data is
   measured (PSI, standardised mean difference, new id levels); the warm-start source is
   resolved. :func:`before_training` then scores the champion on the holdout (Ray Data),
   before the run directory exists. Any failure: exit 2, nothing written, nothing
   registered.
3. :func:`write_warm_start` once the run directory exists: ``init/state.pt``.
4. :func:`after_fit` once the kind has written its metrics: the run's data profile, an
   MLflow run (spec as params, per-epoch metrics, files as artefacts) and a registered
   version with its lineage; with ``retrain:``, the new version is scored on the same
   holdout rows by the same code, the gate decides, ``promotion.json`` records why, and
   the aliases move (``champion`` only for a converged fit that passes the gate; the
   first converged version becomes champion). A redone run (same run directory and spec)
   finds its version instead of registering a second one.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed_hte.data import drift
from distributed_hte.errors import DataError, SpecError
from distributed_hte.evaluation.metrics import flatten_metrics
from distributed_hte.registry import Registry, Version, git_commit, package_version
from distributed_hte.rundir import RunDir, write_json

log = logging.getLogger(__name__)

PROMOTION_FILE = "promotion.json"
PROFILE_FILE = "data_profile.json"
CHAMPION_ALIAS = "champion"
# Run files logged to MLflow as artefacts (besides plots/ and model/).
_ARTEFACT_SUFFIXES = (".json", ".yaml", ".parquet", ".log")


@dataclass
class Retrain:
    """What the life cycle learned before training."""

    registry: Registry
    model: str
    champion: Version | None = None
    champion_run: Path | None = None
    champion_scores: dict[str, Any] | None = None
    holdout: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] | None = None
    warm_from: Path | None = None


def open_registry(spec) -> Registry | None:
    """The spec's registry, checked reachable (ClusterError, exit 2); None without one."""
    if spec.registry is None:
        return None
    from distributed_hte.kinds import get_kind

    if get_kind(spec.kind).is_study:
        raise SpecError(f"kind {spec.kind!r} is a study with no model: drop the registry section")
    registry = Registry.from_spec(spec)
    log.info("[registry] %s (model %s)", registry.uri, spec.registry.model)
    return registry


def scheduled_run_dir(spec, as_of: str) -> Path:
    """Where the run of schedule tick ``as_of`` goes: the same folder every time it fires."""
    return (Path(spec.outputs.dir).expanduser() / spec.name / f"as-of-{as_of}").resolve()


# ----------------------------------------------------------------------------- before


def _holdout(spec) -> tuple[str, Any, dict[str, Any]]:
    """(data path, RowFilter or None, description); DataError if it selects no rows."""
    import pyarrow.compute as pc

    from distributed_hte.data.schema import open_dataset
    from distributed_hte.kinds.toolkit import RowFilter

    h = spec.retrain.holdout
    if h.path is not None:
        path, rows, expr = str(Path(h.path).expanduser().resolve()), None, None
        desc: dict[str, Any] = {"path": path}
    else:
        path = spec.data.path
        rows = RowFilter(h.column, h.from_, h.to)
        desc = {"path": path, "column": h.column, "from": h.from_, "to": h.to}
        expr = None
        if h.from_ is not None:
            expr = pc.field(h.column) >= h.from_
        if h.to is not None:
            upper = pc.field(h.column) < h.to
            expr = upper if expr is None else expr & upper
    ds = open_dataset(path)
    if rows is not None and h.column not in ds.schema.names:
        raise DataError(
            f"retrain.holdout.column {h.column!r} is not a column of {path} "
            f"(columns: {', '.join(ds.schema.names)})"
        )
    try:
        n = ds.count_rows(filter=expr) if expr is not None else ds.count_rows()
    except Exception as exc:  # noqa: BLE001 - arrow's comparison errors are input errors
        raise DataError(
            f"retrain.holdout cannot select rows of {path} with {desc}: {str(exc)[:200]}"
        ) from exc
    if n == 0:
        raise DataError(
            f"retrain.holdout selects no rows ({desc}); champion and challenger need rows "
            "to be compared on"
        )
    desc["rows"] = n
    return path, rows, desc


def _requirements(kind, spec) -> tuple[list[str], list[str]]:
    reqs = kind.requirements(spec)
    numeric = list(dict.fromkeys(r.name for r in reqs if r.role != "id"))
    ids = list(dict.fromkeys(r.name for r in reqs if r.role == "id"))
    return numeric, ids


def gate_value(scores: dict[str, Any], metric: str) -> float:
    """The gate metric in a kind's evaluate output (``val_``/``holdout_`` prefix optional)."""
    flat = flatten_metrics(scores)
    for key in (metric, metric.removeprefix("val_"), metric.removeprefix("holdout_")):
        if key in flat and isinstance(flat[key], int | float):
            return float(flat[key])
    numeric = sorted(k for k, v in flat.items() if isinstance(v, int | float))
    raise SpecError(
        f"retrain.gate.metric {metric!r} is not a metric the holdout evaluation reports; "
        f"allowed: {', '.join(numeric)}"
    )


def _read_profile(registry: Registry, v: Version, run: Path) -> dict[str, Any]:
    f = run / PROFILE_FILE
    if not f.exists():
        raise DataError(
            f"the champion ({v.name} version {v.version}) has no {PROFILE_FILE} in {run}; "
            "its data cannot be compared with today's"
        )
    return json.loads(f.read_text())


def before_data(spec, kind, registry: Registry) -> Retrain:
    """Checks that need no Ray, so bad input fails in seconds: the holdout selects rows,
    the data has the champion's schema, its shift is measured, the warm-start source is a
    complete run of this kind (and the kind can warm start)."""
    from distributed_hte.kinds.toolkit import load_bundle

    name = spec.registry.model
    lc = Retrain(registry=registry, model=name)
    lc.champion = registry.champion(name)
    if lc.champion is not None:
        if lc.champion.kind and lc.champion.kind != spec.kind:
            raise SpecError(
                f"registry.model {name!r} holds {lc.champion.kind!r} models; this spec is "
                f"{spec.kind!r}: use another registry.model"
            )
        lc.champion_run = registry.local_run(lc.champion)
    if spec.retrain is None:
        return lc
    _, _, lc.holdout = _holdout(spec)
    if lc.champion is not None:
        profile = _read_profile(registry, lc.champion, lc.champion_run)
        lc.checks = drift.compare_with(profile["profile"], profile["schema"], spec.data.path)
        lc.checks["champion_version"] = lc.champion.version
        limit = spec.retrain.max_psi
        if limit is not None and lc.checks["max_psi"] > limit:
            worst = max(lc.checks["numeric"].items(), key=lambda kv: kv[1]["psi"])
            raise DataError(
                f"the data shifted against the champion's: PSI of {worst[0]!r} is "
                f"{worst[1]['psi']:.3f} > retrain.max_psi {limit}; nothing was trained"
            )
    init = spec.retrain.init_from
    if init == CHAMPION_ALIAS:
        if lc.champion_run is None:
            log.info("[warm start] %s has no champion yet: a cold start", name)
        else:
            lc.warm_from = lc.champion_run
    elif init is not None:
        lc.warm_from = Path(init).expanduser().resolve()
        load_bundle(lc.warm_from, spec.kind)  # a complete run of this kind, or exit 2
    if lc.warm_from is not None and kind.warm_start is None:
        kind.warm_start_state(spec, None, None)  # raises: this kind cannot, and says why
    return lc


def before_training(lc: Retrain, spec, kind) -> None:
    """The champion's holdout score (Ray Data), before any training; a gate metric the
    kind does not report fails here rather than after the fit."""
    from distributed_hte.kinds.toolkit import load_bundle

    if spec.retrain is None or lc.champion is None:
        return
    path, rows, _ = _holdout(spec)
    log.info("[retrain] scoring the champion (version %d) on the holdout", lc.champion.version)
    lc.champion_scores = kind.evaluate(load_bundle(lc.champion_run, spec.kind), path, rows)
    gate_value(lc.champion_scores, spec.retrain.gate.metric)


def write_warm_start(lc: Retrain, kind, spec, prepared: Any, run: RunDir) -> None:
    """``<run>/init/state.pt`` from the warm-start source (kept on a resume)."""
    import torch

    from distributed_hte.kinds.toolkit import load_bundle
    from distributed_hte.train.trainer import INIT_STATE

    if lc.warm_from is None:
        return
    target = run.path.joinpath(*INIT_STATE)
    if target.exists():
        return
    state = kind.warm_start_state(spec, prepared, load_bundle(lc.warm_from, spec.kind))
    if state is None:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(".state.pt.tmp")
    torch.save(state, tmp)
    tmp.replace(target)
    write_json(run.file("init", "source.json"), {"run_dir": str(lc.warm_from)})


# ----------------------------------------------------------------------------- after


def _lineage(spec, kind, run: RunDir, metrics: dict[str, Any], as_of: str | None) -> dict:
    from distributed_hte.kinds.toolkit import spec_fingerprint

    fp = drift.data_fingerprint(spec.data.path)
    training = metrics.get("training") or {}
    return {
        "kind": spec.kind,
        "spec_name": spec.name,
        "spec_hash": spec_fingerprint(spec),
        "data_path": fp["path"],
        "data_hash": fp["hash"],
        "data_rows": fp["n_rows"],
        "data_bytes": fp["bytes"],
        "data_files": fp["n_files"],
        "schema_hash": fp["schema_hash"],
        "package_version": package_version(),
        "git_commit": git_commit(),
        "run_dir": str(run.path),
        "converged": bool(training.get("converged", True)),
        "convergence_reason": training.get("convergence_reason") or "converged",
        "as_of": as_of,
    }, fp


def _history(run: RunDir) -> list[dict[str, Any]]:
    f = run.path / "history.parquet"
    if not f.exists():
        return []
    import pandas as pd

    return pd.read_parquet(f).to_dict("records")


def _artefacts(run: RunDir) -> list[Path]:
    out = [
        p
        for p in sorted(run.path.iterdir())
        if p.is_file() and p.suffix in _ARTEFACT_SUFFIXES and not p.name.startswith(".")
    ]
    out += [run.path / d for d in ("plots", "model") if (run.path / d).is_dir()]
    return out


def _register(lc: Retrain, spec, kind, run: RunDir, metrics, as_of) -> Version:
    lineage, fp = _lineage(spec, kind, run, metrics, as_of)
    found = lc.registry.find_run_version(lc.model, run.path, lineage["spec_hash"])
    if found is not None:
        log.info("[registry] %s version %d already holds this run", lc.model, found.version)
        return found
    numeric, ids = _requirements(kind, spec)
    write_json(
        run.file(PROFILE_FILE),
        {
            "schema": drift.schema_of(spec.data.path, numeric + ids),
            "fingerprint": fp,
            "profile": drift.profile_columns(spec.data.path, numeric, ids),
        },
    )
    params = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in _flat(spec.to_dict())}
    scalars = {
        k: float(v)
        for k, v in flatten_metrics(metrics).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    tags = {f"dhte.{k}": str(v) for k, v in lineage.items() if v is not None}
    run_id = lc.registry.log_run(
        lc.model, run.path.name, params, scalars, _history(run), _artefacts(run), run.path, tags
    )
    version = lc.registry.register(
        lc.model,
        run_id,
        lineage,
        f"{spec.name} run {run.path.name}" + (f" as of {as_of}" if as_of else ""),
    )
    log.info("[registry] registered %s version %d (%s)", lc.model, version.version, lc.registry.uri)
    return version


def _flat(tree: dict[str, Any], prefix: str = ""):
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            yield from _flat(v, key)
        else:
            yield key, v


def decide(
    converged: bool,
    reason: str,
    new: float | None,
    old: float | None,
    mode: str,
    min_delta: float,
) -> tuple[bool, str]:
    """The gate: (promote?, why). Never promotes a fit that did not converge."""
    if not converged:
        return False, f"the fit did not converge ({reason}); a non-converged fit is never promoted"
    if old is None:
        return True, "first converged version: no champion to compare with"
    if new is None or not math.isfinite(new):
        return False, "the new model's holdout score is not a number"
    gain = (new - old) if mode == "max" else (old - new)
    better = "higher" if mode == "max" else "lower"
    if not math.isfinite(old) or gain >= min_delta:
        return (
            True,
            f"holdout {new:.6g} vs champion {old:.6g}: {better} by {gain:.3g} >= {min_delta}",
        )
    return False, (
        f"holdout {new:.6g} vs champion {old:.6g}: needs to be {better} by at least "
        f"{min_delta} (found {gain:.3g})"
    )


def after_fit(
    lc: Retrain, spec, kind, run: RunDir, metrics: dict[str, Any], as_of: str | None = None
) -> dict[str, Any]:
    """Register the run; with ``retrain:``, gate it and move the aliases. Returns what
    ``promotion.json`` holds (or the registration alone without ``retrain:``)."""
    from distributed_hte.kinds.toolkit import load_bundle

    version = _register(lc, spec, kind, run, metrics, as_of)
    done = run.path / PROMOTION_FILE
    if done.exists():
        previous = json.loads(done.read_text())
        if previous.get("version") == version.version:
            return previous  # a redone run: the decision was taken and the aliases moved
    training = metrics.get("training") or {}
    converged = bool(training.get("converged", True))
    reason = training.get("convergence_reason") or "converged"
    record: dict[str, Any] = {"model": lc.model, "version": version.version, "converged": converged}
    if spec.retrain is None:
        promote = converged and lc.champion is None
        why = (
            "first converged version"
            if promote
            else "registered; promote it with dhte models promote"
        )
        record.update(promoted=promote, reason=why)
    else:
        gate = spec.retrain.gate
        path, rows, _ = _holdout(spec)
        log.info("[retrain] scoring the new version %d on the holdout", version.version)
        new_scores = kind.evaluate(load_bundle(run.path, spec.kind, False), path, rows)
        new = gate_value(new_scores, gate.metric)
        old = gate_value(lc.champion_scores, gate.metric) if lc.champion_scores else None
        promote, why = decide(converged, reason, new, old, gate.mode, gate.min_delta)
        record.update(
            promoted=promote,
            reason=why,
            gate=gate.model_dump(),
            holdout=lc.holdout,
            challenger={"version": version.version, "score": new, "scores": new_scores},
            champion=None
            if lc.champion is None
            else {"version": lc.champion.version, "score": old, "scores": lc.champion_scores},
            data_checks=lc.checks,
            warm_start=None if lc.warm_from is None else str(lc.warm_from),
        )
        lc.registry.set_version_tags(version, {f"holdout_{gate.metric}": new})
    if record["promoted"]:
        record["previous_champion"] = lc.registry.promote(lc.model, version.version)
        log.info(
            "[retrain] promoted: %s version %d is champion (%s)",
            lc.model,
            version.version,
            record["reason"],
        )
    else:
        if spec.retrain is not None:
            lc.registry.set_challenger(lc.model, version.version)
        log.warning("[retrain] not promoted: %s", record["reason"])
    lc.registry.set_version_tags(version, {"promoted": str(record["promoted"]).lower()})
    if spec.retrain is not None:
        write_json(done, record)
        if version.run_id:
            lc.registry.log_file(version.run_id, done)
    return record
