"""Streaming regression and recovery metrics from additive sums.

Each function takes sums that were accumulated batch by batch (and across workers),
so metrics over 50M rows never need the rows in one place.
"""

from __future__ import annotations

import math

import numpy as np


def regression_sums(y: np.ndarray, y_hat: np.ndarray) -> dict[str, float]:
    """Additive sums for MSE / RMSE / R² of ``y_hat`` against ``y`` (both ``(n,)``)."""
    r = y - y_hat
    return {
        "n": float(len(y)),
        "sse": float(r @ r),
        "sum_y": float(y.sum()),
        "sum_y2": float(y @ y),
    }


def regression_metrics(s: dict[str, float], prefix: str = "") -> dict[str, float]:
    """``loss`` (MSE), ``rmse`` and ``r2`` from :func:`regression_sums` totals."""
    n = max(s["n"], 1.0)
    mse = s["sse"] / n
    tss = s["sum_y2"] - s["sum_y"] ** 2 / n
    return {
        f"{prefix}loss": mse,
        f"{prefix}rmse": math.sqrt(mse),
        f"{prefix}r2": 1.0 - s["sse"] / tss if tss > 0 else float("nan"),
        f"{prefix}rows": s["n"],
    }


def correlation_sums(a: np.ndarray, b: np.ndarray, name: str) -> dict[str, float]:
    """Additive sums for the Pearson correlation of ``a`` and ``b`` (both ``(n,)``)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return {
        f"{name}_n": float(len(a)),
        f"{name}_sa": float(a.sum()),
        f"{name}_sb": float(b.sum()),
        f"{name}_saa": float(a @ a),
        f"{name}_sbb": float(b @ b),
        f"{name}_sab": float(a @ b),
        f"{name}_sdd": float((a - b) @ (a - b)),
    }


def correlation_from_sums(s: dict[str, float], name: str) -> dict[str, float]:
    """Pearson correlation and RMSE between the two series summed by :func:`correlation_sums`."""
    n = s[f"{name}_n"]
    if n < 2:
        return {f"{name}_corr": float("nan"), f"{name}_rmse": float("nan")}
    cov = s[f"{name}_sab"] - s[f"{name}_sa"] * s[f"{name}_sb"] / n
    va = s[f"{name}_saa"] - s[f"{name}_sa"] ** 2 / n
    vb = s[f"{name}_sbb"] - s[f"{name}_sb"] ** 2 / n
    corr = cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")
    return {f"{name}_corr": corr, f"{name}_rmse": math.sqrt(s[f"{name}_sdd"] / n)}


def flatten_metrics(tree: dict, sep: str = ".", prefix: str = "") -> dict[str, object]:
    """``{"val": {"r2": x}}`` → ``{"val<sep>r2": x}`` (leaves kept as they are)."""
    out: dict[str, object] = {}
    for k, v in tree.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten_metrics(v, sep, key))
        else:
            out[key] = v
    return out
