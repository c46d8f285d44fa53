"""Tables, summaries and plots of kind ``aipw_segments`` from the merged sums of one pass."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from distributed_hte.estimators import aipw as est
from distributed_hte.kinds.aipw_segments.plugin import OVERLAP_BINS, STATS, SegmentRule
from distributed_hte.kinds.toolkit import figure

_S = {name: i for i, name in enumerate(STATS)}
COLUMNS = [
    "segment_col", "segment", "rows", "treated_rows", "control_rows", "treated_rate",
    "control_rate", "naive_lift", "dr_lift", "standard_error", "ci_lower", "ci_upper",
    "ci_joint_lower", "ci_joint_upper", "p_value", "p_holm", "p_bh", "share_clipped",
    "mean_propensity_treated", "mean_propensity_control",
]  # fmt: skip


def global_effects(g: np.ndarray, level: float) -> dict[str, float]:
    """``{estimate, se, ci_lower, ci_upper}`` of the mean AIPW score over all rows."""
    theta, se = est.mean_se(np.array([g[_S["n"]]]), g[_S["spsi"]], g[_S["spsi2"]])
    z = float(stats.norm.ppf(0.5 + level / 2.0))
    t, s = float(theta[0]), float(se[0])
    return {"estimate": t, "se": s, "ci_lower": t - z * s, "ci_upper": t + z * s}


def naive_effect(g: np.ndarray) -> dict[str, float]:
    """Difference in mean outcomes (treated − control) and its unpooled SE."""
    n_t, n_c = g[_S["n_t"]], g[_S["n"]] - g[_S["n_t"]]
    m_t, m_c = g[_S["sy_t"]] / n_t, g[_S["sy_c"]] / n_c
    v_t = (g[_S["syy_t"]] - n_t * m_t**2) / max(n_t - 1, 1)
    v_c = (g[_S["syy_c"]] - n_c * m_c**2) / max(n_c - 1, 1)
    return {"estimate": float(m_t - m_c), "se": float(np.sqrt(v_t / n_t + v_c / n_c))}


def expected_events(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per segment, the expected count of the rarer outcome value among its treated and
    its control rows, ``min(Σ μ̂, Σ (1 − μ̂))`` over the arm's rows with the out-of-fold
    outcome model (meaningful for binary outcomes). ``s``: ``(G, len(STATS))`` sums.

    Why expected and not observed events: the information about a segment's effect with
    a binary outcome sits in its events (a treated click weighs 1/ê), but a filter on the
    *observed* count keeps a segment exactly when it drew many events, which biases the
    kept estimates upward; the model's expectation does not depend on the segment's own
    outcomes (out of fold), so filtering on it does not select on the estimate.
    """
    n_t, n_c = s[:, _S["n_t"]], s[:, _S["n"]] - s[:, _S["n_t"]]
    ev_t, ev_c = s[:, _S["ev_t"]], s[:, _S["ev_c"]]
    return np.minimum(ev_t, n_t - ev_t), np.minimum(ev_c, n_c - ev_c)


def segment_tables(
    rules: list[SegmentRule], sums: dict[str, np.ndarray], level: float
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The segment effects table, the filtered-out segments with why, and per segmentation
    the joint critical value, the equal-effects Wald test and the policy value."""
    rows, dropped, per = [], [], {}
    for rule in rules:
        s = sums[rule.column][: len(rule.labels)]  # the last row: outside (none on fit data)
        n, n_t = s[:, _S["n"]], s[:, _S["n_t"]]
        n_c = n - n_t
        ev_t, ev_c = expected_events(s)
        why = []
        for j in range(len(rule.labels)):
            reasons = []
            if n[j] < rule.min_rows:
                reasons.append(f"rows {int(n[j])} < {rule.min_rows}")
            if n_t[j] < rule.min_treated:
                reasons.append(f"treated {int(n_t[j])} < {rule.min_treated}")
            if n_c[j] < rule.min_control:
                reasons.append(f"control {int(n_c[j])} < {rule.min_control}")
            if ev_t[j] < rule.min_treated_events:
                reasons.append(
                    f"expected treated events {ev_t[j]:.1f} < {rule.min_treated_events:g}"
                )
            if ev_c[j] < rule.min_control_events:
                reasons.append(
                    f"expected control events {ev_c[j]:.1f} < {rule.min_control_events:g}"
                )
            why.append("; ".join(reasons))
        keep = np.array([w == "" for w in why]) & (n > 1)
        for j in np.flatnonzero(~keep):
            if n[j] == 0:
                continue  # a level or bin with no rows at all
            dropped.append(
                {
                    "segment_col": rule.column,
                    "segment": rule.labels[j],
                    "rows": int(n[j]),
                    "treated_rows": int(n_t[j]),
                    "control_rows": int(n_c[j]),
                    "expected_treated_events": float(ev_t[j]),
                    "expected_control_events": float(ev_c[j]),
                    "reason": why[j] or "fewer than 2 rows",
                }
            )
        idx = np.flatnonzero(keep)
        total_rows = float(n.sum())
        if len(idx) == 0:
            per[rule.column] = {"segments": 0, "rows": int(total_rows)}
            continue
        k = s[idx]
        cols = est.segment_estimates(
            k[:, _S["n"]], k[:, _S["n_t"]], k[:, _S["sy_t"]], k[:, _S["sy_c"]],
            k[:, _S["spsi"]], k[:, _S["spsi2"]], level,
        )  # fmt: skip
        crit = est.joint_critical_value(len(idx), level)
        theta, se = cols["dr_lift"], cols["standard_error"]
        frame = pd.DataFrame(cols)
        frame.insert(0, "segment", [rule.labels[j] for j in idx])
        frame.insert(0, "segment_col", rule.column)
        # Skewness-corrected (Hall 1992): a symmetric band under-covers with skewed ψ.
        gamma = est.skewness(k[:, _S["n"]], k[:, _S["spsi"]], k[:, _S["spsi2"]], k[:, _S["spsi3"]])
        lower, upper = est.skew_corrected_band(theta, se, k[:, _S["n"]], gamma, crit)
        frame["ci_joint_lower"] = lower
        frame["ci_joint_upper"] = upper
        frame["skewness"] = gamma
        frame["p_holm"] = est.holm(cols["p_value"])
        frame["p_bh"] = est.benjamini_hochberg(cols["p_value"])
        frame["share_clipped"] = k[:, _S["n_clip"]] / k[:, _S["n"]]
        frame["mean_propensity_treated"] = k[:, _S["se_t"]] / np.maximum(k[:, _S["n_t"]], 1)
        frame["mean_propensity_control"] = k[:, _S["se_c"]] / np.maximum(
            k[:, _S["n"]] - k[:, _S["n_t"]], 1
        )
        frame["expected_treated_events"] = ev_t[idx]
        frame["expected_control_events"] = ev_c[idx]
        if k[:, _S["n_tau"]].sum() > 0:
            frame["true_effect"] = k[:, _S["s_tau"]] / np.maximum(k[:, _S["n_tau"]], 1)
        rows.append(frame)
        chosen = frame["ci_joint_lower"].to_numpy() > 0
        per[rule.column] = {
            "rule": rule.rule,
            "segments": int(len(idx)),
            "filtered_out": int((~keep & (n > 0)).sum()),
            "rows": int(total_rows),
            "joint_critical_value": crit,
            "joint_band": "max-|t| critical value applied to each segment's studentized mean "
            "after Hall's (1992) skewness correction",
            "equal_effects_wald": est.equal_effects_wald(theta, se),
            "treat_positive_joint_lower_bound": {
                "segments": frame.loc[chosen, "segment"].tolist(),
                **est.policy_value(frame["rows"].to_numpy(), theta, se, chosen, total_rows),
            },
        }
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=COLUMNS)
    extra = [c for c in table.columns if c not in COLUMNS]
    table = table[COLUMNS + extra]
    for c in ("rows", "treated_rows", "control_rows"):
        table[c] = table[c].astype(np.int64)
    filtered = pd.DataFrame(
        dropped,
        columns=[
            "segment_col",
            "segment",
            "rows",
            "treated_rows",
            "control_rows",
            "expected_treated_events",
            "expected_control_events",
            "reason",
        ],  # fmt: skip
    )
    return table, filtered, per


def nuisance_table(metrics: dict[str, Any], n_folds: int) -> pd.DataFrame:
    """Per fold and model: ROC AUC, average precision (binned), Brier, log loss, MSE."""
    out = []
    for model, m in metrics.items():
        sums, hist = m["sums"], m["hist"]
        for k in range(n_folds):
            n = max(sums[k, 0], 1.0)
            binary = hist[k].sum() > 0
            auc, ap = est.binned_auc_ap(hist[k, 1], hist[k, 0]) if binary else (np.nan, np.nan)
            out.append(
                {
                    "model": model,
                    "fold": k,
                    "rows": int(sums[k, 0]),
                    "positive_rate": sums[k, 1] / n,
                    "roc_auc": auc,
                    "average_precision": ap,
                    "brier_score": sums[k, 3] / n if binary else np.nan,
                    "log_loss": sums[k, 2] / n if binary else np.nan,
                    "mse": sums[k, 4] / n,
                }
            )
    return pd.DataFrame(out)


def overlap_table(hist: np.ndarray) -> pd.DataFrame:
    """Rows per propensity bin and arm (unclipped ê)."""
    edges = np.linspace(0.0, 1.0, OVERLAP_BINS + 1)
    return pd.DataFrame(
        {
            "e_low": edges[:-1],
            "e_high": edges[1:],
            "control_rows": hist[0].astype(np.int64),
            "treated_rows": hist[1].astype(np.int64),
        }
    )


def truth_recovery(
    truth: dict | None, sums: dict[str, Any], table: pd.DataFrame, effects: dict, design
) -> dict[str, Any]:
    """Errors against the truth: the rows' own true effects (``tau``) and truth.json."""
    out: dict[str, Any] = {}
    g = sums["global"]
    if g[_S["n_tau"]] > 0:
        sample_ate = float(g[_S["s_tau"]] / g[_S["n_tau"]])
        out["sample_ate"] = sample_ate
        out["global_error_in_se"] = (effects["estimate"] - sample_ate) / effects["se"]
        if "true_effect" in table:
            t = table.dropna(subset=["true_effect"])
            z = (t["dr_lift"] - t["true_effect"]) / t["standard_error"]
            out["segments_covered"] = float(
                ((t["ci_lower"] <= t["true_effect"]) & (t["true_effect"] <= t["ci_upper"])).mean()
            )
            out["max_abs_error_in_se"] = float(z.abs().max())
            out["segmentations_jointly_covered"] = {
                col: bool(
                    ((grp["ci_joint_lower"] <= grp["true_effect"])
                     & (grp["true_effect"] <= grp["ci_joint_upper"])).all()
                )
                for col, grp in t.groupby("segment_col")
            }  # fmt: skip
    if truth is not None:
        out["population_ate"] = float(truth["ate"])
    return out


def plots(table: pd.DataFrame, overlap: pd.DataFrame, run) -> None:
    """A forest plot per segmentation, naive vs DR lift, propensity overlap."""
    for col, grp in table.groupby("segment_col", sort=False):
        grp = grp.sort_values("dr_lift")
        y = np.arange(len(grp))
        with figure(
            run.file("plots", f"forest_{_safe(col)}.png"), (7, max(3, 0.4 * len(grp) + 1))
        ) as (_, ax):
            ax.hlines(
                y, grp["ci_joint_lower"], grp["ci_joint_upper"], color="0.7", lw=6, label="joint"
            )
            ax.hlines(y, grp["ci_lower"], grp["ci_upper"], color="C0", lw=2, label="pointwise")
            ax.plot(grp["dr_lift"], y, "o", color="C0")
            if "true_effect" in grp:
                ax.plot(grp["true_effect"], y, "x", color="C3", label="truth")
            ax.axvline(0, color="k", lw=0.8)
            ax.set_yticks(y, grp["segment"])
            ax.set_xlabel("doubly robust lift")
            ax.set_title(f"AIPW effect by {col}")
            ax.legend(fontsize=7)
    with figure(run.file("plots", "naive_vs_dr.png"), (5, 5)) as (_, ax):
        for col, grp in table.groupby("segment_col", sort=False):
            ax.plot(grp["naive_lift"], grp["dr_lift"], "o", label=col)
        if len(table):
            lo = float(min(table["naive_lift"].min(), table["dr_lift"].min()))
            hi = float(max(table["naive_lift"].max(), table["dr_lift"].max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel("naive lift")
        ax.set_ylabel("doubly robust lift")
        ax.legend(fontsize=7)
    with figure(run.file("plots", "propensity_overlap.png")) as (_, ax):
        mid = (overlap["e_low"] + overlap["e_high"]) / 2
        w = overlap["e_high"] - overlap["e_low"]
        for arm, color in (("control_rows", "C0"), ("treated_rows", "C1")):
            share = overlap[arm] / max(overlap[arm].sum(), 1)
            ax.bar(mid, share, width=w, alpha=0.5, color=color, label=arm.split("_")[0])
        ax.set_xlabel("propensity ê (unclipped)")
        ax.set_ylabel("share of the arm's rows")
        ax.legend()


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
