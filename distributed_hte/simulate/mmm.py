"""Ground-truth simulator for ``mmm``: a weekly region panel with known adstock, Hill
saturation, region multipliers, slowly varying media coefficients, controls, Fourier
seasonality, a damped trend and noise.

For region ``r`` (size ``s_r``) and week ``t``::

    kpi[r,t] = s_r · (B + b_r + trend[t] + season[t] + Σ_k γ_k z[r,t,k]
                      + Σ_c β_c(t) · hill_c(adstock_c(x[r,:,c] / scale[r,c])[t])) + ε

with ``scale[r, c]`` the region's mean activity of channel ``c`` over its observed fit
weeks (the model's own scaler, so the model family contains the truth), geometric adstock
truncated at ``MAX_LAG`` weeks with weights normalised to one, ``β_c(t) = β_c (1 + v
sin(2π t / (1.3 n_weeks) + c))``, ``ε ~ N(0, (noise · s_r)²)``. ``β_c`` and ``B`` are
solved so that media makes ``media_share`` of the expected KPI over the fit weeks, split
between channels by ``CHANNEL_WEIGHT``. Spend is activity times a per-channel cost.

Output: ``out/data/part-*.parquet`` (long format, one row per region × week, rows in
random order; columns ``region`` (string id), ``week`` (date), ``kpi``, each channel's
activity and ``<channel>_spend``, the controls, and ``kpi_expected``: the noise-free
KPI, read only on data this project simulated), ``out/truth.json`` (per-channel true
contribution, share, ROI, marginal ROI and the response-curve parameters) and
``out/simulation.json``. ``ragged=True`` drops rows: some regions start late, some have
gaps; the truth is computed on the rows that remain (the media in a gap still carries
over, as it would in reality).

The panel is small (regions × weeks), so it is built in one process.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distributed_hte.simulate.chunks import atomic_folder
from distributed_hte.simulate.marker import SIMULATION_MARKER, simulation_marker

CHANNELS = ("tv", "search", "social", "display", "radio", "video", "ooh", "email")
CONTROLS = ("price", "promo")
MAX_LAG = 13
THETA = (0.6, 0.1, 0.3, 0.2, 0.5, 0.4, 0.55, 0.15)
HILL_K = (1.0, 0.6, 0.8, 1.2, 0.9, 0.7, 1.1, 0.5)
HILL_SLOPE = (2.0, 1.2, 1.5, 1.0, 1.8, 1.3, 2.2, 1.1)
CHANNEL_WEIGHT = (0.30, 0.25, 0.15, 0.10, 0.12, 0.08, 0.06, 0.04)
COST = (7.5, 0.44, 1.33, 0.43, 1.8, 3.3, 5.0, 0.2)
LEVEL = (100.0, 500.0, 300.0, 800.0, 150.0, 200.0, 120.0, 1000.0)
P_ON = (0.6, 0.95, 0.8, 0.85, 0.5, 0.6, 0.4, 0.9)
CONTROL_COEF = (-0.04, 0.05)
TREND_SLOPE, TREND_DAMP = 0.08, 1.5
SEASON = (0.08, 0.04)  # sin of the yearly wave, cos of its second harmonic
WEEKS_PER_YEAR = 52.1775
START_DATE = "2023-01-02"


@dataclass(frozen=True)
class MmmSimConfig:
    """Size and shape of one simulated panel."""

    n_regions: int = 200
    n_weeks: int = 104
    n_channels: int = 6
    media_share: float = 0.4
    holdout_weeks: int = 8
    noise: float = 0.04
    coef_variation: float = 0.15
    ragged: bool = False
    seed: int = 0
    n_files: int = 4


def geometric_adstock(x: np.ndarray, theta: float, max_lag: int = MAX_LAG) -> np.ndarray:
    """Normalised truncated geometric carry-over along the last-but-one axis.

    Args: x ``(..., T)``. Returns ``(..., T)``: ``Σ_{l<L} w_l x[t−l]``, ``w ∝ θ^l``.
    """
    w = theta ** np.arange(max_lag)
    w = w / w.sum()
    out = np.zeros_like(x, dtype=np.float64)
    t = x.shape[-1]
    for lag in range(min(max_lag, t)):
        out[..., lag:] += w[lag] * x[..., : t - lag]
    return out


def hill_np(a: np.ndarray, k: float, slope: float) -> np.ndarray:
    """``a^s / (a^s + K^s)`` (0 at 0)."""
    a = np.maximum(a, 0.0)
    with np.errstate(divide="ignore"):
        return np.where(a > 0, 1.0 / (1.0 + (k / np.where(a > 0, a, 1.0)) ** slope), 0.0)


def _panel(cfg: MmmSimConfig) -> dict[str, np.ndarray]:
    """Everything about the panel on the full region × week grid."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(7,)))
    r_n, t_n, c_n = cfg.n_regions, cfg.n_weeks, cfg.n_channels
    fit_t = t_n - cfg.holdout_weeks
    size = 1000.0 * rng.lognormal(0.0, 0.6, r_n)
    region_base = rng.normal(0.0, 0.03, r_n)
    t = np.arange(t_n, dtype=np.float64)
    u = t / fit_t
    trend = TREND_SLOPE * (1.0 - np.exp(-TREND_DAMP * u)) / TREND_DAMP
    season = SEASON[0] * np.sin(2 * np.pi * t / WEEKS_PER_YEAR) + SEASON[1] * np.cos(
        4 * np.pi * t / WEEKS_PER_YEAR
    )
    # Controls: an AR(1) price index per region and promotion weeks.
    price = np.zeros((r_n, t_n))
    e = rng.normal(0, 1, (r_n, t_n))
    for i in range(1, t_n):
        price[:, i] = 0.7 * price[:, i - 1] + 0.5 * e[:, i]
    promo = (rng.random((r_n, t_n)) < 0.15).astype(np.float64)
    ctrl = CONTROL_COEF[0] * price + CONTROL_COEF[1] * (promo - 0.15)
    # Media: flighting per region (on/off weeks), national waves, lognormal amounts.
    x = np.zeros((r_n, t_n, c_n))
    for c in range(c_n):
        wave = 1.0 + 0.3 * np.sin(2 * np.pi * t / 26.0 + c)
        on = rng.random((r_n, t_n)) < P_ON[c]
        amount = rng.lognormal(0.0, 0.35, (r_n, t_n))
        x[:, :, c] = size[:, None] / 1000.0 * LEVEL[c] * wave[None, :] * on * amount
    observed = np.ones((r_n, t_n), dtype=bool)
    if cfg.ragged:
        late = rng.random(r_n) < 0.2
        starts = rng.integers(8, max(9, t_n // 3), r_n)
        for r in np.flatnonzero(late):
            observed[r, : starts[r]] = False
            x[r, : starts[r]] = 0.0  # the region did not exist yet: no media either
        gappy = rng.random(r_n) < 0.15
        for r in np.flatnonzero(gappy):
            for _ in range(rng.integers(1, 4)):
                g0 = int(rng.integers(t_n // 3, fit_t - 4))
                observed[r, g0 : g0 + int(rng.integers(1, 5))] = False
    # The model's holdout: the last holdout_weeks observed weeks of each region.
    holdout = np.zeros_like(observed)
    for r in range(r_n):
        idx = np.flatnonzero(observed[r])
        holdout[r, idx[-cfg.holdout_weeks :]] = True
    fit = observed & ~holdout
    scale = np.ones((r_n, c_n))
    for c in range(c_n):
        num = (x[:, :, c] * fit).sum(1)
        scale[:, c] = np.where(num > 0, num / np.maximum(fit.sum(1), 1), 1.0)
    coef_t = np.stack(
        [1.0 + cfg.coef_variation * np.sin(2 * np.pi * t / (1.3 * t_n) + c) for c in range(c_n)],
        axis=-1,
    )  # (T, C)
    resp = np.zeros((r_n, t_n, c_n))
    for c in range(c_n):
        a = geometric_adstock(x[:, :, c] / scale[:, c : c + 1], THETA[c])
        resp[:, :, c] = hill_np(a, HILL_K[c], HILL_SLOPE[c])
    unit = resp * coef_t[None]  # media term per unit β_c
    w = np.asarray(CHANNEL_WEIGHT[:c_n])
    w = w / w.sum()
    s_fit = (size[:, None] * fit).sum()
    m_c = (size[:, None, None] * unit * fit[:, :, None]).sum((0, 1))
    beta = cfg.media_share * s_fit * w / m_c
    other = (size[:, None] * (region_base[:, None] + trend + season + ctrl) * fit).sum()
    base = 1.0 - cfg.media_share - other / s_fit
    media = unit * beta
    mean_rel = base + region_base[:, None] + trend[None] + season[None] + ctrl + media.sum(-1)
    expected = size[:, None] * mean_rel
    kpi = expected + rng.normal(0.0, 1.0, (r_n, t_n)) * cfg.noise * size[:, None]
    return {
        "size": size,
        "x": x,
        "spend": x * np.asarray(COST[:c_n]),
        "price": price,
        "promo": promo,
        "observed": observed,
        "fit": fit,
        "scale": scale,
        "coef_t": coef_t,
        "beta": beta,
        "base": base,
        "media": media * size[:, None, None],
        "expected": expected,
        "kpi": kpi,
    }


def _marginal(cfg: MmmSimConfig, p: dict[str, np.ndarray], c: int) -> float:
    """True KPI gained over the fit weeks for +1 % activity of channel ``c`` in every fit week."""
    fit = p["fit"]
    x = p["x"][:, :, c] * np.where(fit, 1.01, 1.0)
    a = geometric_adstock(x / p["scale"][:, c : c + 1], THETA[c])
    new = hill_np(a, HILL_K[c], HILL_SLOPE[c]) * p["coef_t"][None, :, c] * p["beta"][c]
    gain = ((new * p["size"][:, None] - p["media"][:, :, c]) * fit).sum()
    return float(gain / (0.01 * (p["spend"][:, :, c] * fit).sum()))


def panel_truth(cfg: MmmSimConfig, p: dict[str, np.ndarray]) -> dict:
    """The truth.json content: per-channel contributions, shares, ROI, response parameters."""
    fit = p["fit"]
    names = CHANNELS[: cfg.n_channels]
    contrib = (p["media"] * fit[:, :, None]).sum((0, 1))
    spend = (p["spend"] * fit[:, :, None]).sum((0, 1))
    total_media = contrib.sum()
    channels = {}
    for c, name in enumerate(names):
        channels[name] = {
            "contribution": float(contrib[c]),
            "share": float(contrib[c] / total_media),
            "spend": float(spend[c]),
            "activity": float((p["x"][:, :, c] * fit).sum()),
            "roi": float(contrib[c] / spend[c]),
            "marginal_roi": _marginal(cfg, p, c),
            "adstock_theta": THETA[c],
            "hill_k": HILL_K[c],
            "hill_slope": HILL_SLOPE[c],
            "beta": float(p["beta"][c]),
            "beta_mean_fit": float(
                p["beta"][c] * p["coef_t"][: fit.shape[1], c][fit.any(0)].mean()
            ),
            "cost": COST[c],
        }
    return {
        "media_share": float(total_media / (p["expected"] * fit).sum()),
        "channels": channels,
        "channel_names": list(names),
        "holdout_weeks": cfg.holdout_weeks,
        "max_lag": MAX_LAG,
        "adstock": "geometric",
        # Response curves: weekly KPI of channel c in region r at steady weekly activity a
        # is size[r] · beta_mean_fit[c] · hill(a / media_scale[r][c]; hill_k, hill_slope).
        "region_size": p["size"].tolist(),
        "media_scale": p["scale"].tolist(),
        "kpi_expected_column": "kpi_expected",
    }


def _region_ids(n: int) -> list[str]:
    return [f"dma_{i:04d}" for i in range(n)]


def simulate_mmm(cfg: MmmSimConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Write ``out/data/part-*.parquet``, ``out/truth.json`` and ``out/simulation.json``."""
    started = time.perf_counter()
    p = _panel(cfg)
    r_idx, t_idx = np.nonzero(p["observed"])
    names = CHANNELS[: cfg.n_channels]
    weeks = np.datetime64(START_DATE) + 7 * np.arange(cfg.n_weeks).astype("timedelta64[D]")
    cols: dict[str, np.ndarray] = {
        "region": np.asarray(_region_ids(cfg.n_regions), dtype=object)[r_idx],
        "week": weeks[t_idx],
        "kpi": p["kpi"][r_idx, t_idx],
    }
    for c, name in enumerate(names):
        cols[name] = p["x"][r_idx, t_idx, c]
        cols[f"{name}_spend"] = p["spend"][r_idx, t_idx, c]
    cols["price"] = p["price"][r_idx, t_idx]
    cols["promo"] = p["promo"][r_idx, t_idx]
    cols["kpi_expected"] = p["expected"][r_idx, t_idx]
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(8,)))
    order = rng.permutation(len(r_idx))
    table = pa.table({k: v[order] for k, v in cols.items()})
    with atomic_folder(out) as tmp:
        (tmp / "data").mkdir()
        parts = np.array_split(np.arange(table.num_rows), max(1, cfg.n_files))
        for i, rows in enumerate(parts):
            pq.write_table(table.take(pa.array(rows)), tmp / "data" / f"part-{i:05d}.parquet")
        (tmp / "truth.json").write_text(json.dumps(panel_truth(cfg, p), indent=1))
        meta = simulation_marker(
            "mmm",
            asdict(cfg),
            n_files=len(parts),
            seconds=round(time.perf_counter() - started, 3),
        )
        (tmp / SIMULATION_MARKER).write_text(json.dumps(meta, indent=2))
    return Path(out)
