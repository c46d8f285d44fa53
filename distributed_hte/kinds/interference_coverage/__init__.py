"""Kind ``interference_coverage``: the Monte Carlo coverage study of the paper's table.

``dhte run jobs/interference_coverage.yaml`` runs R replications per set size K as
parallel Ray tasks (each simulates an experiment, cross-fits the nets in plain PyTorch
and computes every estimator), then writes:

* ``replications.parquet`` — one row per replication (estimates, SEs, timings);
* ``coverage.parquet`` / ``coverage.csv`` / ``coverage.json`` — the table: mean bias
  (its SE), Monte Carlo SD, mean estimated SE, SE ratio and 95% coverage per estimator
  and K, with the targets checked;
* ``plots/coverage.png`` — bias ± 2 SE and coverage per estimator;
* ``metrics.json`` — the DB rows and the target checks (printed as the run summary).

The study lives in :mod:`distributed_hte.studies.interference_coverage`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd

from distributed_hte.errors import RunDirError, SpecError
from distributed_hte.kinds import Kind
from distributed_hte.kinds.interference_coverage.spec import (
    CoverageTargets,
    InterferenceCoverageSpec,
)
from distributed_hte.rundir import RunDir, write_json
from distributed_hte.spec import JobSpec

log = logging.getLogger(__name__)


def check_targets(table: pd.DataFrame, t: CoverageTargets) -> dict[str, Any]:
    """Per set size: each target with its value and whether it is met."""
    out: dict[str, Any] = {}
    for k, part in table.groupby("set_size"):
        rows = part.set_index("estimator")
        db = rows.loc["DB"]
        checks = {
            "DB_abs_bias_over_se": {
                "value": abs(db.bias) / db.bias_se,
                "target": f"<= {t.db_bias_max_se}",
                "met": bool(abs(db.bias) <= t.db_bias_max_se * db.bias_se),
            },
            "DB_coverage": {
                "value": db.coverage,
                "target": f"in [{t.db_coverage[0]}, {t.db_coverage[1]}]",
                "met": bool(t.db_coverage[0] <= db.coverage <= t.db_coverage[1]),
            },
            "DB_se_ratio": {
                "value": db.se_ratio,
                "target": f"in [{t.db_se_ratio[0]}, {t.db_se_ratio[1]}]",
                "met": bool(t.db_se_ratio[0] <= db.se_ratio <= t.db_se_ratio[1]),
            },
        }
        for name in ("HT_DIM", "HA_DIM"):
            r = rows.loc[name]
            checks[f"{name}_abs_bias_over_se"] = {
                "value": abs(r.bias) / r.bias_se,
                "target": f"> {t.dim_bias_min_se}",
                "met": bool(abs(r.bias) > t.dim_bias_min_se * r.bias_se),
            }
        out[f"K={int(k)}"] = checks
    out["all_met"] = all(
        c["met"] for key, checks in out.items() if key.startswith("K=") for c in checks.values()
    )
    return out


def _replicate(cfg, rep: int, device: str) -> dict[str, Any]:
    from distributed_hte.studies import interference_coverage as study

    return study.run_replication(cfg, rep, device=device)


def _true_gte(cfg, n: int) -> dict[str, Any]:
    from distributed_hte.studies import interference_coverage as study

    return study.true_gte(cfg, n)


class InterferenceCoverageKind(Kind):
    name = "interference_coverage"
    cannot_warm_start = "a coverage study fits fresh models on every replication by design"
    spec_class = InterferenceCoverageSpec
    artefacts = ["coverage.parquet", "coverage.csv", "coverage.json", "replications.parquet"]

    is_study = True

    def report_iterations(self, spec: JobSpec) -> int:
        return 1

    def check(self, spec: InterferenceCoverageSpec) -> None:
        return None  # the study simulates its own data

    def prepare(self, spec: InterferenceCoverageSpec) -> None:
        if spec.tune is not None:
            raise SpecError("interference_coverage does not take a tune section")
        return None

    # A study has no model: it runs its replications in one step.
    def fit(self, spec, prepared, run, callbacks=None) -> None:
        raise SpecError("interference_coverage is a study: it has no model to fit")

    def evaluate(self, bundle, data_path: str, rows=None) -> dict[str, Any]:
        raise SpecError("interference_coverage is a study: it has no model to evaluate")

    def report(self, spec, prepared, run, bundle) -> dict[str, Any]:
        raise SpecError("interference_coverage is a study: it has no model to report on")

    def execute(
        self, spec: InterferenceCoverageSpec, prepared: Any, run: RunDir, callbacks=None
    ) -> dict[str, Any]:
        import ray

        from distributed_hte.kinds.interference_coverage.report import (
            format_coverage,
            plot_coverage,
        )
        from distributed_hte.studies import interference_coverage as study

        s = spec.study
        use_gpu = spec.scaling.use_gpu
        resources: dict[str, Any] = {"num_cpus": s.cpus_per_task}
        if use_gpu:
            resources["num_gpus"] = s.gpus_per_task
        replicate = ray.remote(**resources)(_replicate)
        truth_task = ray.remote(num_cpus=1)(_true_gte)
        device = "cuda" if use_gpu else "cpu"
        t0 = time.perf_counter()
        configs = {k: spec.replication_config(k) for k in s.set_sizes}
        truth_refs = {k: truth_task.remote(cfg, s.truth_queries) for k, cfg in configs.items()}
        pending = [
            replicate.remote(cfg, rep, device)
            for rep in range(s.replications)
            for cfg in configs.values()
        ]
        total = len(pending)
        rows: list[dict[str, Any]] = []
        last = time.perf_counter()
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            rows.append(ray.get(done[0]))
            if time.perf_counter() - last > 30 or not pending:
                last = time.perf_counter()
                elapsed = last - t0
                log.info(
                    "[study] %d/%d replications, %.0fs elapsed, ETA %.0fs",
                    len(rows), total, elapsed, elapsed / len(rows) * (total - len(rows)),
                )  # fmt: skip
        truth = {k: ray.get(ref) for k, ref in truth_refs.items()}
        replications = pd.DataFrame(rows).sort_values(["set_size", "rep"], ignore_index=True)
        replications.to_parquet(run.file("replications.parquet"))
        table = study.summarise(
            replications, {k: v["gte"]["value"] for k, v in truth.items()}, s.ci_level
        )
        table.to_parquet(run.file("coverage.parquet"))
        table.to_csv(run.file("coverage.csv"), index=False, float_format="%.6g")
        targets = check_targets(table, spec.targets)
        write_json(
            run.file("coverage.json"),
            {
                "table": table.to_dict(orient="records"),
                "truth": {f"K={k}": v for k, v in truth.items()},
                "targets": targets,
                "seconds": time.perf_counter() - t0,
                "mean_replication_seconds": float(replications["seconds"].mean()),
            },
        )
        log.info("[study] coverage table\n%s", format_coverage(table))
        log.info("[study] targets met: %s", targets["all_met"])
        plot_coverage(table, run)
        metrics: dict[str, Any] = {"targets_met": targets["all_met"], "study": {}}
        for _, r in table[table.estimator == "DB"].iterrows():
            metrics["study"][f"K={int(r.set_size)}"] = {
                "replications": int(r.replications),
                "true_gte": r.true_gte,
                "DB_bias": r.bias,
                "DB_bias_se": r.bias_se,
                "DB_mc_sd": r.mc_sd,
                "DB_mean_se": r.mean_se,
                "DB_coverage": r.coverage,
            }
        metrics["seconds"] = time.perf_counter() - t0
        metrics["mean_replication_seconds"] = float(replications["seconds"].mean())
        write_json(run.file("metrics.json"), metrics)
        return metrics

    def predict(self, run_dir: Path, data_path: str, out_path: Path) -> dict[str, Any]:
        raise RunDirError(
            f"{run_dir} is a coverage study: it has no model to predict with "
            "(predict with a run of kind interference)"
        )


KIND = InterferenceCoverageKind
__all__ = ["KIND", "CoverageTargets", "check_targets"]
