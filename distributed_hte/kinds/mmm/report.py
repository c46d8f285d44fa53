"""Artefacts of kind ``mmm``: metrics, channel table, decomposition, response curves,
budget and plots. Driver side: a panel (regions × weeks) fits in one process.

Definitions (all over the fit weeks, i.e. observed and not held out):

* contribution of a channel: predicted KPI minus predicted KPI with the channel's
  activity set to zero in the fit weeks (carry-over within the fit weeks included);
* share: contribution / total media contribution; ROI: contribution / spend;
* marginal ROI: KPI gained per unit of spend for +1 % activity in every fit week.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd

from distributed_hte.estimators.mmm import (
    Response,
    fit_metrics,
    naive_forecasts,
    optimise_budget,
)
from distributed_hte.kinds.mmm.data import Panel, Scalers, scaled
from distributed_hte.kinds.toolkit import figure
from distributed_hte.rundir import RunDir, write_json

log = logging.getLogger(__name__)

CURVE_MULTIPLIERS = np.round(np.linspace(0.0, 3.0, 31), 3)


def panel_metrics(panel: Panel, pred: np.ndarray) -> dict[str, Any]:
    """``{"train": ..., "holdout": ...}``: the model's fit metrics and the two naive
    forecasts' (region fit mean, region mean of the last 8 fit weeks)."""
    naive = naive_forecasts(panel.kpi, panel.fit)
    out: dict[str, Any] = {}
    for split, mask in (("train", panel.fit), ("holdout", panel.holdout)):
        block: dict[str, Any] = fit_metrics(panel.kpi, pred, mask)
        for name, forecast in naive.items():
            block[name] = fit_metrics(panel.kpi, forecast, mask)
        if panel.expected is not None:
            block["true_model"] = fit_metrics(panel.kpi, panel.expected, mask)
        out[split] = block
    return out


def components_frame(panel: Panel, dec: dict[str, np.ndarray], cfg, wide: bool = False):
    """The decomposition on the observed weeks.

    Long (``wide=False``): region, week, component, value. Wide: one row per region-week
    with ``prediction`` and one column per component.
    """
    r_idx, t_idx = np.nonzero(panel.observed)
    cols: dict[str, np.ndarray] = {
        "baseline": dec["baseline"][r_idx, t_idx],
        "trend": dec["trend"][r_idx, t_idx],
        "seasonality": dec["seasonality"][r_idx, t_idx],
    }
    for k, name in enumerate(cfg.controls):
        cols[name] = dec["controls"][r_idx, t_idx, k]
    for c, name in enumerate(cfg.channels):
        cols[name] = dec["media"][r_idx, t_idx, c]
    region = np.asarray(panel.regions, dtype=object)[r_idx]
    week = np.asarray(panel.week_labels, dtype=object)[t_idx]
    if wide:
        frame = pd.DataFrame({"region": region, "week": week, **cols})
        frame["prediction"] = dec["pred"][r_idx, t_idx]
        frame["holdout"] = panel.holdout[r_idx, t_idx]
        return frame
    parts = [
        pd.DataFrame({"region": region, "week": week, "component": name, "value": v})
        for name, v in cols.items()
    ]
    return pd.concat(parts, ignore_index=True)


def channel_table(
    panel: Panel, scalers: Scalers, cfg, model, dec: dict[str, np.ndarray]
) -> pd.DataFrame:
    """One row per channel: activity, spend, contribution, share, roi, marginal_roi, and
    the fitted adstock/Hill parameters."""
    from distributed_hte.kinds.mmm.plugin import media_only

    fit = panel.fit
    x = scaled(panel, scalers)["media"].astype(np.float64)
    coef = dec["coef"]
    base = dec["media"]
    # Channels do not interact, so one pass with every channel zeroed gives each one's
    # counterfactual term.
    zeroed = media_only(model, x * ~fit[..., None], coef, scalers.kpi_scale)
    up = media_only(model, x * np.where(fit, 1.01, 1.0)[..., None], coef, scalers.kpi_scale)
    f3 = fit[..., None]
    contribution = ((base - zeroed) * f3).sum((0, 1))
    gain = ((up - base) * f3).sum((0, 1))
    spend = (panel.spend * f3).sum((0, 1))
    activity = (panel.media * f3).sum((0, 1))
    has = np.asarray(panel.has_spend)
    total = contribution.sum()
    weights = model.adstock_weights().detach().numpy()
    lags = np.arange(weights.shape[1])
    return pd.DataFrame(
        {
            "channel": cfg.channels,
            "activity": activity,
            "spend": np.where(has, spend, np.nan),
            "contribution": contribution,
            "share": contribution / total if total > 0 else np.nan,
            "roi": np.where(has, contribution / np.where(spend > 0, spend, np.nan), np.nan),
            "marginal_roi": np.where(has, gain / np.where(spend > 0, 0.01 * spend, np.nan), np.nan),
            "hill_k": model.hill_k().detach().numpy(),
            "hill_slope": model.hill_slope().detach().numpy(),
            "adstock_mean_lag": weights @ lags,
            "coef_mean": (coef * f3).sum((0, 1)) / f3.sum(),
        }
    )


def replica_table(spec, panel: Panel, run: RunDir, cfg, scalers: Scalers, week: np.ndarray):
    """Long table (replica, channel, roi, share, contribution): every bootstrap replica's
    model evaluated on the original panel, exactly as the point estimate is."""
    import torch

    from distributed_hte.kinds.mmm.plugin import decompose, load_model
    from distributed_hte.kinds.mmm.replicas import replica_dir

    inputs = scaled(panel, scalers)
    parts = []
    for k in range(spec.uncertainty.replicas):
        path = replica_dir(run.path, k) / "model" / "best_model.pt"
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = load_model(cfg, state)
        dec = decompose(model, inputs, scalers.kpi_scale, week)
        t = channel_table(panel, scalers, cfg, model, dec)[["channel", "roi", "share",
                                                             "contribution"]]  # fmt: skip
        parts.append(t.assign(replica=k))
    return pd.concat(parts, ignore_index=True)[["replica", "channel", "roi", "share",
                                                "contribution"]]  # fmt: skip


def with_intervals(table: pd.DataFrame, reps: pd.DataFrame, level: float) -> pd.DataFrame:
    """``table`` with ``roi``/``share``/``contribution`` ``_low``/``_high`` columns: the
    replicas' percentile intervals at ``level``."""
    from distributed_hte.kinds.mmm.replicas import STATS, percentile_intervals

    out = table.copy()
    for stat in STATS:
        wide = reps.pivot(index="replica", columns="channel", values=stat)[list(table["channel"])]
        low, high = percentile_intervals(wide.to_numpy(np.float64), level)
        out[f"{stat}_low"], out[f"{stat}_high"] = low, high
    return out


def response_of(panel: Panel, scalers: Scalers, model, coef: np.ndarray) -> Response:
    """The fitted model's steady-state response (see :mod:`distributed_hte.estimators.mmm`)."""
    fit = panel.fit[..., None]
    beta = (coef * fit).sum(1) / np.maximum(fit.sum(1), 1)
    cost = np.where(np.isfinite(scalers.cost), scalers.cost, 1.0)
    return Response(
        kpi_scale=scalers.kpi_scale,
        beta=beta,
        media_scale=scalers.media_scale,
        hill_k=model.hill_k().detach().double().numpy(),
        hill_slope=model.hill_slope().detach().double().numpy(),
        cost=cost,
        split=spend_split(panel),
    )


def spend_split(panel: Panel) -> np.ndarray:
    """(R, C): each region's share of a channel's fit-week spend (activity without spend)."""
    f3 = panel.fit[..., None]
    spend = (np.where(np.asarray(panel.has_spend), panel.spend, panel.media) * f3).sum(1)
    return spend / np.maximum(spend.sum(0, keepdims=True), 1e-300)


def weekly_level(panel: Panel, scalers: Scalers) -> np.ndarray:
    """(R, C) mean weekly spend (activity × cost without spend column) over the fit weeks."""
    f3 = panel.fit[..., None]
    cost = np.where(np.isfinite(scalers.cost), scalers.cost, 1.0)
    spend = np.where(np.asarray(panel.has_spend), panel.spend, panel.media * cost)
    return (spend * f3).sum(1) / np.maximum(f3.sum(1), 1)


def response_curves(panel: Panel, scalers: Scalers, resp: Response, cfg) -> pd.DataFrame:
    """National and per-region curves: weekly KPI against weekly spend at multiples of
    the fit-period level, with the slope there and the saturation point (weekly spend at
    half the channel's maximum response)."""
    level = weekly_level(panel, scalers)  # (R, C)
    rows = []
    top = resp.kpi_scale[:, None] * resp.beta  # (R, C) response at infinite spend
    half_region = resp.hill_k * resp.media_scale * resp.cost  # (R, C)
    for c, name in enumerate(cfg.channels):
        unit = "spend" if panel.has_spend[c] else "activity"
        sat_nat = _national_half(resp, level, c)
        for m in CURVE_MULTIPLIERS:
            rc = level * m
            kpi = resp.weekly(rc)[:, c]
            grad = resp.weekly_grad(rc)[:, c]
            nat_spend = rc[:, c].sum()
            rows.append(("national", name, unit, m, nat_spend, kpi.sum(),
                         (grad * level[:, c]).sum() / max(level[:, c].sum(), 1e-300),
                         sat_nat, top[:, c].sum()))  # fmt: skip
        for r, region in enumerate(panel.regions):
            rc = level[r, c] * CURVE_MULTIPLIERS
            a = np.zeros((len(rc), resp.beta.shape[1]))
            a[:, c] = rc
            sub = Response(
                resp.kpi_scale[r : r + 1].repeat(len(rc)),
                np.repeat(resp.beta[r : r + 1], len(rc), 0),
                np.repeat(resp.media_scale[r : r + 1], len(rc), 0),
                resp.hill_k, resp.hill_slope, resp.cost,
                np.repeat(resp.split[r : r + 1], len(rc), 0),
            )  # fmt: skip
            kpi, grad = sub.weekly(a)[:, c], sub.weekly_grad(a)[:, c]
            for i, m in enumerate(CURVE_MULTIPLIERS):
                rows.append((str(region), name, unit, m, rc[i], kpi[i], grad[i],
                             half_region[r, c], top[r, c]))  # fmt: skip
    return pd.DataFrame(
        rows,
        columns=["level", "channel", "unit", "multiplier", "weekly_spend", "weekly_kpi",
                 "slope", "saturation_spend", "max_weekly_kpi"],
    )  # fmt: skip


def _national_half(resp: Response, level: np.ndarray, c: int) -> float:
    """Weekly national spend (regions in their fit-period proportions) at which the
    national response reaches half its maximum."""
    top = (resp.kpi_scale * resp.beta[:, c]).sum()

    def at(m: float) -> float:
        rc = np.zeros_like(level)
        rc[:, c] = level[:, c] * m
        return float(resp.weekly(rc)[:, c].sum())

    lo, hi = 0.0, 1.0
    while at(hi) < top / 2 and hi < 1e9:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid) < top / 2 else (lo, mid)
    return float(level[:, c].sum() * (lo + hi) / 2)


def budget(spec, panel: Panel, resp: Response, table: pd.DataFrame, truth_resp: Response | None):
    """budget.json content for ``spec.optimize``."""
    o = spec.optimize
    names = list(table["channel"])
    bounds = np.array([list(o.bounds.get(c, (0.0, math.inf))) for c in names], dtype=float)
    mix = table["spend"].to_numpy() / table["spend"].sum()
    res = optimise_budget(resp, o.budget, o.weeks, bounds, mix, o.by_region)
    totals = res.allocation.sum(0) if res.allocation.ndim == 2 else res.allocation
    rc = res.allocation if o.by_region else resp.split * res.allocation[None, :]
    per_channel_kpi = resp.weekly(rc / o.weeks).sum(0) * o.weeks
    marg = (resp.weekly_grad(rc / o.weeks) * resp.split).sum(0)
    tol = 1e-6 * o.budget
    met = bool(
        abs(totals.sum() - o.budget) <= tol
        and np.all(totals >= bounds[:, 0] - tol)
        and np.all(totals <= bounds[:, 1] + tol)
        and np.all(res.allocation >= -tol)
    )
    out: dict[str, Any] = {
        "budget": o.budget,
        "weeks": o.weeks,
        "by_region": o.by_region,
        "note": "KPI figures are the media-driven KPI over the period (steady-state carry-over, "
        "each channel's coefficient at its fit-period mean)",
        "allocation": dict(zip(names, totals.tolist(), strict=True)),
        "bounds": {c: bounds[j].tolist() for j, c in enumerate(names)},
        "predicted_kpi": res.kpi,
        "current_allocation": dict(zip(names, res.current_allocation.tolist(), strict=True)),
        "current_kpi": res.current_kpi,
        "gain": res.kpi - res.current_kpi,
        "roi": {
            c: float(per_channel_kpi[j] / totals[j]) if totals[j] > 0 else None
            for j, c in enumerate(names)
        },  # fmt: skip
        "marginal_roi": dict(zip(names, marg.tolist(), strict=True)),
        "constraints_met": met,
        "solver": {"method": "SLSQP", "success": res.success, "message": res.message},
    }
    if o.by_region:
        out["allocation_by_region"] = {
            str(r): dict(zip(names, res.allocation[i].tolist(), strict=True))
            for i, r in enumerate(panel.regions)
        }
    if truth_resp is not None:
        true_opt = optimise_budget(truth_resp, o.budget, o.weeks, bounds, mix, o.by_region)
        ours = truth_resp.period_kpi(res.allocation, o.weeks)
        cur = truth_resp.period_kpi(res.current_allocation, o.weeks)
        best = true_opt.kpi
        out["truth"] = {
            "true_kpi_of_allocation": ours,
            "true_kpi_of_current": cur,
            "true_optimum_kpi": best,
            "share_of_true_gain": (ours - cur) / (best - cur) if best > cur else None,
        }
    return out


def truth_response(truth: dict, panel: Panel, resp: Response) -> Response | None:
    """The simulator's own response, region-aligned with ``panel`` (None if it cannot be)."""
    size = np.asarray(truth["region_size"], dtype=float)
    if len(size) != len(panel.regions):
        return None
    names = truth["channel_names"]
    ch = truth["channels"]
    return Response(
        kpi_scale=size,
        beta=np.tile([ch[c]["beta_mean_fit"] for c in names], (len(size), 1)),
        media_scale=np.asarray(truth["media_scale"], dtype=float),
        hill_k=np.array([ch[c]["hill_k"] for c in names]),
        hill_slope=np.array([ch[c]["hill_slope"] for c in names]),
        cost=np.array([ch[c]["cost"] for c in names]),
        split=resp.split,
    )


def truth_errors(truth: dict, table: pd.DataFrame, media_share: float) -> dict[str, Any]:
    """Share error (percentage points), ROI relative error, ranking by ROI."""
    ch = truth["channels"]
    out: dict[str, Any] = {"media_share": truth["media_share"], "media_share_est": media_share}
    per = {}
    for row in table.itertuples():
        t = ch[row.channel]
        per[row.channel] = {
            "share_true": t["share"],
            "share_est": float(row.share),
            "share_error_pp": 100.0 * (float(row.share) - t["share"]),
            "roi_true": t["roi"],
            "roi_est": float(row.roi),
            "roi_rel_error": float(row.roi) / t["roi"] - 1.0,
            "marginal_roi_true": t["marginal_roi"],
            "marginal_roi_est": float(row.marginal_roi),
        }
    out["channels"] = per
    out["max_abs_share_error_pp"] = max(abs(v["share_error_pp"]) for v in per.values())
    out["max_abs_roi_rel_error"] = max(abs(v["roi_rel_error"]) for v in per.values())
    true_rank = sorted(per, key=lambda c: -per[c]["roi_true"])
    est_rank = sorted(per, key=lambda c: -per[c]["roi_est"])
    out["roi_rank_true"] = true_rank
    out["roi_rank_est"] = est_rank
    out["roi_rank_correct"] = true_rank == est_rank
    return out


def write_outputs(spec, prepared, run: RunDir, cfg, model, scalers: Scalers) -> dict[str, Any]:
    """Every artefact; returns metrics.json's content (without the training block)."""
    from distributed_hte.kinds.mmm.plugin import decompose

    panel = prepared.panel
    dec = decompose(model, scaled(panel, scalers), scalers.kpi_scale, prepared.week)
    metrics: dict[str, Any] = panel_metrics(panel, dec["pred"])
    table = channel_table(panel, scalers, cfg, model, dec)
    if spec.uncertainty is not None:
        reps = replica_table(spec, panel, run, cfg, scalers, prepared.week)
        reps.to_parquet(run.file("replicas.parquet"), index=False)
        table = with_intervals(table, reps, spec.uncertainty.level)
    table.to_csv(run.file("channels.csv"), index=False)
    table.to_parquet(run.file("channels.parquet"), index=False)
    components_frame(panel, dec, cfg).to_parquet(run.file("contributions.parquet"), index=False)
    resp = response_of(panel, scalers, model, dec["coef"])
    curves = response_curves(panel, scalers, resp, cfg)
    curves.to_parquet(run.file("response_curves.parquet"), index=False)
    fit = panel.fit
    media_share = float((dec["media"].sum(-1) * fit).sum() / (dec["pred"] * fit).sum())
    metrics["media_share"] = media_share
    metrics["channels"] = {
        r.channel: {k: _num(getattr(r, k)) for k in ("share", "roi", "marginal_roi")}
        for r in table.itertuples()
    }
    # What a sweep compares: the Huber loss on the holdout weeks (scaled KPI). A sweep that
    # selects on it makes the holdout figures optimistic; say so where it matters.
    y_s = panel.kpi / scalers.kpi_scale[:, None]
    p_s = dec["pred"] / scalers.kpi_scale[:, None]
    metrics["val_loss"] = _huber(y_s, p_s, panel.holdout, cfg.huber_delta)
    metrics["data"] = panel.ragged
    truth = prepared.truth
    t_resp = None
    if truth is not None:
        metrics["truth"] = truth_errors(truth, table, media_share)
        t_resp = truth_response(truth, panel, resp)
    if spec.optimize is not None:
        b = budget(spec, panel, resp, table, t_resp)
        write_json(run.file("budget.json"), b)
        metrics["budget"] = {k: b[k] for k in ("predicted_kpi", "current_kpi", "gain",
                                               "constraints_met")}  # fmt: skip
        if "truth" in b:
            metrics["budget"]["share_of_true_gain"] = b["truth"]["share_of_true_gain"]
    plots(run, panel, dec, cfg, table, curves)
    log.info("[report] %s", _summary(metrics, table))
    return metrics


def _num(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _huber(y: np.ndarray, p: np.ndarray, mask: np.ndarray, delta: float) -> float | None:
    if not mask.any():
        return None
    e = np.abs(y - p)[mask]
    return float(np.mean(np.where(e <= delta, 0.5 * e**2, delta * (e - 0.5 * delta))))


def _summary(metrics: dict[str, Any], table: pd.DataFrame) -> str:
    h = metrics["holdout"]
    parts = [
        f"holdout rmse {h['rmse']:.4g} (naive region mean {h['naive_region_mean']['rmse']:.4g}), "
        f"r2_within_region {h['r2_within_region']:.3f}; media share {metrics['media_share']:.3f}"
    ]
    for r in table.itertuples():
        parts.append(f"{r.channel}: share {r.share:.3f} roi {r.roi:.3g}")
    return "; ".join(parts)


def plots(run: RunDir, panel: Panel, dec, cfg, table: pd.DataFrame, curves: pd.DataFrame) -> None:
    """Fit vs actual, holdout scatter, contributions over time, waterfall, response curves,
    ROI."""
    obs = panel.observed
    t = np.arange(obs.shape[1])
    with figure(run.file("plots", "fit_vs_actual.png"), figsize=(7, 3.5)) as (_, ax):
        ax.plot(t, (panel.kpi * obs).sum(0), label="actual", lw=1.2)
        ax.plot(t, (dec["pred"] * obs).sum(0), label="predicted", lw=1.2)
        held = np.flatnonzero(panel.holdout.any(0))
        if len(held):
            ax.axvspan(held[0], held[-1], color="0.85", label="holdout")
        ax.set_xlabel("week")
        ax.set_ylabel("KPI, all regions")
        ax.legend()
    with figure(run.file("plots", "holdout_scatter.png"), figsize=(4, 4)) as (_, ax):
        m = panel.holdout
        if m.any():
            ax.scatter(panel.kpi[m], dec["pred"][m], s=4, alpha=0.5)
            lo, hi = float(panel.kpi[m].min()), float(panel.kpi[m].max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel("actual KPI (holdout region-weeks)")
        ax.set_ylabel("predicted")
    parts = {
        "baseline": dec["baseline"],
        "trend": dec["trend"],
        "seasonality": dec["seasonality"],
        "controls": dec["controls"].sum(-1),
    }
    for c, name in enumerate(cfg.channels):
        parts[name] = dec["media"][:, :, c]
    with figure(run.file("plots", "contributions_over_time.png"), figsize=(7, 3.5)) as (_, ax):
        series = [(v * obs).sum(0) for v in parts.values()]
        pos = [np.clip(s, 0, None) for s in series]
        ax.stackplot(t, *pos, labels=list(parts))
        ax.set_xlabel("week")
        ax.set_ylabel("KPI, all regions")
        ax.legend(fontsize=6, ncol=2, loc="upper left")
    with figure(run.file("plots", "waterfall.png"), figsize=(6, 3.5)) as (_, ax):
        fit = panel.fit
        vals = [float((v * fit).sum()) for v in parts.values()]
        starts = np.concatenate([[0.0], np.cumsum(vals)[:-1]])
        ax.bar(list(parts), vals, bottom=starts)
        ax.set_ylabel("KPI over the fit weeks")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
    nat = curves[curves["level"] == "national"]
    with figure(run.file("plots", "response_curves.png"), figsize=(6, 4)) as (_, ax):
        for name, g in nat.groupby("channel", sort=False):
            ax.plot(g["multiplier"], g["weekly_kpi"], label=name)
        ax.axvline(1.0, color="0.6", lw=0.8, ls="--")
        ax.set_xlabel("weekly spend / fit-period level")
        ax.set_ylabel("weekly KPI, all regions")
        ax.legend(fontsize=7)
    with figure(run.file("plots", "roi.png"), figsize=(5, 3.5)) as (_, ax):
        roi = table["roi"].fillna(0.0).to_numpy()
        err = None
        if "roi_low" in table:
            low = table["roi_low"].fillna(0.0).to_numpy()
            high = table["roi_high"].fillna(0.0).to_numpy()
            # A percentile interval need not contain the point estimate: clip the bars.
            err = np.vstack([np.clip(roi - low, 0, None), np.clip(high - roi, 0, None)])
        ax.bar(table["channel"], roi, yerr=err, capsize=3)
        ax.set_ylabel("ROI (fit weeks)" + (" with bootstrap interval" if err is not None else ""))
        ax.tick_params(axis="x", rotation=45, labelsize=7)
