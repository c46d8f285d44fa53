"""Spec sections of kind ``interference`` (no torch, no Ray: ``dhte validate`` stays light)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distributed_hte.simulate import interference as sim
from distributed_hte.spec import JobSpec, NetSpec, StrictModel


class InterferenceDataSpec(StrictModel):
    """Columns of the long-format input: one row per query × item of its consideration set."""

    path: str | None = None
    query: str = "query_id"
    item: str = "item_id"
    treated: str = "treated"
    exposed: str = "exposed"
    outcome: str = Field("outcome", description="read on the exposed row; ignored elsewhere")
    viewer_features: list[str] = Field(
        default_factory=lambda: list(sim.VIEWER_FEATURES), min_length=1
    )
    item_features: list[str] = Field(default_factory=lambda: list(sim.ITEM_FEATURES), min_length=1)
    item_subgroup: str | None = Field(None, description="effects by the values of this column")
    p_treat: float | None = Field(
        None, gt=0, lt=1, description="the experiment's assignment probability"
    )
    outcome_type: Literal["auto", "continuous", "binary"] = "auto"
    tau_true: str | None = Field(
        None,
        description="true uplift column (default: the simulator's tau_true, simulated data only)",
    )
    mu_true: str | None = Field(
        None,
        description="true mean outcome column (default: the simulator's mu_true, simulated data only)",
    )
    cache: Literal["auto", "always", "never"] = Field(
        "auto",
        description="keep each training worker's queries in its memory after the first epoch "
        "(auto: when the query rows take under 1 GB)",
    )


class InterferenceNetSpec(NetSpec):
    hidden: list[int] = Field(default_factory=lambda: [32, 32])
    activation: Literal["relu", "gelu", "tanh", "silu"] = "silu"


class InterferenceModelSpec(StrictModel):
    choice_net: InterferenceNetSpec = InterferenceNetSpec()
    response_net: InterferenceNetSpec = InterferenceNetSpec()
    pdl_net: InterferenceNetSpec = InterferenceNetSpec(hidden=[64, 64])


class InterferenceEstimateSpec(StrictModel):
    """Cross-fitting and the DB estimator's options."""

    folds: int = Field(3, ge=2, le=20)
    hessian: Literal["auto", "exact", "monte_carlo"] = "auto"
    exact_max_set_size: int = Field(10, ge=1, le=16)
    hessian_draws: int = Field(500, ge=10)
    policy_q: list[float] = Field(default_factory=lambda: [1.0])
    ci_level: float = Field(0.95, gt=0, lt=1)
    batch_queries: int = Field(4096, ge=16, description="queries per estimation task batch")
    seed: int = 0

    @model_validator(mode="after")
    def _q_range(self) -> InterferenceEstimateSpec:
        bad = [q for q in self.policy_q if not 0.0 <= q <= 1.0]
        if bad:
            raise ValueError(f"policy_q values must be in [0, 1]; found {bad}")
        return self


class InterferenceSimulateSpec(StrictModel):
    """Simulated data (see :mod:`distributed_hte.simulate.interference`)."""

    n_queries: int = Field(20_000, ge=10)
    n_items: int = Field(2_000, ge=2)
    set_size: int = Field(5, ge=1)
    set_size_min: int | None = Field(None, ge=1)
    p_treat: float = Field(0.5, gt=0, lt=1)
    outcome: Literal["continuous", "binary"] = "continuous"
    noise_sd: float = Field(1.0, ge=0)
    truth_queries: int = Field(1_000_000, ge=1_000)
    seed: int = 0
    chunk_queries: int = Field(200_000, ge=100)
    out: str | None = Field(
        None, description="output folder (default: <outputs.dir>/data/<name>-<hash>)"
    )

    @model_validator(mode="after")
    def _sizes(self) -> InterferenceSimulateSpec:
        if self.set_size > self.n_items:
            raise ValueError("set_size cannot exceed n_items (sets are drawn without replacement)")
        if self.set_size_min is not None and self.set_size_min > self.set_size:
            raise ValueError("set_size_min cannot exceed set_size")
        return self

    def config(self) -> sim.InterferenceSimConfig:
        return sim.InterferenceSimConfig(**self.model_dump(exclude={"out"}))


class InterferenceSpec(JobSpec):
    kind: Literal["interference"]
    data: InterferenceDataSpec = InterferenceDataSpec()
    model: InterferenceModelSpec = InterferenceModelSpec()
    estimate: InterferenceEstimateSpec = InterferenceEstimateSpec()
    simulate: InterferenceSimulateSpec | None = None

    def check_kind(self) -> None:
        d = self.data
        if d.p_treat is None and self.simulate is None:
            raise ValueError(
                "data.p_treat is required: the experiment's assignment probability, in (0, 1)"
            )
        if (
            d.p_treat is not None
            and self.simulate is not None
            and d.p_treat != self.simulate.p_treat
        ):
            raise ValueError(
                f"data.p_treat ({d.p_treat}) differs from simulate.p_treat ({self.simulate.p_treat})"
            )
        self.check_data_columns(
            [
                d.query,
                d.item,
                d.treated,
                d.exposed,
                d.outcome,
                *d.viewer_features,
                *d.item_features,
            ],
            "query/item/treated/exposed/outcome/features",
        )

    @property
    def p_treat(self) -> float:
        if self.data.p_treat is not None:
            return self.data.p_treat
        assert self.simulate is not None
        return self.simulate.p_treat


SPEC = InterferenceSpec
