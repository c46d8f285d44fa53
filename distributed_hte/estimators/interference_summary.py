"""Reduce per-query estimator values to estimates, recovery and diagnostics.

The estimation pass writes one row per query (influence values ``psi:*``, plug-in values
``theta:*``, benchmark terms ``term:*``, the exposure flags and the viewer features). This
module streams those rows in batches into additive sums (:class:`QuerySums`) and turns the
sums into the estimates table and the diagnostics. Pure functions and a small accumulator:
the rows are never collected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distributed_hte.estimators import interference as est

BENCHMARKS = ("HT_DIM", "HA_DIM", "PDL", "IPW", "AIPW")


def _np_sums(x: np.ndarray) -> dict[str, float]:
    """:func:`~distributed_hte.estimators.interference.mean_sums` of a numpy column."""
    x = np.asarray(x, dtype=np.float64)
    return {"n": float(x.size), "s": float(x.sum()), "ss": float(x @ x)}


@dataclass
class QuerySums:
    """Additive sums over query rows; :meth:`add` one batch (column → ``(n,)`` array)."""

    sums: dict[str, dict[str, float]] = field(default_factory=dict)
    hajek: dict[str, float] = field(default_factory=dict)
    diag: dict[str, float] = field(default_factory=dict)
    fold_sums: dict[int, dict[str, float]] = field(default_factory=dict)
    x_cols: list[str] = field(default_factory=list)

    def add(self, b: dict[str, np.ndarray]) -> None:
        cols = list(b)
        if not self.x_cols:
            self.x_cols = [c for c in cols if c.startswith("x") and c[1:].isdigit()]
        for c in cols:
            if c.startswith(("psi:", "theta:", "term:")):
                est.add_sums(self.sums.setdefault(c, {}), _np_sums(b[c]))
        we, y = b["exposed_treated"], b["y"]
        est.add_sums(self.hajek, est.hajek_sums_exposed(we, y))
        add = {
            "model_treated_share": float(b["model_treated_share"].sum()),
            "ridge_queries": float((b["ridge"] > 0).sum()),
            "max_size": float(b["size"].max(initial=0)),
        }
        for c in self.x_cols:
            x = b[c]
            for side, m in (("t", we == 1), ("c", we == 0)):
                add[f"{c}:{side}:s"] = float(x[m].sum())
                add[f"{c}:{side}:ss"] = float((x[m] ** 2).sum())
        for c in cols:
            if c.startswith("sum:"):
                add[c] = float(b[c].sum())
        for k, v in add.items():
            d = self.diag
            d[k] = max(d.get(k, 0.0), v) if k == "max_size" else d.get(k, 0.0) + v
        for f in np.unique(b["fold"]):
            m = b["fold"] == f
            est.add_sums(self.fold_sums.setdefault(int(f), {}), _np_sums(b["psi:gte"][m]))


def estimates_from(
    s: QuerySums, settings: est.DBSettings, level: float, subgroup_vocab: np.ndarray | None
) -> dict[str, Any]:
    """DB (with policy values, subgroups, per fold), plug-in and every benchmark."""

    def mean_est(col: str) -> dict[str, float]:
        return est.mean_estimate(s.sums[col], level).to_dict()

    n = s.sums["psi:gte"]["n"]
    db: dict[str, Any] = mean_est("psi:gte")
    db["n_queries"] = int(n)
    db["mean_correction"] = (s.sums["psi:gte"]["s"] - s.sums["theta:gte"]["s"]) / n
    policies = [t for t in est.target_names(settings) if t.startswith("V_q=")]
    db["policy_values"] = {t[len("V_q=") :]: mean_est(f"psi:{t}") for t in policies}
    if settings.n_groups:
        assert subgroup_vocab is not None
        db["subgroups"] = {
            str(subgroup_vocab[g]): mean_est(f"psi:group={g}") for g in range(settings.n_groups)
        }
    db["by_fold"] = {
        str(f): est.mean_estimate(v, level).to_dict() for f, v in sorted(s.fold_sums.items())
    }
    plug = mean_est("theta:gte")
    plug["policy_values"] = {t[len("V_q=") :]: mean_est(f"theta:{t}") for t in policies}
    out: dict[str, Any] = {"DB": db, "HT_DIM": mean_est("term:HT_DIM")}
    out["HA_DIM"] = est.hajek_estimate(s.hajek, level).to_dict()
    for name in ("PDL", "IPW", "AIPW"):
        out[name] = mean_est(f"term:{name}")
    out["plug_in"] = plug
    return out


def truth_errors(estimates: dict[str, Any], truth: dict, level: float) -> dict[str, Any]:
    """Each estimator's error against the simulated GTE, and whether its interval covers it."""
    z = est.z_value(level)
    tv = truth["gte"]["value"]
    out: dict[str, Any] = {"gte": tv}
    for name in ["DB", *BENCHMARKS, "plug_in"]:
        e = estimates[name]
        out[f"{name}_error"] = e["estimate"] - tv
        out[f"{name}_covers"] = bool(abs(e["estimate"] - tv) <= z * e["se"])
    for q, v in estimates["DB"]["policy_values"].items():
        t = truth.get(f"V_q={q}")
        if t is not None:
            out[f"V_q={q}_error"] = v["estimate"] - t["value"]
    return out


def recovery(s: QuerySums, truth_columns: list[str]) -> dict[str, float]:
    """Correlation of fitted and true pair-level parameters (``tau_true``, ``mu_true``)."""
    out = {}
    for c in truth_columns:
        t = {k.split(":")[-1]: v for k, v in s.diag.items() if k.startswith(f"sum:{c}:")}
        if t.get("n", 0) > 2:
            cov = t["ab"] - t["a"] * t["b"] / t["n"]
            va = t["aa"] - t["a"] ** 2 / t["n"]
            vb = t["bb"] - t["b"] ** 2 / t["n"]
            if va > 0 and vb > 0:
                out[f"{c.replace('_true', '')}_corr"] = cov / math.sqrt(va * vb)
    return out


def diagnostics(
    s: QuerySums, settings: est.DBSettings, viewer_features: list[str], context: dict[str, Any]
) -> dict[str, Any]:
    """Exposure against assignment, and viewer-feature balance of treated vs control exposures.

    ``context``: rows, max_set_size, outcome_type, folds, hessian, hessian_draws, items,
    treated_items (what the kind knows about its data and settings).
    """
    n = s.sums["psi:gte"]["n"]
    p = settings.p
    share = s.hajek["n_t"] / n
    se = math.sqrt(p * (1 - p) / n)
    out: dict[str, Any] = {
        "queries": int(n),
        **{k: context[k] for k in ("rows", "max_set_size", "outcome_type", "folds", "hessian")},
        "hessian_draws": context["hessian_draws"],
        "hessian_ridge_queries": int(s.diag.get("ridge_queries", 0)),
        "assignment": {
            "items": context["items"],
            "treated_items": context["treated_items"],
            "treated_share": context["treated_items"] / max(context["items"], 1),
            "p_treat": p,
        },
        "exposure": {
            "treated_share": share,
            "p_treat": p,
            "difference": share - p,
            # Under no interference the exposed item is treated with probability p.
            "z_vs_p": (share - p) / se if se > 0 else None,
            "model_treated_share": s.diag.get("model_treated_share", 0.0) / n,
        },
        "viewer_features": {},
    }
    nt, nc = s.hajek["n_t"], s.hajek["n_c"]
    for j, c in enumerate(s.x_cols):
        if nt < 2 or nc < 2:
            continue
        d = s.diag
        mt, mc = d[f"{c}:t:s"] / nt, d[f"{c}:c:s"] / nc
        vt = max(d[f"{c}:t:ss"] / nt - mt**2, 0.0)
        vc = max(d[f"{c}:c:ss"] / nc - mc**2, 0.0)
        se_d = math.sqrt(vt / nt + vc / nc)
        out["viewer_features"][viewer_features[j]] = {
            "mean_treated_exposures": mt,
            "mean_control_exposures": mc,
            "difference": mt - mc,
            "relative_difference": (mt - mc) / mc if mc != 0 else None,
            "se": se_d,
            "t": (mt - mc) / se_d if se_d > 0 else None,
        }
    return out
