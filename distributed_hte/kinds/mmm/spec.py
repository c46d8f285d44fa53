"""Spec sections of kind ``mmm`` (no torch, no Ray: ``dhte validate`` stays light)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distributed_hte.simulate import mmm as sim
from distributed_hte.spec import JobSpec, StrictModel, TrainSpec


class MmmDataSpec(StrictModel):
    """Long format: one row per region × week. Defaults match the simulator."""

    path: str | None = None
    region: str = Field("region", description="region id column (integer or string)")
    week: str = Field("week", description="a date/timestamp, a date string, or an integer period")
    kpi: str = "kpi"
    media: list[str] | None = Field(
        None, description="activity per channel (spend or impressions), ≥ 0; at least one"
    )
    spend: dict[str, str] | None = Field(
        None, description="channel → spend column, for ROI and budgets (may be the media column)"
    )
    controls: list[str] | None = None
    holdout_weeks: int = Field(8, ge=0, description="the last weeks of EACH region, held out")
    truth: str | None = Field(
        None, description="truth.json (default: the simulator's, only on data it simulated)"
    )


class MmmModelSpec(StrictModel):
    """The deep MMM (see :mod:`distributed_hte.models.mmm`)."""

    adstock: Literal["geometric", "weibull"] = "geometric"
    max_lag: int = Field(13, ge=1, le=104, description="weeks of carry-over")
    hidden: int = Field(16, ge=1, description="GRU width")
    fourier: int = Field(2, ge=1, le=10, description="yearly harmonics")
    season_period: float = Field(sim.WEEKS_PER_YEAR, gt=1)
    hill_init_percentile: float = Field(
        50.0, gt=0, lt=100, description="Hill K starts at this percentile of adstocked activity"
    )
    hill_slope_init: float = Field(1.5, gt=0.1)
    hill_slope_min: float = Field(
        1.0,
        gt=0,
        description="Hill slopes below this are not allowed (1: no infinite "
        "marginal response at zero activity)",
    )

    @model_validator(mode="after")
    def _slopes(self) -> MmmModelSpec:
        if self.hill_slope_init <= self.hill_slope_min:
            raise ValueError("model.hill_slope_init must exceed model.hill_slope_min")
        return self

    huber_delta: float = Field(0.3, gt=0)
    tv_penalty: float = Field(
        0.1,
        ge=0,
        description="shrinks the GRU's time variation toward a constant per channel "
        "(benchmarks/README.md: 1 fits the 20 % media-share panel's shares best, 0.03 the "
        "60 % panel's holdout; 0.1 is the compromise)",
    )


class MmmTrainSpec(TrainSpec):
    """Training of the deep MMM. A sample is one region's series."""

    epochs: int = Field(40, ge=1)
    batch_size: int = Field(
        256,
        ge=1,
        description="regions per optimiser step, all workers together (each worker takes "
        "batch_size / num_workers): the same steps and global batch whatever the worker "
        "count, so 1 and 2 workers give the same fit (a panel is small: large batches)",
    )
    lr: float = Field(0.02, gt=0)
    val_fraction: float = Field(
        0.0, ge=0.0, le=0.0, description="unused: the holdout is data.holdout_weeks per region"
    )
    early_stopping_patience: int | None = Field(5, ge=1)
    region_passes: int = Field(
        25,
        ge=1,
        description="passes over the regions per epoch; a panel is small, so one pass per "
        "epoch would spend most of the time checkpointing",
    )


class MmmOptimizeSpec(StrictModel):
    """Budget allocation over a future period (scipy SLSQP on the fitted response curves)."""

    budget: float = Field(gt=0, description="total spend over `weeks`")
    weeks: int = Field(13, ge=1)
    bounds: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="channel → [low, high] total spend over the period"
    )
    by_region: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> MmmOptimizeSpec:
        for ch, (lo, hi) in self.bounds.items():
            if not 0 <= lo <= hi:
                raise ValueError(f"optimize.bounds.{ch}: need 0 <= low <= high, found [{lo}, {hi}]")
        if sum(lo for lo, _ in self.bounds.values()) > self.budget:
            raise ValueError("optimize.bounds: the lower bounds add up to more than the budget")
        return self


class MmmUncertaintySpec(StrictModel):
    """Percentile intervals from region-bootstrap replicas (see
    :mod:`distributed_hte.kinds.mmm.replicas`)."""

    replicas: int = Field(ge=2, description="bootstrap replicas, each a full fit")
    level: float = Field(0.9, gt=0, lt=1, description="interval level (0.9: 5th-95th pct)")
    seed: int = Field(0, description="seed of the region resampling")
    workers: int = Field(
        1, ge=1, description="Ray Train workers per replica (replicas run side by side)"
    )


class MmmSimulateSpec(StrictModel):
    """Simulated panel (see :mod:`distributed_hte.simulate.mmm`)."""

    n_regions: int = Field(200, ge=2)
    n_weeks: int = Field(104, ge=20)
    n_channels: int = Field(6, ge=1, le=len(sim.CHANNELS))
    media_share: float = Field(0.4, gt=0, lt=0.9)
    holdout_weeks: int = Field(8, ge=0)
    noise: float = Field(0.04, ge=0)
    coef_variation: float = Field(0.15, ge=0, lt=1)
    ragged: bool = False
    seed: int = 0
    n_files: int = Field(4, ge=1)
    out: str | None = Field(
        None, description="output folder (default: <outputs.dir>/data/<name>-<hash>)"
    )

    def config(self) -> sim.MmmSimConfig:
        return sim.MmmSimConfig(**self.model_dump(exclude={"out"}))


class MmmSpec(JobSpec):
    kind: Literal["mmm"]
    train: MmmTrainSpec = MmmTrainSpec()
    data: MmmDataSpec = MmmDataSpec()
    model: MmmModelSpec = MmmModelSpec()
    optimize: MmmOptimizeSpec | None = None
    uncertainty: MmmUncertaintySpec | None = None
    simulate: MmmSimulateSpec | None = None

    def check_kind(self) -> None:
        d = self.data
        if self.simulate is None and not d.media:
            raise ValueError("data.media is required: list the channels' activity columns")
        media = self.media()
        if not media:
            raise ValueError("data.media: give at least one channel")
        spend = self.spend()
        unknown = sorted(set(spend) - set(media))
        if unknown:
            raise ValueError(f"data.spend names channel(s) {unknown} that are not in data.media")
        if self.optimize is not None:
            missing = [c for c in media if c not in spend]
            if missing:
                raise ValueError(
                    f"optimize needs a spend column for every channel; data.spend lacks {missing}"
                )
            bad = sorted(set(self.optimize.bounds) - set(media))
            if bad:
                raise ValueError(f"optimize.bounds names channel(s) {bad} not in data.media")
        if self.simulate is not None and self.simulate.holdout_weeks != d.holdout_weeks:
            raise ValueError(
                f"data.holdout_weeks ({d.holdout_weeks}) differs from simulate.holdout_weeks "
                f"({self.simulate.holdout_weeks}); the simulator's scalers assume the same split"
            )
        spend_cols = [c for ch, c in spend.items() if c != ch]
        used = [d.region, d.week, d.kpi, *media, *spend_cols, *self.controls()]
        self.check_data_columns(used, "region/week/kpi/media/spend/controls")

    def media(self) -> list[str]:
        if self.data.media is not None:
            return list(self.data.media)
        assert self.simulate is not None
        return list(sim.CHANNELS[: self.simulate.n_channels])

    def spend(self) -> dict[str, str]:
        if self.data.spend is not None:
            return dict(self.data.spend)
        if self.simulate is not None and self.data.media is None:
            return {c: f"{c}_spend" for c in self.media()}
        return {}

    def controls(self) -> list[str]:
        if self.data.controls is not None:
            return list(self.data.controls)
        return list(sim.CONTROLS) if self.simulate is not None else []


SPEC = MmmSpec
