"""Ground-truth simulator for ``fe_hte`` (the seed's design).

    revenue = beta(X) * clicks + g(Z) + user_fe + vendor_fe + period_fe + c + noise

* users carry features ``u0, u1``; vendors ``v0, v1``; each row a context ``x0`` (enters
  beta) and ``z0, z1, z2`` (enter g). g depends on row-level features only, so it is
  identified next to the fixed effects.
* clicks ~ Poisson(exp(0.8 + 0.25 user_fe + 0.2 vendor_fe + 0.1 u0)): treatment intensity
  is confounded with the fixed effects, so a model without them is biased.
* ids are sparse integers (not 0..n-1), as in production data.

Rows are generated in chunks by Ray tasks, each writing one parquet file, so memory is
flat in the number of rows. Chunk ``i`` draws from ``SeedSequence(seed, spawn_key=(1, i))``:
the output is identical for a given seed and chunk size, whatever the parallelism.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from distributed_hte.simulate.chunks import atomic_folder, chunk_sizes, write_chunks
from distributed_hte.simulate.marker import SIMULATION_MARKER, simulation_marker

BETA_FEATURES = ["u0", "u1", "v0", "v1", "x0"]
G_FEATURES = ["z0", "z1", "z2"]
FIXED_EFFECTS = ["user_id", "vendor_id", "period"]
TRUE_INTERCEPT = 2.0


@dataclass(frozen=True)
class FeHteSimConfig:
    """Size and shape of one simulated dataset."""

    n_rows: int = 500_000
    n_users: int = 10_000
    n_vendors: int = 2_000
    n_periods: int = 50
    beta: Literal["linear", "nonlinear"] = "linear"
    g: Literal["linear", "nonlinear"] = "linear"
    noise_sd: float = 0.5
    seed: int = 0
    chunk_rows: int = 1_000_000


@dataclass(frozen=True)
class World:
    """Everything that is fixed across rows: ids, entity features and true effects."""

    user_ids: np.ndarray  # (n_users,) int64
    vendor_ids: np.ndarray  # (n_vendors,) int64
    period_ids: np.ndarray  # (n_periods,) int64
    user_x: np.ndarray  # (n_users, 2) float32
    vendor_x: np.ndarray  # (n_vendors, 2) float32
    user_fe: np.ndarray  # (n_users,) zero mean
    vendor_fe: np.ndarray  # (n_vendors,) zero mean
    period_fe: np.ndarray  # (n_periods,) zero mean


def make_world(cfg: FeHteSimConfig) -> World:
    """Draw the entities and their true fixed effects (zero mean per family)."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0,)))
    user_ids = np.sort(rng.choice(10**9, size=cfg.n_users, replace=False)).astype(np.int64)
    vendor_ids = np.sort(rng.choice(10**7, size=cfg.n_vendors, replace=False)).astype(np.int64)
    period_ids = np.arange(cfg.n_periods, dtype=np.int64) + 202_401
    user_fe = rng.normal(0.0, 1.0, cfg.n_users)
    vendor_fe = rng.normal(0.0, 0.8, cfg.n_vendors)
    t = np.arange(cfg.n_periods)
    period_fe = 0.5 * np.sin(2 * np.pi * t / max(cfg.n_periods, 2) * 2) + rng.normal(
        0, 0.2, cfg.n_periods
    )
    return World(
        user_ids=user_ids,
        vendor_ids=vendor_ids,
        period_ids=period_ids,
        user_x=rng.normal(size=(cfg.n_users, 2)).astype(np.float32),
        vendor_x=rng.normal(size=(cfg.n_vendors, 2)).astype(np.float32),
        user_fe=user_fe - user_fe.mean(),
        vendor_fe=vendor_fe - vendor_fe.mean(),
        period_fe=period_fe - period_fe.mean(),
    )


def true_beta(x: dict[str, np.ndarray], form: str) -> np.ndarray:
    """beta(X) from the feature columns ``u0, u1, v0, v1, x0`` (each ``(n,)``)."""
    u0, u1, v0, v1, x0 = (x[k].astype(np.float64) for k in BETA_FEATURES)
    if form == "linear":
        return 1.0 + 0.5 * u0 - 0.3 * u1 + 0.4 * v0 + 0.2 * v1 + 0.3 * x0
    return (
        1.0
        + 0.6 * np.sin(1.5 * u0)
        + 0.3 * (u1**2 - 1.0)
        + 0.4 * np.tanh(2.0 * v0)
        + 0.3 * u0 * v1
        + 0.25 * np.abs(x0)
    )


def true_g(x: dict[str, np.ndarray], form: str) -> np.ndarray:
    """g(Z) from the row-level columns ``z0, z1, z2`` (each ``(n,)``)."""
    z0, z1, z2 = (x[k].astype(np.float64) for k in G_FEATURES)
    if form == "linear":
        return 0.8 * z0 - 0.5 * z1 + 0.3 * z2
    return 0.8 * np.sin(z0) + 0.3 * (z1**2 - 1.0) + 0.3 * z0 * z2


def simulate_chunk(world: World, cfg: FeHteSimConfig, index: int, n_rows: int) -> pa.Table:
    """Generate chunk ``index`` with ``n_rows`` rows as an Arrow table."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1, index)))
    u = rng.integers(0, len(world.user_ids), n_rows)
    v = rng.integers(0, len(world.vendor_ids), n_rows)
    p = rng.integers(0, len(world.period_ids), n_rows)
    cols: dict[str, np.ndarray] = {
        "u0": world.user_x[u, 0],
        "u1": world.user_x[u, 1],
        "v0": world.vendor_x[v, 0],
        "v1": world.vendor_x[v, 1],
    }
    for name in ["x0", *G_FEATURES]:
        cols[name] = rng.standard_normal(n_rows, dtype=np.float32)
    fe = world.user_fe[u] + world.vendor_fe[v] + world.period_fe[p]
    rate = np.exp(0.8 + 0.25 * world.user_fe[u] + 0.2 * world.vendor_fe[v] + 0.1 * cols["u0"])
    clicks = rng.poisson(rate).astype(np.int32)
    beta = true_beta(cols, cfg.beta)
    g = true_g(cols, cfg.g)
    revenue = beta * clicks + g + fe + TRUE_INTERCEPT + rng.normal(0.0, cfg.noise_sd, n_rows)
    return pa.table(
        {
            "user_id": world.user_ids[u],
            "vendor_id": world.vendor_ids[v],
            "period": world.period_ids[p],
            "clicks": clicks,
            "revenue": revenue,
            **cols,
            "beta_true": beta,
            "g_true": g,
        }
    )


def simulate_fe_hte(cfg: FeHteSimConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Write ``out/data/part-*.parquet``, ``out/truth/<fe>.parquet`` and ``out/simulation.json``.

    Runs on the current Ray (``ray.init`` must have been called). The output appears
    atomically: it is written to a temporary sibling folder and renamed at the end.
    """
    started = time.perf_counter()
    with atomic_folder(out) as tmp:
        (tmp / "data").mkdir()
        (tmp / "truth").mkdir()
        world = make_world(cfg)
        sizes = chunk_sizes(cfg.n_rows, cfg.chunk_rows)
        write_chunks(
            partial(_chunk, cfg=cfg), world, sizes, tmp / "data", "simulate fe_hte", progress
        )
        for name, ids, effect in [
            ("user_id", world.user_ids, world.user_fe),
            ("vendor_id", world.vendor_ids, world.vendor_fe),
            ("period", world.period_ids, world.period_fe),
        ]:
            pq.write_table(
                pa.table({"id": ids, "effect": effect}), tmp / "truth" / f"{name}.parquet"
            )
        meta = simulation_marker(
            "fe_hte",
            asdict(cfg),
            true_intercept=TRUE_INTERCEPT,
            beta_features=BETA_FEATURES,
            g_features=G_FEATURES,
            fixed_effects=FIXED_EFFECTS,
            n_files=len(sizes),
            seconds=round(time.perf_counter() - started, 3),
        )
        (tmp / SIMULATION_MARKER).write_text(json.dumps(meta, indent=2))
    return Path(out)


def _chunk(world: World, index: int, n_rows: int, cfg: FeHteSimConfig) -> pa.Table:
    return simulate_chunk(world, cfg, index, n_rows)


def read_truth(truth_dir: str | Path, column: str) -> pd.Series | None:
    """True fixed effects of one family as a Series indexed by id, or None if absent."""
    path = Path(truth_dir) / f"{column}.parquet"
    if not path.exists():
        return None
    df = pq.read_table(path).to_pandas()
    return pd.Series(df["effect"].to_numpy(), index=df["id"].to_numpy(), name=column)
