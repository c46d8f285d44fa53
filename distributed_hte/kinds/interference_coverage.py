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
from typing import Any, Literal

import pandas as pd
from pydantic import Field

from distributed_hte.errors import RunDirError, SpecError
from distributed_hte.kinds import Kind
from distributed_hte.models.interference import NetConfig
from distributed_hte.rundir import RunDir, write_json
from distributed_hte.spec import JobSpec, StrictModel
from distributed_hte.studies import interference_coverage as study

log = logging.getLogger(__name__)


class StudyNetSpec(StrictModel):
    hidden: list[int] = Field(default_factory=lambda: [16, 16])
    activation: Literal["relu", "gelu", "tanh", "silu"] = "silu"

    def config(self) -> NetConfig:
        return NetConfig(tuple(self.hidden), self.activation)


class StudySpec(StrictModel):
    """The scenarios, the replications and how each replication fits its nets."""

    set_sizes: list[int] = Field(default_factory=lambda: [3, 8], min_length=1)
    replications: int = Field(100, ge=2)
    n_queries: int = Field(4_000, ge=100)
    n_items: int = Field(1_000, ge=10)
    p_treat: float = Field(0.5, gt=0, lt=1)
    noise_sd: float = Field(1.0, ge=0)
    pool_seed: int = 0
    folds: int = Field(3, ge=2)
    steps: int = Field(300, ge=1, description="full-batch Adam steps per replication")
    lr: float = Field(0.02, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    choice_net: StudyNetSpec = StudyNetSpec()
    response_net: StudyNetSpec = StudyNetSpec()
    pdl_net: StudyNetSpec = StudyNetSpec(hidden=[32, 32])
    hessian: Literal["auto", "exact", "monte_carlo"] = "auto"
    hessian_draws: int = Field(500, ge=10)
    truth_queries: int = Field(2_000_000, ge=10_000)
    ci_level: float = Field(0.95, gt=0, lt=1)
    cpus_per_task: float = Field(1.0, gt=0)
    gpus_per_task: float = Field(0.25, gt=0, le=1, description="with scaling.use_gpu")


class CoverageTargets(StrictModel):
    """What the study must show (the issue's targets)."""

    db_bias_max_se: float = 2.0
    db_coverage: tuple[float, float] = (0.90, 0.99)
    db_se_ratio: tuple[float, float] = (0.85, 1.2)
    dim_bias_min_se: float = 5.0


class InterferenceCoverageSpec(JobSpec):
    kind: Literal["interference_coverage"]
    study: StudySpec = StudySpec()
    targets: CoverageTargets = CoverageTargets()

    def replication_config(self, k: int) -> study.ReplicationConfig:
        s = self.study
        return study.ReplicationConfig(
            set_size=k,
            n_queries=s.n_queries,
            n_items=s.n_items,
            p_treat=s.p_treat,
            noise_sd=s.noise_sd,
            pool_seed=s.pool_seed,
            fit=study.FitConfig(
                choice=s.choice_net.config(),
                response=s.response_net.config(),
                pdl=s.pdl_net.config(),
                steps=s.steps,
                lr=s.lr,
                weight_decay=s.weight_decay,
                folds=s.folds,
            ),
            hessian=s.hessian,
            hessian_draws=s.hessian_draws,
        )


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


def _replicate(cfg: study.ReplicationConfig, rep: int, device: str) -> dict[str, Any]:
    return study.run_replication(cfg, rep, device=device)


def _true_gte(cfg: study.ReplicationConfig, n: int) -> dict[str, Any]:
    return study.true_gte(cfg, n)


class InterferenceCoverageKind(Kind):
    name = "interference_coverage"
    spec_class = InterferenceCoverageSpec
    artefacts = ["coverage.parquet", "coverage.csv", "coverage.json", "replications.parquet"]

    def report_iterations(self, spec: JobSpec) -> int:
        return 1

    def check(self, spec: InterferenceCoverageSpec) -> None:
        return None  # the study simulates its own data

    def prepare(self, spec: InterferenceCoverageSpec) -> None:
        if spec.tune is not None:
            raise SpecError("interference_coverage does not take a tune section")
        return None

    def execute(
        self, spec: InterferenceCoverageSpec, prepared: Any, run: RunDir, callbacks=None
    ) -> dict[str, Any]:
        import ray

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
        self._plot(table, run)
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

    def _plot(self, table: pd.DataFrame, run: RunDir) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sizes = sorted(table.set_size.unique())
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        names = list(study.ESTIMATORS)
        for j, k in enumerate(sizes):
            part = table[table.set_size == k].set_index("estimator").loc[names]
            off = (j - (len(sizes) - 1) / 2) * 0.25
            y = [i + off for i in range(len(names))]
            axes[0].errorbar(
                part.bias, y, xerr=2 * part.bias_se, fmt="o", capsize=3, label=f"K = {k}"
            )
            axes[1].plot(part.coverage, y, "o", label=f"K = {k}")
        axes[0].axvline(0, color="k", lw=0.8)
        axes[0].set_xscale("symlog", linthresh=0.01)
        axes[0].set_xlabel("mean bias ± 2 SE (symlog)")
        axes[1].axvline(0.95, color="C3", ls="--", lw=1)
        axes[1].axvspan(0.90, 0.99, color="C2", alpha=0.1)
        axes[1].set_xlabel("coverage of the 95% interval")
        for ax in axes:
            ax.set_yticks(range(len(names)), names)
            ax.invert_yaxis()
            ax.legend(loc="lower right", fontsize=8)
        fig.suptitle("interference estimators: Monte Carlo study")
        fig.tight_layout()
        fig.savefig(run.file("plots", "coverage.png"), dpi=110)
        plt.close(fig)

    def predict(self, run_dir: Path, data_path: str, out_path: Path) -> dict[str, Any]:
        raise RunDirError(
            f"{run_dir} is a coverage study: it has no model to predict with "
            "(predict with a run of kind interference)"
        )


def format_coverage(table: pd.DataFrame) -> str:
    """The coverage table as fixed-width text (the run log and the benchmarks README)."""
    lines = [
        f"{'K':>2} {'estimator':<8} {'bias':>9} {'(se)':>9} {'MC SD':>8} {'mean SE':>8} "
        f"{'SE/SD':>6} {'cover':>6}"
    ]
    for _, r in table.iterrows():
        lines.append(
            f"{int(r.set_size):>2} {r.estimator:<8} {r.bias:>9.4f} ({r.bias_se:>7.4f}) "
            f"{r.mc_sd:>8.4f} {r.mean_se:>8.4f} {r.se_ratio:>6.2f} {r.coverage:>6.2f}"
        )
    return "\n".join(lines)
