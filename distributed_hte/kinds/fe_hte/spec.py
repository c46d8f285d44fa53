"""Spec sections of kind ``fe_hte`` (no torch, no Ray: ``dhte validate`` stays light)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from distributed_hte.simulate.fe_hte import BETA_FEATURES, FIXED_EFFECTS, G_FEATURES
from distributed_hte.spec import JobSpec, NetSpec, StrictModel


class MLPSpec(NetSpec):
    """A sub-network. ``hidden: []`` is linear (coefficients are exported)."""

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batchnorm: bool = False


class FeHteModelSpec(StrictModel):
    beta_net: MLPSpec = MLPSpec()
    g_net: MLPSpec = MLPSpec()
    # Each id's embedding sees a gradient from only a few rows per batch; a larger step
    # size for the embeddings lets them converge in as many epochs as the networks.
    fixed_effect_lr_multiplier: float = Field(10.0, gt=0)
    solver: Literal["auto", "exact", "sgd"] = Field(
        "auto",
        description="exact: solve the linear model as feols does (both nets linear); "
        "sgd: Ray Train; auto: exact when both nets are linear",
    )

    init: Literal["auto", "linear", "random"] = Field(
        "auto",
        description="sgd: where training starts. linear: the exact linear fit (one more pass "
        "over the data): the fixed effects, and the nets' linear part (a nonlinear net gets a "
        "linear skip path beside its hidden layers to hold it, so the hidden layers learn only "
        "what is not linear); random: nets at their random start, fixed effects at zero; "
        "auto: linear",
    )
    backfit_sweeps: int | None = Field(
        None,
        ge=0,
        description="sgd, when the training rows fit in memory (data.cache): after every "
        "epoch, this many exact Gauss-Seidel sweeps set the fixed effects given the nets "
        "(backfitting) and SGD trains the nets only; 0: SGD learns the fixed effects with "
        "the nets (always so for data too large to cache); null: 10 with a nonlinear net, "
        "0 with linear nets (joint SGD lands within 0.002 of feols there, while backfitting "
        "locks in the SGD noise of a coefficient whose feature is constant within an id)",
    )

    finish_fixed_effects: bool = Field(
        True,
        description="sgd: after training, solve the fixed effects and intercept exactly given "
        "the nets (one more pass over the data)",
    )
    cluster: str | None = Field(
        None,
        description="exact solver: also report CRV1 SEs clustered by this fixed-effect column",
    )

    @model_validator(mode="after")
    def _exact_needs_linear(self) -> FeHteModelSpec:
        if self.solver == "exact" and not self.is_linear:
            raise ValueError(
                "solver: exact needs linear nets (beta_net.hidden: [] and g_net.hidden: []); "
                "use solver: sgd or auto for nonlinear nets"
            )
        return self

    @property
    def is_linear(self) -> bool:
        return not self.beta_net.hidden and not self.g_net.hidden

    @property
    def backfit_sweeps_used(self) -> int:
        """``backfit_sweeps``, with null resolved (see its description)."""
        if self.backfit_sweeps is not None:
            return self.backfit_sweeps
        return 0 if self.is_linear else 10


class FeHteDataSpec(StrictModel):
    """Columns of the input parquet. Defaults match the simulator's output."""

    path: str | None = None
    outcome: str = "revenue"
    treatment: str = "clicks"
    beta_features: list[str] = Field(default_factory=lambda: list(BETA_FEATURES))
    g_features: list[str] = Field(default_factory=lambda: list(G_FEATURES))
    fixed_effects: list[str] = Field(default_factory=lambda: list(FIXED_EFFECTS))
    split_key: list[str] | None = Field(
        None, description="columns hashed for the train/val split (default: all used)"
    )
    beta_true: str | None = Field(
        None,
        description="column of the true effect (default: the simulator's beta_true, read only "
        "on data this project simulated)",
    )
    g_true: str | None = Field(
        None,
        description="column of the true g (default: the simulator's g_true, simulated data only)",
    )
    truth_dir: str | None = Field(
        None,
        description="fixed-effect truth files <column>.parquet (id, effect); default: the "
        "simulator's, only on data this project simulated",
    )
    cache: Literal["auto", "always", "never"] = Field(
        "auto",
        description="keep the split datasets in the object store across epochs (auto: when small)",
    )


class FeHteSimulateSpec(StrictModel):
    """Simulated data (see :mod:`distributed_hte.simulate.fe_hte`)."""

    n_rows: int = Field(500_000, ge=1)
    n_users: int = Field(10_000, ge=1)
    n_vendors: int = Field(2_000, ge=1)
    n_periods: int = Field(50, ge=1)
    beta: Literal["linear", "nonlinear"] = "linear"
    g: Literal["linear", "nonlinear"] = "linear"
    noise_sd: float = Field(0.5, ge=0.0)
    seed: int = 0
    chunk_rows: int = Field(1_000_000, ge=1_000)
    out: str | None = Field(
        None, description="output folder (default: <outputs.dir>/data/<name>-<hash>)"
    )


class FeHteSpec(JobSpec):
    kind: Literal["fe_hte"]
    data: FeHteDataSpec = FeHteDataSpec()
    model: FeHteModelSpec = FeHteModelSpec()
    simulate: FeHteSimulateSpec | None = None

    def check_kind(self) -> None:
        d = self.data
        self.check_data_columns(
            [d.outcome, d.treatment, *d.beta_features, *d.g_features, *d.fixed_effects],
            "outcome/treatment/features/fixed_effects",
        )
        if self.model.cluster is not None and self.model.cluster not in d.fixed_effects:
            raise ValueError(
                f"model.cluster {self.model.cluster!r} must be one of data.fixed_effects "
                f"{d.fixed_effects}"
            )

    @property
    def uses_exact_solver(self) -> bool:
        """``model.solver`` resolved: exact for linear nets unless sgd is forced."""
        m = self.model
        return m.solver == "exact" or (m.solver == "auto" and m.is_linear)

    @property
    def starts_from_linear_fit(self) -> bool:
        """The SGD path starts from the exact linear fit (``model.init`` resolved)."""
        return not self.uses_exact_solver and self.model.init in ("auto", "linear")


SPEC = FeHteSpec
