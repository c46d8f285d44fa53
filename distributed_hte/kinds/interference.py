"""Kind ``interference``: the global treatment effect of a ranking algorithm tested by
creator-side randomisation, with the debiased (DB) estimator and every benchmark.

Stages: simulate (optional) → check the long-format data (one row per query × item)
and validate it: exactly one exposure per query, treatment constant per item, 0/1
columns, finite values → reshape to one row per query, padded to the largest set with
a mask (Ray Data ``groupby(query).map_groups``, materialised once) → one Ray Train DDP
run that fits all F cross-fitting members of the choice, response and PDL nets
together (member f never sees fold f) → one estimation pass of stateless Ray Data
tasks: every query's DB influence values (with its own fold's member), plug-in and
benchmark terms, written to ``influence/`` → ``estimates.json``, a table in the run log,
``metrics.json`` and a plot. See :mod:`distributed_hte.estimators.interference`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch
from pydantic import Field, model_validator

from distributed_hte.data.profile import profile_dataset
from distributed_hte.data.schema import ColumnRequirement, check_schema
from distributed_hte.errors import DataError, RunDirError
from distributed_hte.estimators import interference as est
from distributed_hte.kinds import Kind
from distributed_hte.kinds.interference_data import (
    Layout,
    flag_sums,
    item_summary,
    merge_rows,
    query_fold,
    query_row,
    query_summary,
    split_side,
)
from distributed_hte.models.interference import (
    InterferenceNets,
    NetConfig,
    fold_weights,
    masked_scores,
    query_losses,
    weighted_loss,
)
from distributed_hte.rundir import RunDir, write_json
from distributed_hte.simulate import interference as sim
from distributed_hte.spec import JobSpec, StrictModel

log = logging.getLogger(__name__)

MAX_SUBGROUPS = 50
CACHE_BYTES = 1 << 30
# Rows per hash-shuffle partition of the groupbys (Ray's default is 200 partitions,
# which turns small data into hundreds of tiny tasks).
ROWS_PER_PARTITION = 200_000  # data.cache: auto keeps query rows in worker memory below this
BENCHMARKS = ["HT_DIM", "HA_DIM", "PDL", "IPW", "AIPW"]


# ----------------------------------------------------------------------------- spec


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
    tau_true: str | None = "tau_true"
    mu_true: str | None = "mu_true"
    cache: Literal["auto", "always", "never"] = Field(
        "auto",
        description="keep each training worker's queries in its memory after the first epoch "
        "(auto: when the query rows take under 1 GB)",
    )


class InterferenceNetSpec(StrictModel):
    hidden: list[int] = Field(default_factory=lambda: [32, 32])
    activation: Literal["relu", "gelu", "tanh", "silu"] = "silu"

    def config(self) -> NetConfig:
        return NetConfig(tuple(self.hidden), self.activation)


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

    @model_validator(mode="after")
    def _check(self) -> InterferenceSpec:
        d = self.data
        if d.path is None and self.simulate is None:
            raise ValueError("data.path is required unless a simulate section generates the data")
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
        used = [d.query, d.item, d.treated, d.exposed, d.outcome, *d.viewer_features]
        used += d.item_features
        dupes = sorted({c for c in used if used.count(c) > 1})
        if dupes:
            raise ValueError(f"data: column(s) {dupes} are named more than once")
        return self

    @property
    def p_treat(self) -> float:
        if self.data.p_treat is not None:
            return self.data.p_treat
        assert self.simulate is not None
        return self.simulate.p_treat


# ----------------------------------------------------------------------------- plugin


@dataclass
class InterferencePlugin:
    """What the training workers and estimation tasks need (picklable)."""

    d_x: int
    d_z: int
    k_max: int
    folds: int
    val_fraction: float
    binary: bool
    choice_net: NetConfig
    response_net: NetConfig
    pdl_net: NetConfig
    x_mean: list[float]
    x_scale: list[float]
    z_mean: list[float]
    z_scale: list[float]
    columns: list[str] = field(default_factory=lambda: ["query", "x", "z", "w", "mask", "e", "y"])
    # Keep each worker's shard in its memory after the first epoch (small data).
    cache_in_memory: bool = False

    def build_model(self) -> InterferenceNets:
        return InterferenceNets(
            self.folds,
            self.d_x,
            self.d_z,
            self.k_max,
            self.choice_net,
            self.response_net,
            self.pdl_net,
            self.x_mean,
            self.x_scale,
            self.z_mean,
            self.z_scale,
        )

    def to_tensors(
        self, batch: dict[str, np.ndarray], device: torch.device
    ) -> dict[str, torch.Tensor]:
        def t(a, dtype):
            return torch.as_tensor(np.asarray(a), dtype=dtype).to(device, non_blocking=True)

        out = {
            "x": t(batch["x"], torch.float32),
            "z": t(batch["z"], torch.float32),
            "w": t(batch["w"], torch.float32),
            "mask": t(batch["mask"], torch.bool),
            "e": t(batch["e"], torch.int64),
            "fold": t(query_fold(batch["query"], self.folds), torch.int64),
        }
        if "y" in batch:
            out["y"] = t(batch["y"], torch.float32)
        return out

    def _losses(self, model: torch.nn.Module, b: dict[str, torch.Tensor]):
        out = model(b["x"], b["z"], b["w"], b["mask"])
        losses = query_losses(
            {k: v.float() for k, v in out.items()}, b["w"], b["e"], b["y"], b["mask"], self.binary
        )
        return losses, fold_weights(b["fold"], self.folds)

    def loss(self, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        losses, weights = self._losses(model, b)
        return weighted_loss(losses, weights)

    def eval_sums(self, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> dict[str, float]:
        losses, weights = self._losses(model, b)
        sums = {f"{k}_sum": float((v * weights).sum()) for k, v in losses.items()}
        sums["weight"] = float(weights.sum())
        return sums

    def eval_metrics(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        n = max(sums.get("weight", 0.0), 1.0)
        parts = {k: sums.get(f"{k}_sum", 0.0) / n for k in ("choice", "response", "pdl")}
        out = {f"{prefix}{k}_loss": v for k, v in parts.items()}
        # The sum of the three, as the training loss (each member's mean, summed over members).
        out[f"{prefix}loss"] = sum(parts.values()) * self.folds
        out[f"{prefix}queries"] = n / max(self.folds - 1, 1)
        return out


# ----------------------------------------------------------------------------- estimation


_MODEL_CACHE: dict[int, InterferenceNets] = {}


def _cached_model(plugin: InterferencePlugin, state: bytes) -> InterferenceNets:
    key = hash(state)
    if key not in _MODEL_CACHE:
        torch.set_num_threads(1)
        model = plugin.build_model()
        model.load_state_dict(torch.load(io.BytesIO(state), map_location="cpu", weights_only=False))
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = model.eval()
    return _MODEL_CACHE[key]


def _own(t: torch.Tensor, fold: torch.Tensor) -> torch.Tensor:
    """Member ``fold[i]``'s output for query i: ``(M, n, ...)`` → ``(n, ...)``."""
    idx = fold.view(1, -1, *([1] * (t.dim() - 2))).expand(1, *t.shape[1:])
    return t.gather(0, idx)[0]


def estimation_batch(
    batch: dict[str, np.ndarray],
    plugin: InterferencePlugin,
    state: bytes,
    settings: est.DBSettings,
    truth: list[str],
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: per-query estimator terms with the own fold's member."""
    model = _cached_model(plugin, state)
    tb = plugin.to_tensors(batch, torch.device("cpu"))
    x, z, w, mask, e, fold = tb["x"], tb["z"], tb["w"], tb["mask"], tb["e"], tb["fold"]
    with torch.no_grad():
        b, tau, r = model.pair_outputs(x, z)
        f_obs = model.pdl_output(x, z, w, mask)
        f1 = model.pdl_output(x, z, torch.ones_like(w), mask)
        f0 = model.pdl_output(x, z, torch.zeros_like(w), mask)
    d = est.DTYPE
    own = {k: _own(v, fold).to(d) for k, v in dict(b=b, tau=tau, r=r).items()}
    pdl = {k: _own(v, fold).to(d) for k, v in dict(obs=f_obs, one=f1, zero=f0).items()}
    if plugin.binary:
        pdl = {k: torch.sigmoid(v) for k, v in pdl.items()}
    y = torch.as_tensor(batch["y"], dtype=d)
    group = torch.as_tensor(batch["group"]) if "group" in batch else None
    qb = est.QueryBatch(own["b"], own["tau"], own["r"], w.to(d), mask, e, y, group)
    infl = est.db_influence(qb, settings)
    terms = est.benchmark_terms(qb.w, e, y, mask, settings.p, pdl["obs"], pdl["one"], pdl["zero"])
    we = est.exposed_treated(qb.w, e)
    u = masked_scores(own["b"], own["tau"], qb.w, mask)
    p_model = torch.softmax(u, dim=-1)
    mu = torch.sigmoid(own["r"]) if plugin.binary else own["r"]
    out: dict[str, np.ndarray] = {
        "query": np.asarray(batch["query"]),
        "fold": fold.numpy(),
        "size": mask.sum(dim=1).numpy(),
        "y": y.numpy(),
        "exposed_treated": we.numpy(),
        # The model's share of exposures to treated items in this query (diagnostic).
        "model_treated_share": (p_model * qb.w).sum(dim=1).numpy(),
        "ridge": infl.ridge.numpy(),
        "resid": (y - mu.gather(1, e.unsqueeze(1))[:, 0]).numpy(),
    }
    for j, name in enumerate(infl.names):
        out[f"theta:{name}"] = infl.theta[:, j].numpy()
        out[f"psi:{name}"] = infl.psi[:, j].numpy()
    for name, values in terms.items():
        out[f"term:{name}"] = values.numpy()
    x_np = np.asarray(batch["x"], dtype=np.float64)
    for j in range(x_np.shape[1]):
        out[f"x{j}"] = x_np[:, j]
    m = mask.numpy()
    for c, pred in (("tau_true", own["tau"]), ("mu_true", mu)):
        if c in truth:
            tr = np.asarray(batch[c], dtype=np.float64)
            p = pred.numpy()
            out[f"sum:{c}:n"] = m.sum(axis=1).astype(np.float64)
            for key, val in (
                ("a", p),
                ("b", tr),
                ("aa", p * p),
                ("bb", tr * tr),
                ("ab", p * tr),
            ):
                out[f"sum:{c}:{key}"] = (val * m).sum(axis=1)
    return out


def _read_parquet(path: str, columns: list[str] | None = None):
    import ray.data

    return ray.data.read_parquet(path, columns=columns, file_extensions=["parquet"])


def _np_sums(x: np.ndarray) -> dict[str, float]:
    """:func:`~distributed_hte.estimators.interference.mean_sums` of a numpy column."""
    x = np.asarray(x, dtype=np.float64)
    return {"n": float(x.size), "s": float(x.sum()), "ss": float(x @ x)}


def shuffle_partitions(n_rows: int) -> int:
    """Partitions of a groupby over ``n_rows`` long rows."""
    return int(min(max(math.ceil(n_rows / ROWS_PER_PARTITION), 1), 200))


# ----------------------------------------------------------------------------- the kind


@dataclass
class InterferencePrepared:
    """Validated data, reshaped to one row per query (a materialised Ray Dataset)."""

    path: str
    queries: Any
    n_queries: int
    n_rows: int
    layout: Layout
    binary: bool
    x_mean: list[float]
    x_scale: list[float]
    z_mean: list[float]
    z_scale: list[float]
    items: int
    val_queries: int
    treated_items: int
    truth: dict | None
    prepare_seconds: float


class InterferenceKind(Kind):
    name = "interference"
    spec_class = InterferenceSpec
    artefacts = ["estimates.json", "influence", "plots"]

    # -- simulate ---------------------------------------------------------------------
    def simulate(self, spec: InterferenceSpec, progress: bool = True) -> Path:
        """Simulate once: a folder whose ``simulation.json`` matches the section is reused."""
        assert spec.simulate is not None
        cfg = spec.simulate.config()
        return self.simulate_once(
            spec,
            json.loads(json.dumps(cfg.__dict__)),
            lambda out: sim.simulate_interference(cfg, out, progress=progress),
        )

    # -- check / prepare --------------------------------------------------------------
    def requirements(self, spec: InterferenceSpec) -> list[ColumnRequirement]:
        d = spec.data
        req = [
            ColumnRequirement(d.query, "data.query", "id"),
            ColumnRequirement(d.item, "data.item", "id"),
            ColumnRequirement(d.treated, "data.treated", "binary"),
            ColumnRequirement(d.exposed, "data.exposed", "binary"),
        ]
        req += [ColumnRequirement(c, "data.viewer_features", "numeric") for c in d.viewer_features]
        req += [ColumnRequirement(c, "data.item_features", "numeric") for c in d.item_features]
        if d.item_subgroup:
            req.append(ColumnRequirement(d.item_subgroup, "data.item_subgroup", "id"))
        return req

    def check(self, spec: InterferenceSpec) -> None:
        assert spec.data.path is not None
        summary = check_schema(spec.data.path, self.requirements(spec))
        self._check_outcome_column(spec, summary.schema)

    @staticmethod
    def _check_outcome_column(spec: InterferenceSpec, schema: pa.Schema) -> None:
        # The outcome is read on exposed rows only, so nulls elsewhere are fine and it
        # is not part of the null-statistics check.
        d = spec.data
        if d.outcome not in schema.names:
            raise DataError(
                f"the dataset at {d.path} has no column {d.outcome!r} (named by data.outcome); "
                f"its columns are: {', '.join(schema.names)}"
            )
        t = schema.field(d.outcome).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise DataError(
                f"column {d.outcome!r} (named by data.outcome) has type {t}; it must be numeric"
            )

    def prepare(self, spec: InterferenceSpec) -> InterferencePrepared:
        from ray.data.aggregate import Count, Max, Min, Sum

        t0 = time.perf_counter()
        d = spec.data
        assert d.path is not None
        req = self.requirements(spec)
        summary = check_schema(d.path, req)
        self._check_outcome_column(spec, summary.schema)
        names = summary.schema.names
        truth_cols = [c for c in (d.tau_true, d.mu_true) if c and c in names]
        numeric = [d.treated, d.exposed, *d.viewer_features, *d.item_features]
        ids = [d.item_subgroup] if d.item_subgroup else []
        layout = Layout(
            d.query, d.item, d.treated, d.exposed, d.outcome, list(d.viewer_features),
            list(d.item_features), k_max=0, subgroup=d.item_subgroup, truth=truth_cols,
        )  # fmt: skip
        ds = _read_parquet(d.path, layout.long_columns())
        profile = profile_dataset(ds, numeric, ids, {r.name: r.field for r in req})
        if d.item_subgroup:
            vocab = profile.vocab[d.item_subgroup]
            if len(vocab) > MAX_SUBGROUPS:
                raise DataError(
                    f"data.item_subgroup column {d.item_subgroup!r} has {len(vocab)} distinct values; "
                    f"subgroup effects allow at most {MAX_SUBGROUPS}"
                )
            layout.subgroup_vocab = vocab

        for col, field_name in ((d.treated, "data.treated"), (d.exposed, "data.exposed")):
            mc = profile.moments[col]
            if mc.lo < 0 or mc.hi > 1:
                raise DataError(
                    f"column {col!r} (named by {field_name}) must hold only 0 and 1; "
                    f"found values from {mc.lo:g} to {mc.hi:g}"
                )
        parts = shuffle_partitions(profile.n_rows)
        # Exactly one exposure per query, and the largest consideration set.
        q = merge_rows(
            ds.groupby(d.query, num_partitions=parts)
            .aggregate(Count(), Sum(d.exposed))
            .map_batches(
                query_summary, fn_kwargs={"query": d.query, "exposed": d.exposed},
                batch_format="numpy", batch_size=None,
            )
            .take_all()
        )  # fmt: skip
        n_queries, sizes = int(q["queries"]), int(q["max_size"])
        if q["not_one"]:
            raise DataError(
                f"{int(q['not_one'])} of {n_queries} queries do not have exactly one exposed item "
                f"(column {d.exposed!r}, named by data.exposed); e.g. query {q['example']} has "
                f"{q['example_exposures']:g} exposure(s). Each query must expose exactly one item"
            )
        # Treatment is assigned per item: it must not vary across the item's rows.
        it = merge_rows(
            ds.groupby(d.item, num_partitions=parts)
            .aggregate(Min(d.treated), Max(d.treated))
            .map_batches(
                item_summary, fn_kwargs={"item": d.item, "treated": d.treated},
                batch_format="numpy", batch_size=None,
            )
            .take_all()
        )  # fmt: skip
        items, treated_items = int(it["items"]), int(it["treated"])
        if it["varying"]:
            raise DataError(
                f"column {d.treated!r} (named by data.treated) varies within {int(it['varying'])} of "
                f"{items} items (e.g. item {it['example']}); treatment is assigned once per item "
                "and must be the same on every row of an item"
            )

        layout.k_max = int(sizes)
        queries = (
            ds.groupby(d.query, num_partitions=parts)
            .map_groups(query_row, fn_kwargs={"layout": layout}, batch_format="numpy")
            .materialize()
        )
        flags = merge_rows(
            queries.map_batches(
                flag_sums, fn_kwargs={"val_fraction": spec.train.val_fraction}, batch_format="numpy"
            ).take_all()
        )
        if flags.get("bad_binary", 0):
            raise DataError(
                f"columns {d.treated!r} (data.treated) and {d.exposed!r} (data.exposed) must hold "
                f"only 0 and 1; found {flags['bad_binary']} other value(s)"
            )
        if flags.get("viewer_varies", 0):
            raise DataError(
                f"viewer features {d.viewer_features} vary within {flags['viewer_varies']} queries; "
                "they describe the query's viewer and must be the same on all its rows"
            )
        if flags.get("y_not_finite", 0):
            raise DataError(
                f"column {d.outcome!r} (named by data.outcome) is null, NaN or infinite on "
                f"{flags['y_not_finite']} exposed row(s); the outcome of the exposed item is required"
            )
        binary = self._outcome_binary(spec, flags.get("y_not_binary", 0))
        m = profile.moments
        prepared = InterferencePrepared(
            path=d.path,
            queries=queries,
            n_queries=int(n_queries),
            n_rows=profile.n_rows,
            layout=layout,
            binary=binary,
            x_mean=[m[c].mean for c in d.viewer_features],
            x_scale=[m[c].std or 1.0 for c in d.viewer_features],
            z_mean=[m[c].mean for c in d.item_features],
            z_scale=[m[c].std or 1.0 for c in d.item_features],
            items=int(items),
            val_queries=int(flags["val_queries"]),
            treated_items=treated_items,
            truth=sim.read_truth(d.path) if "://" not in d.path else None,
            prepare_seconds=time.perf_counter() - t0,
        )
        log.info(
            "[prepare] %s: %d rows, %d queries (sets of up to %d items), %d items (%d treated), "
            "%s outcome, %.1fs",
            d.path, profile.n_rows, n_queries, layout.k_max, items, treated_items,
            "binary" if binary else "continuous", prepared.prepare_seconds,
        )  # fmt: skip
        return prepared

    @staticmethod
    def _outcome_binary(spec: InterferenceSpec, n_not_binary: int) -> bool:
        kind = spec.data.outcome_type
        if kind == "binary" and n_not_binary:
            raise DataError(
                f"data.outcome_type is binary but column {spec.data.outcome!r} has "
                f"{n_not_binary} exposed value(s) other than 0 and 1"
            )
        if kind == "auto":
            return n_not_binary == 0
        return kind == "binary"

    def make_plugin(
        self, spec: InterferenceSpec, prepared: InterferencePrepared
    ) -> InterferencePlugin:
        return InterferencePlugin(
            d_x=len(spec.data.viewer_features),
            d_z=len(spec.data.item_features),
            k_max=prepared.layout.k_max,
            folds=spec.estimate.folds,
            val_fraction=spec.train.val_fraction,
            binary=prepared.binary,
            choice_net=spec.model.choice_net.config(),
            response_net=spec.model.response_net.config(),
            pdl_net=spec.model.pdl_net.config(),
            x_mean=prepared.x_mean,
            x_scale=prepared.x_scale,
            z_mean=prepared.z_mean,
            z_scale=prepared.z_scale,
            cache_in_memory=self._cache(spec, prepared),
        )

    @staticmethod
    def _cache(spec: InterferenceSpec, prepared: InterferencePrepared) -> bool:
        if spec.data.cache != "auto":
            return spec.data.cache == "always"
        d_z, d_x = len(spec.data.item_features), len(spec.data.viewer_features)
        per_query = prepared.layout.k_max * (4 * d_z + 9) + 4 * d_x + 24
        return prepared.n_queries * per_query < CACHE_BYTES

    def db_settings(self, spec: InterferenceSpec, prepared: InterferencePrepared) -> est.DBSettings:
        e = spec.estimate
        return est.DBSettings(
            p=spec.p_treat,
            outcome="binary" if prepared.binary else "continuous",
            hessian=e.hessian,
            hessian_draws=e.hessian_draws,
            exact_max_k=e.exact_max_set_size,
            policy_q=tuple(e.policy_q),
            n_groups=0
            if prepared.layout.subgroup_vocab is None
            else len(prepared.layout.subgroup_vocab),
            seed=e.seed,
        )

    # -- execute ----------------------------------------------------------------------
    def execute(
        self,
        spec: InterferenceSpec,
        prepared: InterferencePrepared,
        run: RunDir,
        callbacks: list | None = None,
    ) -> dict[str, Any]:
        from distributed_hte.train.trainer import fit

        plugin = self.make_plugin(spec, prepared)
        vf = spec.train.val_fraction
        queries = prepared.queries
        datasets = {"train": queries.map_batches(split_side, fn_kwargs={"vf": vf, "keep": "train"})}
        if vf > 0:
            datasets["val"] = queries.map_batches(split_side, fn_kwargs={"vf": vf, "keep": "val"})
        n_train = prepared.n_queries - (prepared.val_queries if vf > 0 else 0)
        log.info(
            "[fit] %d cross-fitting members × (choice, response, PDL) nets, %d workers%s, "
            "%d epochs, %d training queries",
            plugin.folds, spec.scaling.num_workers, " on GPU" if spec.scaling.use_gpu else "",
            spec.train.epochs, n_train,
        )  # fmt: skip
        t0 = time.perf_counter()
        result = fit(spec, plugin, datasets, n_train, run.path, callbacks=callbacks)
        fit_seconds = time.perf_counter() - t0
        model = plugin.build_model()
        model.load_state_dict(
            torch.load(result.best_model_path, map_location="cpu", weights_only=False)
        )
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        state = buf.getvalue()
        torch.save(
            {"plugin": plugin, "state": state, "layout": prepared.layout},
            run.file("model", "predictor.pt"),
        )

        t1 = time.perf_counter()
        settings = self.db_settings(spec, prepared)
        out_dir = run.file("influence")
        if out_dir.exists():
            shutil.rmtree(out_dir)  # a resumed run recomputes it
        queries.map_batches(
            estimation_batch,
            fn_kwargs={
                "plugin": plugin,
                "state": state,
                "settings": settings,
                "truth": prepared.layout.truth,
            },
            batch_format="numpy",
            batch_size=spec.estimate.batch_queries,
        ).write_parquet(str(out_dir))
        estimates, extra = self._aggregate(spec, prepared, settings, out_dir)
        estimate_seconds = time.perf_counter() - t1

        write_json(run.file("estimates.json"), estimates)
        log.info("[estimate] %s", format_table(estimates, prepared.truth))
        metrics: dict[str, Any] = {
            "estimates": {k: v for k, v in estimates.items() if k != "diagnostics"},
            "truth": extra.get("truth", {}),
            "recovery": extra.get("recovery", {}),
            "training": {
                "epochs_run": int(result.final_metrics.get("epoch", 0)),
                "best_epoch": int(result.final_metrics.get("best_epoch", 0)),
                "best_val_loss": result.final_metrics.get("best_val_loss"),
                "val_choice_loss": result.final_metrics.get("val_choice_loss"),
                "val_response_loss": result.final_metrics.get("val_response_loss"),
                "val_pdl_loss": result.final_metrics.get("val_pdl_loss"),
                "fit_seconds": fit_seconds,
                "estimate_seconds": estimate_seconds,
                "prepare_seconds": prepared.prepare_seconds,
                "num_workers": spec.scaling.num_workers,
                "queries": prepared.n_queries,
                "training_queries": n_train,
            },
        }
        for k in ("DB", "plug_in"):
            metrics["estimates"][k] = {
                kk: vv for kk, vv in estimates[k].items() if not isinstance(vv, dict | list)
            }
        write_json(run.file("metrics.json"), metrics)
        import pandas as pd

        if result.history:
            pd.DataFrame(result.history).to_parquet(run.file("history.parquet"))
        self._plot(spec, estimates, prepared.truth, run)
        return metrics

    def _aggregate(
        self,
        spec: InterferenceSpec,
        prepared: InterferencePrepared,
        settings: est.DBSettings,
        out_dir: Path,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Stream the per-query values and reduce them to estimates and diagnostics."""
        level = spec.estimate.ci_level
        dataset = pads.dataset(str(out_dir), format="parquet")
        cols = dataset.schema.names
        sums: dict[str, dict[str, float]] = {}
        hajek: dict[str, float] = {}
        diag: dict[str, float] = {}
        fold_sums: dict[int, dict[str, float]] = {}
        x_cols = [c for c in cols if c.startswith("x") and c[1:].isdigit()]
        for rb in dataset.to_batches(batch_size=262_144):
            b = {c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names}
            for c in cols:
                if c.startswith(("psi:", "theta:", "term:")):
                    est.add_sums(sums.setdefault(c, {}), _np_sums(b[c]))
            we, y = b["exposed_treated"], b["y"]
            est.add_sums(
                hajek,
                {
                    "n_t": float(we.sum()),
                    "n_c": float((1 - we).sum()),
                    "sy_t": float((we * y).sum()),
                    "sy_c": float(((1 - we) * y).sum()),
                    "syy_t": float((we * y * y).sum()),
                    "syy_c": float(((1 - we) * y * y).sum()),
                },
            )
            add = {
                "model_treated_share": float(b["model_treated_share"].sum()),
                "ridge_queries": float((b["ridge"] > 0).sum()),
                "max_size": float(b["size"].max(initial=0)),
            }
            for c in x_cols:
                x = b[c]
                for side, m in (("t", we == 1), ("c", we == 0)):
                    add[f"{c}:{side}:s"] = float(x[m].sum())
                    add[f"{c}:{side}:ss"] = float((x[m] ** 2).sum())
            for c in cols:
                if c.startswith("sum:"):
                    add[c] = float(b[c].sum())
            for k, v in add.items():
                diag[k] = max(diag.get(k, 0.0), v) if k == "max_size" else diag.get(k, 0.0) + v
            for f in np.unique(b["fold"]):
                m = b["fold"] == f
                fs = fold_sums.setdefault(int(f), {})
                est.add_sums(fs, _np_sums(b["psi:gte"][m]))

        def mean_est(col: str) -> dict[str, float]:
            return est.mean_estimate(sums[col], level).to_dict()

        n = sums["psi:gte"]["n"]
        db = mean_est("psi:gte")
        db["n_queries"] = int(n)
        db["mean_correction"] = (sums["psi:gte"]["s"] - sums["theta:gte"]["s"]) / n
        db["policy_values"] = {
            name[len("V_q=") :]: mean_est(f"psi:{name}")
            for name in est.target_names(settings)
            if name.startswith("V_q=")
        }
        if settings.n_groups:
            vocab = prepared.layout.subgroup_vocab
            db["subgroups"] = {
                str(vocab[g]): mean_est(f"psi:group={g}") for g in range(settings.n_groups)
            }
            db["subgroups_column"] = spec.data.item_subgroup
        db["by_fold"] = {
            str(f): est.mean_estimate(s, level).to_dict() for f, s in sorted(fold_sums.items())
        }
        plug = mean_est("theta:gte")
        plug["policy_values"] = {
            name[len("V_q=") :]: mean_est(f"theta:{name}")
            for name in est.target_names(settings)
            if name.startswith("V_q=")
        }
        estimates: dict[str, Any] = {"DB": db}
        estimates["HT_DIM"] = mean_est("term:HT_DIM")
        estimates["HA_DIM"] = est.hajek_estimate(hajek, level).to_dict()
        for name in ("PDL", "IPW", "AIPW"):
            estimates[name] = mean_est(f"term:{name}")
        estimates["plug_in"] = plug
        estimates["diagnostics"] = self._diagnostics(
            spec, prepared, settings, hajek, diag, x_cols, n
        )
        extra: dict[str, Any] = {}
        if prepared.truth and "gte" in prepared.truth:
            z = est.z_value(level)
            tv = prepared.truth["gte"]["value"]
            extra["truth"] = {"gte": tv}
            for name in ["DB", *BENCHMARKS, "plug_in"]:
                e = estimates[name]
                extra["truth"][f"{name}_error"] = e["estimate"] - tv
                extra["truth"][f"{name}_covers"] = bool(abs(e["estimate"] - tv) <= z * e["se"])
            for q, v in db["policy_values"].items():
                t = prepared.truth.get(f"V_q={q}")
                if t is not None:
                    extra["truth"][f"V_q={q}_error"] = v["estimate"] - t["value"]
        recovery = {}
        for c in prepared.layout.truth:
            s = {k.split(":")[-1]: v for k, v in diag.items() if k.startswith(f"sum:{c}:")}
            if s.get("n", 0) > 2:
                cov = s["ab"] - s["a"] * s["b"] / s["n"]
                va = s["aa"] - s["a"] ** 2 / s["n"]
                vb = s["bb"] - s["b"] ** 2 / s["n"]
                if va > 0 and vb > 0:
                    recovery[f"{c.replace('_true', '')}_corr"] = cov / math.sqrt(va * vb)
        if recovery:
            extra["recovery"] = recovery
        return estimates, extra

    def _diagnostics(self, spec, prepared, settings, hajek, diag, x_cols, n) -> dict[str, Any]:
        p = settings.p
        share = hajek["n_t"] / n
        se = math.sqrt(p * (1 - p) / n)
        out: dict[str, Any] = {
            "queries": int(n),
            "rows": prepared.n_rows,
            "max_set_size": prepared.layout.k_max,
            "outcome_type": "binary" if prepared.binary else "continuous",
            "folds": spec.estimate.folds,
            "hessian": "exact" if settings.use_exact(prepared.layout.k_max) else "monte_carlo",
            "hessian_draws": None
            if settings.use_exact(prepared.layout.k_max)
            else settings.hessian_draws,
            "hessian_ridge_queries": int(diag.get("ridge_queries", 0)),
            "assignment": {
                "items": prepared.items,
                "treated_items": prepared.treated_items,
                "treated_share": prepared.treated_items / max(prepared.items, 1),
                "p_treat": p,
            },
            "exposure": {
                "treated_share": share,
                "p_treat": p,
                "difference": share - p,
                # Under no interference the exposed item is treated with probability p.
                "z_vs_p": (share - p) / se if se > 0 else None,
                "model_treated_share": diag.get("model_treated_share", 0.0) / n,
            },
            "viewer_features": {},
        }
        nt, nc = hajek["n_t"], hajek["n_c"]
        for j, c in enumerate(x_cols):
            name = spec.data.viewer_features[j]
            if nt < 2 or nc < 2:
                continue
            mt, mc = diag[f"{c}:t:s"] / nt, diag[f"{c}:c:s"] / nc
            vt = max(diag[f"{c}:t:ss"] / nt - mt**2, 0.0)
            vc = max(diag[f"{c}:c:ss"] / nc - mc**2, 0.0)
            se_d = math.sqrt(vt / nt + vc / nc)
            out["viewer_features"][name] = {
                "mean_treated_exposures": mt,
                "mean_control_exposures": mc,
                "difference": mt - mc,
                "relative_difference": (mt - mc) / mc if mc != 0 else None,
                "se": se_d,
                "t": (mt - mc) / se_d if se_d > 0 else None,
            }
        return out

    def _plot(self, spec, estimates, truth, run: RunDir) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = ["DB", "plug_in", *BENCHMARKS]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for i, name in enumerate(names):
            e = estimates[name]
            ax.errorbar(
                e["estimate"],
                i,
                xerr=[[e["estimate"] - e["ci_low"]], [e["ci_high"] - e["estimate"]]],
                fmt="o",
                color="C0" if name == "DB" else "C7",
                capsize=3,
            )
        if truth and "gte" in truth:
            ax.axvline(truth["gte"]["value"], color="C3", ls="--", label="true GTE")
            ax.legend(loc="lower right")
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel(f"global treatment effect ({spec.estimate.ci_level:.0%} CI)")
        ax.set_title(f"{spec.name}: estimators")
        fig.tight_layout()
        fig.savefig(run.file("plots", "estimates.png"), dpi=110)
        plt.close(fig)

    # -- predict ----------------------------------------------------------------------
    def predict(self, run_dir: Path, data_path: str, out_path: Path) -> dict[str, Any]:
        """Score long-format rows: b̂, τ̂, μ̂ and exposure probabilities per query.

        ``p_control`` / ``p_treatment``: probability that the row's item is exposed when
        every item is in control / treated; ``p_observed`` under the rows' own
        ``treated`` values when that column is present. Averaged over the cross-fitting
        members (b̂ centred within each query first: it is identified only up to a
        constant per query).
        """
        bundle_path = Path(run_dir) / "model" / "predictor.pt"
        if not (Path(run_dir) / "COMPLETE").exists() or not bundle_path.exists():
            raise RunDirError(
                f"{run_dir} is not a complete interference run (no COMPLETE marker or model/predictor.pt)"
            )
        bundle = torch.load(bundle_path, map_location="cpu", weights_only=False)
        plugin: InterferencePlugin = bundle["plugin"]
        layout: Layout = bundle["layout"]
        req = [ColumnRequirement(layout.query, "the trained model", "id")]
        req += [
            ColumnRequirement(c, "the trained model", "numeric")
            for c in [*layout.viewer_features, *layout.item_features]
        ]
        summary = check_schema(data_path, req)
        out_path = Path(out_path).expanduser().resolve()
        if out_path.exists():
            raise RunDirError(
                f"--out {out_path} already exists; predictions never overwrite a path"
            )
        cols = [layout.query, *layout.viewer_features, *layout.item_features]
        keep = [c for c in (layout.item, layout.treated) if c in summary.schema.names]
        cols = list(dict.fromkeys(cols + keep))
        tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        try:
            (
                _read_parquet(data_path, cols)
                .groupby(layout.query, num_partitions=shuffle_partitions(summary.n_rows))
                .map_groups(
                    predict_group,
                    fn_kwargs={
                        "plugin": plugin,
                        "state": bundle["state"],
                        "layout": layout,
                        "keep": keep,
                    },
                    batch_format="numpy",
                )
                .write_parquet(str(tmp))
            )
            os.replace(tmp, out_path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        n = pads.dataset(str(out_path), format="parquet").count_rows()
        return {"rows": n, "seconds": time.perf_counter() - t0, "out": str(out_path)}


def predict_group(
    group: dict[str, np.ndarray],
    plugin: InterferencePlugin,
    state: bytes,
    layout: Layout,
    keep: list[str],
) -> dict[str, np.ndarray]:
    """``map_groups`` function of ``predict``: one query's rows, scored."""
    model = _cached_model(plugin, state)
    n = len(group[layout.query])
    x = np.array([[float(np.asarray(group[c])[0]) for c in layout.viewer_features]], np.float32)
    z = np.stack([np.asarray(group[c], np.float32) for c in layout.item_features], axis=-1)[None]
    with torch.no_grad():
        b, tau, r = model.pair_outputs(torch.from_numpy(x), torch.from_numpy(z))
    b, tau, r = b[:, 0].double(), tau[:, 0].double(), r[:, 0].double()  # (M, n)
    b = b - b.mean(dim=1, keepdim=True)
    mu = torch.sigmoid(r) if plugin.binary else r
    out = {c: np.asarray(group[c]) for c in [layout.query, *keep]}
    out.update(
        b_hat=b.mean(0).numpy(),
        tau_hat=tau.mean(0).numpy(),
        mu_hat=mu.mean(0).numpy(),
        p_control=torch.softmax(b, dim=1).mean(0).numpy(),
        p_treatment=torch.softmax(b + tau, dim=1).mean(0).numpy(),
    )
    if layout.treated in group:
        w = torch.as_tensor(np.asarray(group[layout.treated], np.float64))
        out["p_observed"] = torch.softmax(b + w * tau, dim=1).mean(0).numpy()
    assert all(len(v) == n for v in out.values())
    return out


def format_table(estimates: dict[str, Any], truth: dict | None = None) -> str:
    """The estimates as a readable table (for the run log)."""
    lines = [
        "global treatment effect (all items treated vs none)",
        f"  {'estimator':<10} {'estimate':>10} {'se':>9} {'ci_low':>10} {'ci_high':>10}",
    ]
    for name in ["DB", "plug_in", *BENCHMARKS]:
        e = estimates[name]
        lines.append(
            f"  {name:<10} {e['estimate']:>10.4f} {e['se']:>9.4f} {e['ci_low']:>10.4f} {e['ci_high']:>10.4f}"
        )
    for q, e in estimates["DB"].get("policy_values", {}).items():
        lines.append(
            f"  {'V(q=' + q + ')':<10} {e['estimate']:>10.4f} {e['se']:>9.4f} {e['ci_low']:>10.4f} {e['ci_high']:>10.4f}"
        )
    for g, e in estimates["DB"].get("subgroups", {}).items():
        label = f"group {g}"
        lines.append(
            f"  {label:<10} {e['estimate']:>10.4f} {e['se']:>9.4f} {e['ci_low']:>10.4f} {e['ci_high']:>10.4f}"
        )
    if truth and "gte" in truth:
        lines.append(f"  true GTE (simulation): {truth['gte']['value']:.4f}")
    ex = estimates["diagnostics"]["exposure"]
    lines.append(
        f"  exposures to treated items: {ex['treated_share']:.3f} (assignment p = {ex['p_treat']:.3f})"
    )
    return "\n".join(lines)
