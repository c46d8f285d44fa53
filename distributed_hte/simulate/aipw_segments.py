"""Ground-truth simulator for ``aipw_segments``: logged impressions with a confounded
top-3 placement, sparse clicks and effects that differ by segment.

One row per displayed item, as in the seed notebook (MIND-small impressions): a unique
scrambled ``impression_id`` (rows come in random order), user/item/context features,
``is_top_3`` (the treatment) and ``clicked`` (the outcome).

Treatment: ``logit e(x) = a_e + 0.5 z(log_item_exposures) - 0.35 z(candidate_set_size)
+ 0.2 z(history_len) + c_category``: popular items are placed on top more often (about
8 % treated). Outcome: ``logit P(Y=1 | x, t) = a_y + 0.45 z(log_item_exposures)
+ 0.15 z(history_len) - 0.3 z(candidate_set_size) + b_category + t · τ_logit(x)``
(about 4 % clicks), with ``τ_logit`` by category and larger in short candidate sets.
Popular items are both placed on top and clicked more, so the naive lift overstates
the effect. The propensity model is linear-logistic in the features a job names
(``log_item_exposures``, ``candidate_set_size``, ``history_len``, ``category``), so a
logistic nuisance is well specified for it and AIPW is consistent.

``tau_true`` is each row's conditional effect ``P(Y=1|x,1) − P(Y=1|x,0)``: the mean of
it over a segment's rows is that segment's true effect (for any segmentation, quantile
segments included). ``truth.json`` holds the population truth per category and per the
notebook's history buckets (Monte Carlo over ``truth_rows`` fresh draws) and the global
ATE. Chunk i draws from ``SeedSequence(seed, spawn_key=(1, i))``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from distributed_hte.simulate.chunks import atomic_folder, chunk_sizes, write_chunks
from distributed_hte.simulate.marker import SIMULATION_MARKER, simulation_marker

CATEGORIES = ("news", "sports", "lifestyle", "finance", "entertainment", "weather", "autos", "tv")
# Skewed category shares (news dominates, as in the notebook's data).
CATEGORY_SHARE = (0.32, 0.14, 0.14, 0.12, 0.11, 0.07, 0.06, 0.04)
SUBCATEGORIES_PER_CATEGORY = 4
# Treatment-effect shift on the logit scale by category, and the propensity/outcome shifts.
CATEGORY_TAU = (0.35, 0.55, 0.05, 0.0, 0.25, 0.9, -0.2, 0.7)
CATEGORY_PROPENSITY = (0.1, 0.2, -0.1, 0.0, -0.2, 0.3, -0.3, 0.1)
CATEGORY_BASE = (0.0, 0.2, -0.1, -0.2, -0.3, 0.3, -0.4, 0.1)
HISTORY_BINS = (-1, 0, 10, 30, 100, float("inf"))
HISTORY_LABELS = ("0", "1-10", "11-30", "31-100", "101+")
NUMERIC_FEATURES = (
    "history_len",
    "candidate_set_size",
    "title_length",
    "hour",
    "day_of_week",
    "log_item_exposures",
)
CATEGORICAL_FEATURES = ("category", "subcategory")
# Standardisation constants of the generating model (population moments, approximate).
_LOGEXP_MU, _LOGEXP_SD = 5.0, 1.2
_CAND_MU, _CAND_SD = 50.0, 30.0
_HIST_MU, _HIST_SD = 30.0, 30.0


@dataclass(frozen=True)
class AipwSimConfig:
    """Size and shape of one simulated impressions table."""

    n_rows: int = 150_000
    propensity_intercept: float = -2.65
    outcome_intercept: float = -3.45
    effect_scale: float = 1.0
    truth_rows: int = 400_000
    seed: int = 0
    chunk_rows: int = 500_000


def _draw(cfg: AipwSimConfig, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Features, propensity, click probabilities under both arms, for ``n`` rows."""
    cat = rng.choice(len(CATEGORIES), size=n, p=np.asarray(CATEGORY_SHARE))
    sub = rng.choice(SUBCATEGORIES_PER_CATEGORY, size=n, p=[0.55, 0.25, 0.15, 0.05])
    history = rng.negative_binomial(1.2, 1.2 / (1.2 + 30.0), size=n).astype(np.int64)
    cand = np.clip(np.round(rng.lognormal(3.7, 0.7, size=n)), 1, 400).astype(np.int64)
    exposures = np.round(np.exp(rng.normal(_LOGEXP_MU, _LOGEXP_SD, size=n))).astype(np.int64)
    log_exp = np.log1p(exposures)
    z_exp = (log_exp - _LOGEXP_MU) / _LOGEXP_SD
    z_cand = (cand - _CAND_MU) / _CAND_SD
    z_hist = (history - _HIST_MU) / _HIST_SD
    cat_p = np.asarray(CATEGORY_PROPENSITY)[cat]
    logit_e = cfg.propensity_intercept + 0.5 * z_exp - 0.35 * z_cand + 0.2 * z_hist + cat_p
    base = (
        cfg.outcome_intercept
        + 0.45 * z_exp
        + 0.15 * z_hist
        - 0.3 * z_cand
        + np.asarray(CATEGORY_BASE)[cat]
    )
    tau_logit = cfg.effect_scale * (
        np.asarray(CATEGORY_TAU)[cat] + 0.4 * (cand <= 20) - 0.1 * np.minimum(z_hist, 3.0)
    )
    p0 = 1.0 / (1.0 + np.exp(-base))
    p1 = 1.0 / (1.0 + np.exp(-(base + tau_logit)))
    return {
        "cat": cat,
        "sub": sub,
        "history_len": history,
        "candidate_set_size": cand,
        "item_exposures": exposures,
        "log_item_exposures": log_exp,
        "e": 1.0 / (1.0 + np.exp(-logit_e)),
        "p0": p0,
        "p1": p1,
    }


def _scramble(i: np.ndarray) -> np.ndarray:
    """A bijection of [0, 2^48): unique ids in no particular order."""
    return (i.astype(np.uint64) * np.uint64(0x9E3779B1) + np.uint64(12345)) & np.uint64(
        (1 << 48) - 1
    )


def simulate_chunk(cfg: AipwSimConfig, index: int, n_rows: int, first_row: int) -> pa.Table:
    """Chunk ``index`` (``n_rows`` impressions starting at global row ``first_row``)."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1, index)))
    d = _draw(cfg, rng, n_rows)
    t = (rng.random(n_rows) < d["e"]).astype(np.int8)
    p = np.where(t == 1, d["p1"], d["p0"])
    y = (rng.random(n_rows) < p).astype(np.int8)
    names = np.asarray(CATEGORIES, dtype=object)
    cat_names = names[d["cat"]]
    sub_names = np.char.add(
        np.char.add(np.asarray(CATEGORIES)[d["cat"]].astype(str), "_"),
        d["sub"].astype(str),
    ).astype(object)
    ids = _scramble(np.arange(first_row, first_row + n_rows)).astype(np.int64)
    return pa.table(
        {
            "impression_id": ids,
            "history_len": d["history_len"],
            "candidate_set_size": d["candidate_set_size"],
            "title_length": rng.integers(20, 110, n_rows).astype(np.int64),
            "hour": rng.integers(0, 24, n_rows).astype(np.int64),
            "day_of_week": rng.integers(0, 7, n_rows).astype(np.int64),
            "item_exposures": d["item_exposures"],
            "log_item_exposures": d["log_item_exposures"],
            "category": cat_names,
            "subcategory": sub_names,
            "is_top_3": t,
            "clicked": y,
            "tau_true": d["p1"] - d["p0"],
        }
    )


def population_truth(cfg: AipwSimConfig) -> dict:
    """Global ATE and the true effect per category and per history bucket (Monte Carlo)."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(2,)))
    d = _draw(cfg, rng, cfg.truth_rows)
    tau = d["p1"] - d["p0"]
    bucket = np.searchsorted(np.asarray(HISTORY_BINS), d["history_len"], side="left") - 1
    return {
        "ate": float(tau.mean()),
        "treated_share": float(d["e"].mean()),
        "click_rate_control": float(d["p0"].mean()),
        "monte_carlo_rows": cfg.truth_rows,
        "segments": {
            "category": {
                name: float(tau[d["cat"] == j].mean()) for j, name in enumerate(CATEGORIES)
            },
            "history_len": {
                label: float(tau[bucket == j].mean())
                for j, label in enumerate(HISTORY_LABELS)
                if (bucket == j).any()
            },
        },
        "history_bins": list(HISTORY_BINS[:-1]) + ["inf"],
        "tau_column": "tau_true",
    }


def simulate_aipw_segments(cfg: AipwSimConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Write ``out/data/part-*.parquet``, ``out/truth.json`` and ``out/simulation.json``."""
    started = time.perf_counter()
    with atomic_folder(out) as tmp:
        (tmp / "data").mkdir()
        sizes = chunk_sizes(cfg.n_rows, cfg.chunk_rows)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        start_of = dict(enumerate(starts))

        def make(world, index, n_rows):
            return simulate_chunk(world, index, n_rows, start_of[index])

        write_chunks(make, cfg, sizes, tmp / "data", "simulate aipw_segments", progress)
        (tmp / "truth.json").write_text(json.dumps(population_truth(cfg), indent=1))
        meta = simulation_marker(
            "aipw_segments",
            asdict(cfg),
            n_files=len(sizes),
            seconds=round(time.perf_counter() - started, 3),
        )
        (tmp / SIMULATION_MARKER).write_text(json.dumps(meta, indent=2))
    return Path(out)
