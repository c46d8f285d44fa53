"""Spec sections of the ``interference_coverage`` study (no torch, no Ray)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from distributed_hte.spec import JobSpec, NetSpec, StrictModel


class StudyNetSpec(NetSpec):
    hidden: list[int] = Field(default_factory=lambda: [16, 16])
    activation: Literal["relu", "gelu", "tanh", "silu"] = "silu"


class NoTrainSpec(StrictModel):
    """The study fits its nets with ``study.steps`` and ``study.lr``: ``train:`` takes nothing."""

    log_every_s: float = Field(30.0, gt=0)


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
    train: NoTrainSpec = NoTrainSpec()
    study: StudySpec = StudySpec()
    targets: CoverageTargets = CoverageTargets()

    def replication_config(self, k: int):
        from distributed_hte.studies import interference_coverage as study

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


SPEC = InterferenceCoverageSpec
