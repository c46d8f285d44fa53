"""Spec sections of kind ``aipw_segments`` (no torch, no Ray: ``dhte validate`` stays light)."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from distributed_hte.simulate import aipw_segments as sim
from distributed_hte.spec import JobSpec, OutputsSpec, StrictModel


class AipwTrainSpec(StrictModel):
    """What an exact (Newton) nuisance fit takes of ``train:``: no SGD settings."""

    log_every_s: float = Field(10.0, gt=0)


class AipwDataSpec(StrictModel):
    """Columns of the input parquet: one row per impression. Defaults match the simulator."""

    path: str | None = None
    key: str = Field("impression_id", description="unique row id: stable folds, per-row scores")
    treatment: str = Field("is_top_3", description="0/1")
    outcome: str = Field("clicked", description="0/1 (logistic outcome model) or continuous")
    numeric_features: list[str] | None = Field(
        None, description="median-imputed and standardised (default with simulate: the simulator's)"
    )
    categorical_features: list[str] | None = Field(
        None, description="one-hot, rare levels grouped (default with simulate: the simulator's)"
    )
    fold: str | None = Field(
        None,
        description="a column holding each row's fold 0..folds-1 (an external split); "
        "default: a stable hash of data.key, stratified by treatment",
    )
    truth: str | None = Field(
        None,
        description="truth.json (default: the simulator's, only on data this project simulated)",
    )
    tau_true: str | None = Field(
        None,
        description="column of each row's true effect (default: the simulator's tau_true, "
        "only on data this project simulated)",
    )


class SegmentationSpec(StrictModel):
    """One segmentation: a column's values, fixed bins (right-closed), or quantiles."""

    column: str
    bins: list[float] | None = Field(None, description="edges; (a, b] bins as pandas.cut")
    labels: list[str] | None = None
    quantiles: int | None = Field(None, ge=2, le=100)
    min_rows: int | None = Field(None, ge=1, description="overrides estimate.min_rows")
    min_treated: int | None = Field(None, ge=0)
    min_control: int | None = Field(None, ge=0)
    min_treated_events: float | None = Field(None, ge=0)
    min_control_events: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_rule(self) -> SegmentationSpec:
        if self.bins is not None and self.quantiles is not None:
            raise ValueError(f"segments[{self.column}]: give bins or quantiles, not both")
        if self.labels is not None and self.bins is None:
            raise ValueError(f"segments[{self.column}]: labels need bins")
        if self.bins is not None:
            if len(self.bins) < 2:
                raise ValueError(f"segments[{self.column}]: bins need at least two edges")
            if any(not (a < b) for a, b in zip(self.bins, self.bins[1:], strict=False)):
                raise ValueError(f"segments[{self.column}]: bins must increase strictly")
            if any(math.isnan(b) for b in self.bins):
                raise ValueError(f"segments[{self.column}]: bins must not be NaN")
            if self.labels is not None and len(self.labels) != len(self.bins) - 1:
                raise ValueError(
                    f"segments[{self.column}]: {len(self.bins) - 1} bins but "
                    f"{len(self.labels)} labels"
                )
        return self

    def kind_of(self) -> Literal["values", "bins", "quantiles"]:
        if self.bins is not None:
            return "bins"
        return "quantiles" if self.quantiles is not None else "values"


class AipwEstimateSpec(StrictModel):
    """Cross-fitting, clipping, segment size filters and the confidence level."""

    folds: int = Field(3, ge=2, le=20)
    fold_salt: int = Field(0, description="another salt gives another (stable) split")
    clip: float = Field(0.01, ge=0, lt=0.5, description="ê is clipped to [clip, 1 − clip]")
    min_rows: int = Field(1000, ge=1)
    min_treated: int = Field(50, ge=0)
    min_control: int = Field(500, ge=0)
    min_treated_events: float = Field(
        25.0,
        ge=0,
        description="binary outcomes: a segment needs at least this many expected events "
        "(of the rarer outcome value) among its treated rows, Σ μ̂1 by the out-of-fold "
        "outcome model; below it the normal interval under-covers (benchmarks/README.md)",
    )
    min_control_events: float = Field(
        25.0, ge=0, description="the same among a segment's control rows (Σ μ̂0)"
    )
    level: float = Field(0.95, gt=0, lt=1)


class NuisanceSpec(StrictModel):
    """Propensity and outcome models, one of each per fold (fitted without that fold).

    ``logistic``: L2-penalised logistic regression, sklearn's ``LogisticRegression(C=C)``
    objective (Σ log loss + ‖w‖²/(2C), intercept unpenalised), solved exactly by Newton
    passes; a continuous outcome gets the ridge regression of the same penalty.
    ``outcome_model``: ``pooled`` (one model with the treatment as a feature, the
    notebook's) or ``by_arm`` (one on treated and one on control rows, DoubleML's IRM).
    """

    model: Literal["logistic"] = "logistic"
    C: float = Field(1.0, gt=0, description="inverse L2 penalty, as sklearn's C")
    min_frequency: int = Field(50, ge=1, description="rarer categorical levels are grouped")
    outcome_model: Literal["pooled", "by_arm"] = "pooled"
    max_iter: int = Field(50, ge=1, description="Newton passes at most")
    tol: float = Field(1e-9, gt=0, description="stop when max |gradient| / rows is below this")
    cache_gb: float = Field(
        2.0, ge=0, description="keep a worker's shard in memory up to this size; else stream"
    )


class AipwOutputsSpec(OutputsSpec):
    scores: bool = Field(False, description="write scores.parquet (key, fold, ê, μ̂1, μ̂0, ψ)")


class AipwSimulateSpec(StrictModel):
    """Simulated impressions (see :mod:`distributed_hte.simulate.aipw_segments`)."""

    n_rows: int = Field(150_000, ge=100)
    propensity_intercept: float = -2.65
    outcome_intercept: float = -3.45
    effect_scale: float = 1.0
    truth_rows: int = Field(400_000, ge=1000)
    seed: int = 0
    chunk_rows: int = Field(500_000, ge=1_000)
    out: str | None = Field(
        None, description="output folder (default: <outputs.dir>/data/<name>-<hash>)"
    )

    def config(self) -> sim.AipwSimConfig:
        return sim.AipwSimConfig(**self.model_dump(exclude={"out"}))


class AipwSegmentsSpec(JobSpec):
    kind: Literal["aipw_segments"]
    train: AipwTrainSpec = AipwTrainSpec()
    data: AipwDataSpec = AipwDataSpec()
    segments: list[SegmentationSpec] = Field(default_factory=list)
    estimate: AipwEstimateSpec = AipwEstimateSpec()
    nuisance: NuisanceSpec = NuisanceSpec()
    outputs: AipwOutputsSpec = AipwOutputsSpec()
    simulate: AipwSimulateSpec | None = None

    def check_kind(self) -> None:
        d = self.data
        if self.simulate is None and (d.numeric_features is None or d.categorical_features is None):
            raise ValueError(
                "data.numeric_features and data.categorical_features are required "
                "(an empty list is allowed): list the covariate columns"
            )
        if not self.numeric_features() and not self.categorical_features():
            raise ValueError("data: give at least one numeric or categorical feature")
        used = [d.key, d.treatment, d.outcome, *self.numeric_features()]
        used += self.categorical_features()
        if d.fold:
            used.append(d.fold)
        self.check_data_columns(used, "key/treatment/outcome/features/fold")
        cols = [s.column for s in self.segments]
        if len(set(cols)) != len(cols):
            raise ValueError("segments: each column may be segmented once")
        for s in self.segments:
            if s.column in (d.treatment, d.outcome, d.key):
                raise ValueError(f"segments: {s.column!r} is the key, treatment or outcome")

    def numeric_features(self) -> list[str]:
        if self.data.numeric_features is not None:
            return list(self.data.numeric_features)
        return list(sim.NUMERIC_FEATURES)

    def categorical_features(self) -> list[str]:
        if self.data.categorical_features is not None:
            return list(self.data.categorical_features)
        return list(sim.CATEGORICAL_FEATURES)


SPEC = AipwSegmentsSpec
