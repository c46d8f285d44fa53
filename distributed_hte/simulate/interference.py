"""Ground-truth simulator for ``interference`` (the seed paper's section 6.2 design).

* An item pool of ``n_items`` items, each with a binary attribute ``c_bin`` ~ Bern(½)
  and a continuous one ``c_cont`` ~ N(0, 1), assigned to treatment once, Bern(p).
* Each query has a viewer with a preference parameter ``v`` ~ N(0, 1) and a
  consideration set of K items drawn without replacement from the pool, so items
  repeat across queries and share their assignment.
* Scores (see :func:`true_nuisances`): baseline b(v, c) and a heterogeneous uplift
  τ(v, c) = 0.5 + 0.5 c_bin + 0.3 c_cont + 0.5 tanh(v). Its mean above zero gives
  treated items more than their share p of exposures (content-exposure bias); its
  tanh(v) part makes treated items win more often for high-v viewers, who also
  respond more (viewer-selection bias). That part is common to every item of a query,
  so it cancels under global treatment and moves only the experiment.
* One item is exposed per query by MNL on b + w τ; the response
  μ(v, c) = 1 + v + 0.5 c_cont + 0.5 c_bin + 0.3 sin(2 c_cont) does not depend on the
  treatment; y = μ + N(0, noise_sd²), or y ~ Bern(sigmoid(μ − 1.5)) for a binary outcome.

The true GTE (all items treated against none) and policy values are computed by a
large Monte Carlo over viewers and consideration sets (exact expectations over the
exposure and the assignment within each query) and written to ``simulation.json``.
Chunk ``i`` of queries draws from ``SeedSequence(seed, spawn_key=(1, i))``, so the
output depends only on the seed and the chunk size, not on the parallelism.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from distributed_hte.simulate.chunks import atomic_folder, chunk_sizes, write_chunks
from distributed_hte.simulate.marker import (
    SIMULATION_MARKER,
    read_simulation_marker,
    simulation_marker,
)

VIEWER_FEATURES = ["v"]
ITEM_FEATURES = ["c_bin", "c_cont"]
SUBGROUP = "c_bin"
TRUTH_POLICY_Q = (0.0, 0.25, 0.5, 0.75, 1.0)
BINARY_SHIFT = 1.5  # binary outcome: P(y = 1) = sigmoid(μ − 1.5)


@dataclass(frozen=True)
class InterferenceSimConfig:
    """Size and shape of one simulated experiment."""

    n_queries: int = 20_000
    n_items: int = 2_000
    set_size: int = 5
    set_size_min: int | None = None  # sizes uniform in [set_size_min, set_size]
    p_treat: float = 0.5
    outcome: Literal["continuous", "binary"] = "continuous"
    noise_sd: float = 1.0
    truth_queries: int = 1_000_000
    seed: int = 0
    chunk_queries: int = 200_000


@dataclass(frozen=True)
class ItemPool:
    """The items: features ``(n_items,)`` and their treatment assignment."""

    ids: np.ndarray  # int64, sparse
    c_bin: np.ndarray  # float64 0/1
    c_cont: np.ndarray  # float64
    treated: np.ndarray  # int8 0/1


def make_pool(
    n_items: int, p_treat: float, seed: int, assignment_seed: int | None = None
) -> ItemPool:
    """Draw item features from ``seed`` and the assignment from ``assignment_seed`` (default: seed)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    ids = (np.arange(n_items, dtype=np.int64) * 7_919 + 1_000_003) % (2**40)
    c_bin = rng.binomial(1, 0.5, n_items).astype(np.float64)
    c_cont = rng.standard_normal(n_items)
    arng = np.random.default_rng(
        np.random.SeedSequence(seed if assignment_seed is None else assignment_seed, spawn_key=(2,))
    )
    treated = arng.binomial(1, p_treat, n_items).astype(np.int8)
    return ItemPool(ids, c_bin, c_cont, treated)


def true_nuisances(
    v: np.ndarray, c_bin: np.ndarray, c_cont: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """b, τ, μ for viewer ``v`` ``(n, 1)`` and items ``(n, K)`` (broadcast)."""
    b = 0.5 * c_cont + 0.8 * c_bin * np.tanh(v) - 0.3 * c_bin
    tau = 0.5 + 0.5 * c_bin + 0.3 * c_cont + 0.5 * np.tanh(v)
    mu = 1.0 + v + 0.5 * c_cont + 0.5 * c_bin + 0.3 * np.sin(2.0 * c_cont)
    return b, tau, mu


def mean_response(mu_latent: np.ndarray, outcome: str) -> np.ndarray:
    """E[y | exposed item]: μ itself, or sigmoid(μ − 1.5) for a binary outcome."""
    if outcome == "binary":
        return 1.0 / (1.0 + np.exp(-(mu_latent - BINARY_SHIFT)))
    return mu_latent


def draw_sets(
    rng: np.random.Generator, n: int, n_items: int, k_max: int, k_min: int
) -> tuple[np.ndarray, np.ndarray]:
    """Item indices ``(n, k_max)`` without replacement and the mask ``(n, k_max)``.

    Each row takes the first K of a random permutation of a random K_max-subset:
    argsort of uniform keys over the pool would cost n × n_items, so draw k_max
    candidates with replacement and redraw the rows with duplicates.
    """
    idx = rng.integers(0, n_items, (n, k_max))
    while True:
        s = np.sort(idx, axis=1)
        dup = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if not dup.any():
            break
        idx[dup] = rng.integers(0, n_items, (int(dup.sum()), k_max))
    sizes = rng.integers(k_min, k_max + 1, n) if k_min < k_max else np.full(n, k_max)
    mask = np.arange(k_max)[None, :] < sizes[:, None]
    return idx, mask


@dataclass(frozen=True)
class Queries:
    """N simulated queries in wide form (padded to K_max, real items first)."""

    v: np.ndarray  # (N,)
    items: np.ndarray  # (N, K) pool indices
    mask: np.ndarray  # (N, K) bool
    w: np.ndarray  # (N, K) float64 0/1
    e: np.ndarray  # (N,) exposed position
    y: np.ndarray  # (N,)
    b: np.ndarray  # (N, K) true baseline scores
    tau: np.ndarray  # (N, K) true uplifts
    mu: np.ndarray  # (N, K) true mean responses E[y | exposed k]


def simulate_queries(
    pool: ItemPool, n: int, k_max: int, k_min: int, outcome: str, noise_sd: float, rng
) -> Queries:
    """Draw ``n`` queries of the experiment on ``pool``."""
    v = rng.standard_normal(n)
    items, mask = draw_sets(rng, n, len(pool.ids), k_max, k_min)
    cb, cc = pool.c_bin[items], pool.c_cont[items]
    b, tau, mu_lat = true_nuisances(v[:, None], cb, cc)
    w = pool.treated[items].astype(np.float64)
    u = np.where(mask, b + w * tau, -np.inf)
    prob = np.exp(u - u.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    e = (prob.cumsum(axis=1) < rng.random((n, 1))).sum(axis=1).clip(max=mask.sum(axis=1) - 1)
    mu = mean_response(mu_lat, outcome)
    mu_e = mu[np.arange(n), e]
    if outcome == "binary":
        y = rng.binomial(1, mu_e).astype(np.float64)
    else:
        y = mu_e + noise_sd * rng.standard_normal(n)
    return Queries(v, items, mask, w, e, y, b, tau, mu)


# ----------------------------------------------------------------------------- truth


def _softmax(u: np.ndarray) -> np.ndarray:
    p = np.exp(u - u.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def policy_values_exact(q: Queries, qs: tuple[float, ...]) -> dict[float, np.ndarray]:
    """V_q per query ``(N,)`` with the assignment averaged exactly (K ≤ 12) or by 512 draws."""
    n, k = q.mask.shape
    out: dict[float, np.ndarray] = {}
    for val in qs:
        if val in (0.0, 1.0):
            u = np.where(q.mask, q.b + val * q.tau, -np.inf)
            out[val] = (_softmax(u) * q.mu).sum(axis=1)
            continue
        if k <= 12:
            W = np.array(np.meshgrid(*[[0.0, 1.0]] * k, indexing="ij")).reshape(k, -1).T
            n1 = W.sum(axis=1)
            wts = val**n1 * (1 - val) ** (k - n1)
        else:
            W = (np.random.default_rng(0).random((512, k)) < val).astype(np.float64)
            wts = np.full(512, 1 / 512)
        total = np.zeros(n)
        for s in range(len(W)):
            u = np.where(q.mask, q.b + W[s] * q.tau, -np.inf)
            total += wts[s] * (_softmax(u) * q.mu).sum(axis=1)
        out[val] = total
    return out


def true_effects(
    pool: ItemPool, cfg: InterferenceSimConfig, n_queries: int | None = None, seed_key: int = 9
) -> dict:
    """The GTE, subgroup effects and policy values by Monte Carlo over queries.

    Within a query the expectations over exposure and assignment are exact; only the
    viewer and the consideration set are sampled (``n_queries`` of them, in chunks).
    """
    n_total = n_queries or cfg.truth_queries
    k_min = cfg.set_size_min or cfg.set_size
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(seed_key,)))
    sums: dict[str, float] = {}
    sumsq: dict[str, float] = {}
    done = 0
    # V_q for 0 < q < 1 enumerates 2^K assignments: on a tenth of the queries.
    n_policy = max(n_total // 10, 1)
    while done < n_total:
        n = min(200_000, n_total - done)
        qry = simulate_queries(pool, n, cfg.set_size, k_min, cfg.outcome, cfg.noise_sd, rng)
        u1 = np.where(qry.mask, qry.b + qry.tau, -np.inf)
        u0 = np.where(qry.mask, qry.b, -np.inf)
        c = _softmax(u1) - _softmax(u0)
        cb = pool.c_bin[qry.items]
        vals = {
            "gte": (c * qry.mu).sum(axis=1),
            "group=0": (c * qry.mu * (cb == 0)).sum(axis=1),
            "group=1": (c * qry.mu * (cb == 1)).sum(axis=1),
        }
        if done < n_policy:
            m = min(n, n_policy - done)
            sub = Queries(*(getattr(qry, f)[:m] for f in Queries.__dataclass_fields__))
            for val, pv in policy_values_exact(sub, TRUTH_POLICY_Q).items():
                vals[f"V_q={val:g}"] = pv
        for key, x in vals.items():
            sums[key] = sums.get(key, 0.0) + float(x.sum())
            sumsq[key] = sumsq.get(key, 0.0) + float((x * x).sum())
            sums[f"n:{key}"] = sums.get(f"n:{key}", 0.0) + len(x)
        done += n
    out: dict = {"n_queries": n_total}
    for key in [k for k in sums if not k.startswith("n:")]:
        m = sums[f"n:{key}"]
        mean = sums[key] / m
        se = math.sqrt(max(sumsq[key] / m - mean**2, 0.0) / m)
        out[key] = {"value": mean, "mc_se": se}
    return out


# ----------------------------------------------------------------------------- files


def queries_to_table(pool: ItemPool, q: Queries, query_ids: np.ndarray) -> pa.Table:
    """Long format: one row per query × item of its consideration set."""
    rows, cols = np.nonzero(q.mask)
    items = q.items[rows, cols]
    exposed = (q.e[rows] == cols).astype(np.int8)
    outcome = np.where(exposed == 1, q.y[rows], np.nan)
    return pa.table(
        {
            "query_id": query_ids[rows],
            "item_id": pool.ids[items],
            "treated": pool.treated[items],
            "exposed": exposed,
            "outcome": pa.array(outcome, mask=exposed == 0),
            "v": q.v[rows],
            "c_bin": pool.c_bin[items].astype(np.int8),
            "c_cont": pool.c_cont[items],
            "b_true": q.b[rows, cols],
            "tau_true": q.tau[rows, cols],
            "mu_true": q.mu[rows, cols],
        }
    )


def _chunk(pool: ItemPool, index: int, n: int, cfg: InterferenceSimConfig) -> pa.Table:
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1, index)))
    k_min = cfg.set_size_min or cfg.set_size
    q = simulate_queries(pool, n, cfg.set_size, k_min, cfg.outcome, cfg.noise_sd, rng)
    first = index * cfg.chunk_queries
    ids = ((np.arange(first, first + n, dtype=np.int64) * 2_654_435_761) % (2**40)) + 1
    table = queries_to_table(pool, q, ids)
    # Rows arrive in no particular order, as in a real log.
    order = rng.permutation(table.num_rows)
    return table.take(pa.array(order))


def simulate_interference(
    cfg: InterferenceSimConfig, out: str | Path, *, progress: bool = True
) -> Path:
    """Write ``out/data/part-*.parquet``, ``out/items.parquet`` and ``out/simulation.json``.

    Runs on the current Ray (``ray.init`` must have been called); the folder appears
    atomically.
    """
    import pyarrow.parquet as pq

    started = time.perf_counter()
    with atomic_folder(out) as tmp:
        (tmp / "data").mkdir()
        pool = make_pool(cfg.n_items, cfg.p_treat, cfg.seed)
        sizes = chunk_sizes(cfg.n_queries, cfg.chunk_queries)
        write_chunks(
            partial(_chunk, cfg=cfg), pool, sizes, tmp / "data", "simulate interference", progress
        )
        pq.write_table(
            pa.table(
                {
                    "item_id": pool.ids,
                    "c_bin": pool.c_bin,
                    "c_cont": pool.c_cont,
                    "treated": pool.treated,
                }
            ),
            tmp / "items.parquet",
        )
        truth = true_effects(pool, cfg)
        meta = simulation_marker(
            "interference",
            asdict(cfg),
            truth=truth,
            viewer_features=VIEWER_FEATURES,
            item_features=ITEM_FEATURES,
            subgroup=SUBGROUP,
            n_files=len(sizes),
            seconds=round(time.perf_counter() - started, 3),
        )
        (tmp / SIMULATION_MARKER).write_text(json.dumps(meta, indent=2))
    return Path(out)


def read_truth(data_path: str | Path) -> dict | None:
    """The ``truth`` block of this project's simulation marker beside ``data_path``, or None."""
    found = read_simulation_marker(str(data_path), "interference")
    return found.get("truth") if found else None
