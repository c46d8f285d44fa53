"""``fe_hte`` data laid out as a warehouse exports it: (buyer, seller, week) rows by date.

    revenue = beta(X) * clicks + g(Z) + buyer_fe + seller_fe + week_fe + c + noise

The functional forms are the seed simulator's (:func:`~distributed_hte.simulate.fe_hte.true_beta`,
:func:`~distributed_hte.simulate.fe_hte.true_g`; buyers carry ``u0, u1``, sellers ``v0, v1``,
rows ``x0, z0, z1, z2``). What differs is the layout and the shape of the id graph:

* ids are sparse large integers (around 10^9), weeks are coded ``yyyyww``;
* group sizes are skewed: buyer activity is lognormal, seller popularity Zipf, and
  each buyer buys mostly from a few favourite sellers, so the buyer × seller cross-tab
  is sparse, as in real marketplaces;
* clicks ~ Poisson(exp(0.8 + 0.25 buyer_fe + 0.2 seller_fe + 0.1 u0)): confounded with
  the fixed effects;
* ``<out>/data/`` holds one parquet file per ``weeks_per_file`` consecutive weeks, rows
  in date order (by ``event_time``) within each file, plus a ``_SUCCESS`` marker and a
  ``README.txt`` that readers must skip; ``<out>/truth/<column>.parquet`` (``id``,
  ``effect``) and ``<out>/simulation.json`` as the seed simulator writes them.

Rows are generated a week at a time, in chunks of at most ``chunk_rows``, each a row
group appended to its file, so memory is flat in the number of rows. Chunk ``j`` of week
``w`` draws from ``SeedSequence(seed, spawn_key=(1, w, j))``: the output depends only on
the configuration. Runs in the calling process (no Ray needed).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distributed_hte.simulate.chunks import atomic_folder, chunk_sizes
from distributed_hte.simulate.fe_hte import BETA_FEATURES, G_FEATURES, true_beta, true_g
from distributed_hte.simulate.marker import simulation_marker

FIXED_EFFECTS = ["buyer", "seller", "week"]
TRUE_INTERCEPT = 2.0
SCHEMA_VERSION = 1
N_FAVOURITES = 5  # sellers each buyer mostly buys from
P_FAVOURITE = 0.7  # share of a buyer's rows with one of its favourites
WEEK_SECONDS = 7 * 24 * 3600
EPOCH_2026 = 1_767_225_600  # 2026-01-01T00:00:00Z, the start of week yyyy01


@dataclass(frozen=True)
class WarehouseConfig:
    """Size and shape of one warehouse-layout dataset."""

    n_rows: int = 400_000
    n_buyers: int = 3_000
    n_sellers: int = 600
    n_weeks: int = 30
    first_week: int = 202601
    weeks_per_file: int = 5
    buyer_size_sigma: float = 1.0  # lognormal sd of buyer activity
    seller_zipf: float = 1.1  # seller popularity ∝ rank^-seller_zipf
    beta: Literal["linear", "nonlinear"] = "linear"
    g: Literal["linear", "nonlinear"] = "linear"
    noise_sd: float = 0.5
    seed: int = 0
    chunk_rows: int = 500_000

    def __post_init__(self) -> None:
        week = self.first_week % 100
        if not 1 <= week or week + self.n_weeks - 1 > 52:
            raise ValueError(
                f"weeks {self.first_week}..+{self.n_weeks - 1} leave the year (yyyyww, ww 1..52)"
            )
        if self.n_weeks % self.weeks_per_file:
            raise ValueError(
                f"n_weeks={self.n_weeks} is not a multiple of weeks_per_file={self.weeks_per_file}"
            )
        if min(self.n_rows, self.n_buyers, self.n_sellers, self.chunk_rows) < 1:
            raise ValueError("n_rows, n_buyers, n_sellers and chunk_rows must be positive")


@dataclass(frozen=True)
class Marketplace:
    """Everything fixed across rows: ids, attributes, true effects, who buys from whom."""

    buyer_ids: np.ndarray  # (n_buyers,) int64, sparse
    seller_ids: np.ndarray  # (n_sellers,) int64, sparse
    weeks: np.ndarray  # (n_weeks,) int64 yyyyww
    buyer_x: np.ndarray  # (n_buyers, 2) float32: u0, u1
    seller_x: np.ndarray  # (n_sellers, 2) float32: v0, v1
    buyer_fe: np.ndarray  # (n_buyers,) zero mean
    seller_fe: np.ndarray  # (n_sellers,) zero mean
    week_fe: np.ndarray  # (n_weeks,) zero mean
    buyer_weight: np.ndarray  # (n_buyers,) activity, sums to 1
    seller_weight: np.ndarray  # (n_sellers,) popularity, sums to 1
    favourites: np.ndarray  # (n_buyers, N_FAVOURITES) seller indices


def make_marketplace(cfg: WarehouseConfig) -> Marketplace:
    """Draw the entities, their true effects and the buyer → seller preferences."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0,)))
    buyer_ids = np.sort(rng.choice(9 * 10**9, cfg.n_buyers, replace=False) + 10**9)
    seller_ids = np.sort(rng.choice(9 * 10**8, cfg.n_sellers, replace=False) + 10**8)
    weeks = np.arange(cfg.n_weeks, dtype=np.int64) + cfg.first_week
    buyer_fe = rng.normal(0.0, 1.0, cfg.n_buyers)
    seller_fe = rng.normal(0.0, 0.8, cfg.n_sellers)
    t = np.arange(cfg.n_weeks)
    week_fe = 0.5 * np.sin(2 * np.pi * t / 13) + 0.02 * t + rng.normal(0, 0.1, cfg.n_weeks)
    activity = rng.lognormal(0.0, cfg.buyer_size_sigma, cfg.n_buyers)
    popularity = rng.permutation(np.arange(1, cfg.n_sellers + 1) ** -cfg.seller_zipf)
    popularity /= popularity.sum()
    return Marketplace(
        buyer_ids=buyer_ids.astype(np.int64),
        seller_ids=seller_ids.astype(np.int64),
        weeks=weeks,
        buyer_x=rng.normal(size=(cfg.n_buyers, 2)).astype(np.float32),
        seller_x=rng.normal(size=(cfg.n_sellers, 2)).astype(np.float32),
        buyer_fe=buyer_fe - buyer_fe.mean(),
        seller_fe=seller_fe - seller_fe.mean(),
        week_fe=week_fe - week_fe.mean(),
        buyer_weight=activity / activity.sum(),
        seller_weight=popularity,
        favourites=rng.choice(cfg.n_sellers, (cfg.n_buyers, N_FAVOURITES), p=popularity),
    )


def rows_per_week(cfg: WarehouseConfig) -> list[int]:
    """Rows of each week: traffic grows by half over the period; sums to ``n_rows``."""
    w = np.linspace(1.0, 1.5, cfg.n_weeks)
    exact = cfg.n_rows * w / w.sum()
    rows = np.floor(exact).astype(np.int64)
    rows[np.argsort(rows - exact)[: cfg.n_rows - rows.sum()]] += 1
    return [int(r) for r in rows]


def simulate_rows(
    market: Marketplace, cfg: WarehouseConfig, week: int, chunk: int, n_rows: int
) -> pa.Table:
    """Rows ``chunk`` of week index ``week`` (``n_rows`` of them), sorted by event time."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1, week, chunk)))
    b = rng.choice(len(market.buyer_ids), n_rows, p=market.buyer_weight)
    fav = market.favourites[b, rng.integers(0, N_FAVOURITES, n_rows)]
    other = rng.choice(len(market.seller_ids), n_rows, p=market.seller_weight)
    s = np.where(rng.random(n_rows) < P_FAVOURITE, fav, other)
    cols: dict[str, np.ndarray] = {
        "u0": market.buyer_x[b, 0],
        "u1": market.buyer_x[b, 1],
        "v0": market.seller_x[s, 0],
        "v1": market.seller_x[s, 1],
    }
    for name in ["x0", *G_FEATURES]:
        cols[name] = rng.standard_normal(n_rows, dtype=np.float32)
    rate = np.exp(0.8 + 0.25 * market.buyer_fe[b] + 0.2 * market.seller_fe[s] + 0.1 * cols["u0"])
    clicks = rng.poisson(rate).astype(np.int32)
    beta = true_beta(cols, cfg.beta)
    g = true_g(cols, cfg.g)
    fe = market.buyer_fe[b] + market.seller_fe[s] + market.week_fe[week]
    revenue = beta * clicks + g + fe + TRUE_INTERCEPT + rng.normal(0.0, cfg.noise_sd, n_rows)
    week_index = int(market.weeks[week] % 100) - 1
    # rows are exchangeable draws, so attaching sorted times puts them in time order
    seconds = np.sort(rng.integers(0, WEEK_SECONDS, n_rows))
    return pa.table(
        {
            "event_time": pa.array(
                EPOCH_2026 + week_index * WEEK_SECONDS + seconds, pa.timestamp("s", tz="UTC")
            ),
            "week": np.full(n_rows, market.weeks[week], np.int64),
            "buyer": market.buyer_ids[b],
            "seller": market.seller_ids[s],
            "clicks": clicks,
            "revenue": revenue,
            **cols,
            "beta_true": beta,
            "g_true": g,
        }
    )


def write_warehouse(cfg: WarehouseConfig, out: str | Path, *, progress: bool = False) -> Path:
    """Write ``out/data/*.parquet`` (+ ``_SUCCESS``, ``README.txt``), ``out/truth/``, ``simulation.json``.

    The folder appears atomically (written to a temporary sibling and renamed).
    """
    started = time.perf_counter()
    market = make_marketplace(cfg)
    per_week = rows_per_week(cfg)
    files = []
    with atomic_folder(out) as tmp:
        (tmp / "data").mkdir()
        (tmp / "truth").mkdir()
        for first in range(0, cfg.n_weeks, cfg.weeks_per_file):
            weeks = range(first, first + cfg.weeks_per_file)
            name = f"weeks_{market.weeks[weeks[0]]}_{market.weeks[weeks[-1]]}.parquet"
            writer = None
            for w in weeks:
                for j, n in enumerate(chunk_sizes(per_week[w], cfg.chunk_rows)):
                    table = simulate_rows(market, cfg, w, j, n)
                    if writer is None:
                        writer = pq.ParquetWriter(tmp / "data" / name, table.schema)
                    writer.write_table(table)
            if writer is not None:
                writer.close()
                files.append(name)
            if progress:
                print(f"wrote {name} ({sum(per_week[w] for w in weeks):,} rows)", flush=True)
        (tmp / "data" / "_SUCCESS").write_text("")
        (tmp / "data" / "README.txt").write_text(
            "Exported by the warehouse job. One file per five weeks, rows in event-time order.\n"
        )
        for col, ids, effect in [
            ("buyer", market.buyer_ids, market.buyer_fe),
            ("seller", market.seller_ids, market.seller_fe),
            ("week", market.weeks, market.week_fe),
        ]:
            pq.write_table(
                pa.table({"id": ids, "effect": effect}), tmp / "truth" / f"{col}.parquet"
            )
        meta = simulation_marker(
            "fe_hte",
            asdict(cfg),
            generator="warehouse",
            true_intercept=TRUE_INTERCEPT,
            beta_features=BETA_FEATURES,
            g_features=G_FEATURES,
            fixed_effects=FIXED_EFFECTS,
            treatment="clicks",
            outcome="revenue",
            files=files,
            seconds=round(time.perf_counter() - started, 3),
        )
        (tmp / "simulation.json").write_text(json.dumps(meta, indent=2))
    return Path(out)
