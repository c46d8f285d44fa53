"""Spec sections of kind ``segments`` (no torch, no Ray: ``dhte validate`` stays light)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distributed_hte.simulate import segments as sim
from distributed_hte.spec import JobSpec, StrictModel


class SolverTrainSpec(StrictModel):
    """What an exact solver takes of ``train:``: nothing of SGD (no lr, epochs, batches)."""

    log_every_s: float = Field(10.0, gt=0)


class SegmentsDataSpec(StrictModel):
    """Columns of the input parquet: one row per person. Defaults match the simulator."""

    path: str | None = None
    segment: str = "segment"
    creative: str = "creative"
    creative_scope: Literal["global", "segment"] = Field(
        "global",
        description="creative ids are unique across segments (global) or only within one",
    )
    label: str = "y"
    features: list[str] | None = Field(
        None, description="covariates (default with a simulate section: the simulator's)"
    )
    truth: str | None = Field(
        None,
        description="truth.json (default: the simulator's, only on data this project simulated)",
    )
    cache_gb: float = Field(
        2.0,
        ge=0,
        description="keep a worker's shard in its memory up to this size; beyond it, stream every pass",
    )


class SegmentsModelSpec(StrictModel):
    """The penalised problem and the solver's stopping rule."""

    lam: float = Field(0.01, gt=0, description="penalty level λ")
    alpha: float = Field(
        0.1, ge=0, le=1, description="share of λ on ‖γ‖₁ (the rest on the creative groups)"
    )
    tol: float = Field(1e-8, gt=0, description="KKT residual at which a solve stops")
    max_iter: int = Field(50, ge=1, description="Newton iterations per λ on the path")
    path_steps: int = Field(8, ge=1, description="λ values from λ_max down to lam, warm-started")
    standardize: bool = Field(
        True,
        description="penalise coefficients of standardised features (glmnet's default); "
        "false: of the features as given (centred only)",
    )


class CrossValidationSpec(StrictModel):
    """k-fold CV by a stable hash of each row; 0 turns it off (refit only).

    ``select`` picks the reported solution among the λ path: ``last`` is ``model.lam``
    (what a Tune sweep over λ wants), ``min`` the λ of least CV log loss, ``one_se`` the
    largest λ within one standard error of that minimum (sparser, and the usual choice
    when the point is which creatives match their segment).
    """

    folds: int = Field(5, ge=0)
    select: Literal["last", "min", "one_se"] = "last"

    @model_validator(mode="after")
    def _not_one(self) -> CrossValidationSpec:
        if self.folds == 1:
            raise ValueError("folds must be 0 (no cross-validation) or at least 2")
        if self.folds == 0 and self.select != "last":
            raise ValueError(f"select: {self.select} needs cross-validation (folds >= 2)")
        return self


class SegmentsSimulateSpec(StrictModel):
    """Simulated data (see :mod:`distributed_hte.simulate.segments`)."""

    n_people: int = Field(200_000, ge=10)
    n_features: int = Field(50, ge=1)
    creatives_per_segment: list[int] = Field(default_factory=lambda: [3, 4, 5, 6], min_length=1)
    active_features: int = Field(5, ge=0)
    effect_low: float = 0.4
    effect_high: float = 0.9
    base_logit: float = -1.0
    intercept_sd: float = Field(0.1, ge=0)
    off_message: int = Field(2, ge=0)
    off_message_norm: float = Field(1.0, ge=0)
    seed: int = 0
    chunk_rows: int = Field(500_000, ge=1_000)
    out: str | None = Field(
        None, description="output folder (default: <outputs.dir>/data/<name>-<hash>)"
    )

    def config(self) -> sim.SegmentsSimConfig:
        raw = self.model_dump(exclude={"out"})
        raw["creatives_per_segment"] = tuple(raw["creatives_per_segment"])
        return sim.SegmentsSimConfig(**raw)


class SegmentsSpec(JobSpec):
    kind: Literal["segments"]
    train: SolverTrainSpec = SolverTrainSpec()
    data: SegmentsDataSpec = SegmentsDataSpec()
    model: SegmentsModelSpec = SegmentsModelSpec()
    cv: CrossValidationSpec = CrossValidationSpec()
    simulate: SegmentsSimulateSpec | None = None

    def check_kind(self) -> None:
        d = self.data
        if d.features is None and self.simulate is None:
            raise ValueError("data.features is required: list the covariate columns")
        self.check_data_columns(
            [d.segment, d.creative, d.label, *self.feature_columns()],
            "segment/creative/label/features",
        )

    def feature_columns(self) -> list[str]:
        if self.data.features is not None:
            return list(self.data.features)
        assert self.simulate is not None
        return [f"x{i}" for i in range(self.simulate.n_features)]


SPEC = SegmentsSpec
