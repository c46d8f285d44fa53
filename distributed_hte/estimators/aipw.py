"""AIPW (doubly robust) estimation from streamed sums: pure functions of arrays.

Per row i with treatment t, outcome y, clipped propensity ê and outcome predictions
μ̂1, μ̂0 (each from the models of the folds that did not contain i):

    ψ_i = μ̂1 − μ̂0 + t (y − μ̂1) / ê − (1 − t) (y − μ̂0) / (1 − ê)

A segment's effect is the mean of ψ over its rows, its standard error
``sd(ψ, ddof=1) / √n`` (the seed notebook's). Both need only the count, Σψ and Σψ²
of the segment, so rows are never collected. DoubleML's IRM uses ``ddof=0`` (its SE
is ours × √((n−1)/n)), and its ``gate()`` runs OLS of ψ on group dummies with HC0
standard errors: the same point estimates, and SEs × √((n_g−1)/n_g).

Joint (simultaneous) bands over the G segments of one segmentation: the Gaussian
multiplier bootstrap of the max-|t| statistic (DoubleML's ``confint(joint=True)``) draws
ξ_i ~ N(0, 1) per row; ``Σ_i ξ_i (ψ_i − θ_g)/n_g`` is, given the data, exactly normal
with covariance diag(σ̂²_g/n_g), because the segments of one segmentation are
disjoint. The max-|t| over G independent standard normals has the closed-form quantile
``Φ⁻¹((1 + level^(1/G)) / 2)``: the bootstrap's critical value without its Monte Carlo
error, computed from the per-segment sums alone.

That Gaussian critical value is only as good as the normal approximation of each
segment's studentized mean in its tails (the 1 − (1 − level)/(2G) quantile). With rare
treatment and rare outcomes ψ is strongly right-skewed (a treated click weighs 1/ê), so
the studentized mean is left-skewed, its tails are not normal, and a band that needs
every segment covered at once under-covers even with the true nuisances (measured:
``benchmarks/README.md``, aipw_segments coverage). The joint band therefore uses Hall's
(1992) monotone skewness-removing transformation of the studentized mean,
``g(T) = T + cT² + c²T³/3 + γ̂/(6√n)`` with ``c = γ̂/(3√n)`` and γ̂ the sample skewness of
ψ in the segment (from Σψ³), whose distribution is N(0, 1) up to O(1/n) instead of
O(1/√n); the band is ``{θ: |g((θ̂ − θ)/se)| ≤ crit}``, longer on the side of the skew.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# scipy is imported inside the functions that use it: a kind package imports this module,
# and its spec must import (for `dhte validate`) where torch is unavailable, which scipy's
# array-API layer probes for.


def aipw_scores(
    t: np.ndarray, y: np.ndarray, e: np.ndarray, mu1: np.ndarray, mu0: np.ndarray, clip: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(ψ (n,), clipped (n,) bool)``: AIPW scores with ê clipped to [clip, 1 − clip]."""
    e_c = np.clip(e, clip, 1.0 - clip)
    clipped = (e < clip) | (e > 1.0 - clip)
    psi = mu1 - mu0 + t * (y - mu1) / e_c - (1 - t) * (y - mu0) / (1.0 - e_c)
    return psi, clipped


# ----------------------------------------------------------------------------- logistic


@dataclass(frozen=True, slots=True)
class GlmSums:
    """Additive sums of one model over its training rows at coefficients β ``(d+1,)``.

    ``loss`` Σ ℓ_i; ``grad`` ``(d+1,)`` Σ ∂ℓ_i/∂β; ``hess`` ``(d+1, d+1)``; ``n`` rows.
    The last coefficient is the (unpenalised) intercept.
    """

    loss: float
    grad: np.ndarray
    hess: np.ndarray
    n: float


def glm_sums(x: np.ndarray, y: np.ndarray, beta: np.ndarray, link: str) -> GlmSums:
    """Loss, gradient and Hessian of ``x (n, d)`` (intercept appended here) at ``beta``.

    ``link``: ``logit`` (log loss, y in {0,1}) or ``identity`` (½ squared error).
    """
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    z = xa @ beta
    if link == "logit":
        p = 1.0 / (1.0 + np.exp(-z))
        # log(1 + e^z) − y z, stably
        loss = float(np.sum(np.logaddexp(0.0, z) - y * z))
        r = p - y
        w = p * (1.0 - p)
    else:
        r = z - y
        loss = float(0.5 * np.dot(r, r))
        w = np.ones_like(z)
    return GlmSums(loss, xa.T @ r, (xa * w[:, None]).T @ xa, float(len(y)))


def penalised_newton_step(s: GlmSums, beta: np.ndarray, C: float) -> tuple[np.ndarray, float]:
    """Newton step for Σℓ + ‖w‖²/(2C) (sklearn ``LogisticRegression(C=C)``'s objective;
    the intercept, last, is not penalised). Returns ``(step, objective at beta)``."""
    pen = np.full(len(beta), 1.0 / C)
    pen[-1] = 0.0
    grad = s.grad + pen * beta
    hess = s.hess + np.diag(pen)
    step = -np.linalg.solve(hess + 1e-12 * np.eye(len(beta)), grad)
    return step, s.loss + 0.5 * float(np.sum(pen * beta * beta))


def predict_glm(x: np.ndarray, beta: np.ndarray, link: str) -> np.ndarray:
    """``(n,)`` predictions of a model with coefficients ``beta`` (intercept last)."""
    z = x @ beta[:-1] + beta[-1]
    return 1.0 / (1.0 + np.exp(-z)) if link == "logit" else z


# ----------------------------------------------------------------------------- segments


def mean_se(n: np.ndarray, s: np.ndarray, ss: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and ``sd(ddof=1)/√n`` from count, sum and sum of squares (arrays)."""
    n = np.asarray(n, dtype=np.float64)
    mean = s / np.maximum(n, 1.0)
    var = np.maximum(ss - n * mean**2, 0.0) / np.maximum(n - 1.0, 1.0)
    return mean, np.sqrt(var / np.maximum(n, 1.0))


def skewness(n: np.ndarray, s: np.ndarray, ss: np.ndarray, s3: np.ndarray) -> np.ndarray:
    """Sample skewness ``m3 / sd³`` (``sd`` with ddof=1, as the SE) from count, Σx, Σx², Σx³."""
    n = np.maximum(np.asarray(n, dtype=np.float64), 1.0)
    mean = s / n
    var = np.maximum(ss - n * mean**2, 0.0) / np.maximum(n - 1.0, 1.0)
    m3 = s3 / n - 3.0 * mean * ss / n + 2.0 * mean**3
    sd3 = var**1.5
    return np.where(sd3 > 0, m3 / np.where(sd3 > 0, sd3, 1.0), 0.0)


def skew_corrected_band(
    theta: np.ndarray, se: np.ndarray, n: np.ndarray, gamma: np.ndarray, crit: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(lower, upper)`` of ``{θ: |g((θ̂ − θ)/se)| ≤ crit}`` with Hall's (1992) transformation
    ``g(T) = T + cT² + c²T³/3 + γ/(6√n)``, ``c = γ/(3√n)`` (monotone: g' = (1 + cT)²).

    ``theta``, ``se``, ``n`` rows and ``gamma`` skewness per segment ``(G,)``; with γ = 0 it
    is ``θ̂ ± crit·se``.
    """
    root_n = np.sqrt(np.maximum(np.asarray(n, dtype=np.float64), 1.0))
    c = gamma / (3.0 * root_n)
    shift = gamma / (6.0 * root_n)

    def g_inverse(x: float) -> np.ndarray:
        u = x - shift
        tiny = np.abs(c) < 1e-12
        c_safe = np.where(tiny, 1.0, c)
        return np.where(tiny, u, (np.cbrt(1.0 + 3.0 * c_safe * u) - 1.0) / c_safe)

    return theta - se * g_inverse(crit), theta - se * g_inverse(-crit)


def joint_critical_value(n_segments: int, level: float) -> float:
    """Quantile ``level`` of max |Z_g| over ``n_segments`` independent N(0, 1)."""
    from scipy import stats

    if n_segments < 1:
        return float("nan")
    return float(stats.norm.ppf((1.0 + level ** (1.0 / n_segments)) / 2.0))


def holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (family: the given array)."""
    p = np.asarray(p, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p)
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (scipy's ``false_discovery_control``)."""
    from scipy import stats

    p = np.asarray(p, dtype=np.float64)
    return stats.false_discovery_control(p, method="bh") if len(p) else p


def equal_effects_wald(theta: np.ndarray, se: np.ndarray) -> dict[str, float]:
    """Wald test that all segment effects are equal (independent estimates).

    ``W = Σ (θ_g − θ̄)² / se_g²`` with θ̄ the precision-weighted mean; χ²(G − 1).
    """
    from scipy import stats

    g = len(theta)
    if g < 2:
        return {"statistic": float("nan"), "df": 0, "p_value": float("nan")}
    w = 1.0 / np.maximum(se, 1e-300) ** 2
    pooled = float(np.sum(w * theta) / np.sum(w))
    stat = float(np.sum(w * (theta - pooled) ** 2))
    return {"statistic": stat, "df": g - 1, "p_value": float(stats.chi2.sf(stat, g - 1))}


def segment_estimates(
    n: np.ndarray,
    n_t: np.ndarray,
    sum_y_t: np.ndarray,
    sum_y_c: np.ndarray,
    sum_psi: np.ndarray,
    sum_psi2: np.ndarray,
    level: float,
) -> dict[str, np.ndarray]:
    """Per-segment columns of the notebook (+ p-values) from the segments' sums ``(G,)``."""
    from scipy import stats

    n = np.asarray(n, dtype=np.float64)
    n_c = n - n_t
    treated_rate = sum_y_t / np.maximum(n_t, 1.0)
    control_rate = sum_y_c / np.maximum(n_c, 1.0)
    theta, se = mean_se(n, sum_psi, sum_psi2)
    z = stats.norm.ppf(0.5 + level / 2.0)
    p = 2.0 * stats.norm.sf(np.abs(theta) / np.maximum(se, 1e-300))
    return {
        "rows": n,
        "treated_rows": n_t,
        "control_rows": n_c,
        "treated_rate": treated_rate,
        "control_rate": control_rate,
        "naive_lift": treated_rate - control_rate,
        "dr_lift": theta,
        "standard_error": se,
        "ci_lower": theta - z * se,
        "ci_upper": theta + z * se,
        "p_value": p,
    }


def policy_value(
    rows: np.ndarray, theta: np.ndarray, se: np.ndarray, chosen: np.ndarray, total_rows: float
) -> dict[str, float]:
    """Per-row gain of treating only the ``chosen`` segments (vs treating none), and its SE."""
    rows = np.asarray(rows, dtype=np.float64)
    value = float(np.sum(rows[chosen] * theta[chosen]) / total_rows)
    value_se = float(np.sqrt(np.sum((rows[chosen] * se[chosen]) ** 2)) / total_rows)
    return {
        "value": value,
        "se": value_se,
        "share_rows_treated": float(rows[chosen].sum() / total_rows),
    }


# ----------------------------------------------------------------------------- metrics


def binned_auc_ap(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float]:
    """ROC AUC and average precision from counts of positives and negatives per score bin.

    Bins are ordered by increasing score. Rows in one bin count as tied (half a
    concordant pair, one threshold), so the error against the exact values is bounded by
    the share of pairs that share a bin.
    """
    pos = np.asarray(pos, dtype=np.float64)
    neg = np.asarray(neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    neg_below = np.cumsum(neg) - neg
    auc = float(np.sum(pos * (neg_below + 0.5 * neg)) / (n_pos * n_neg))
    # thresholds from the highest bin down: recall and precision after each bin
    tp = np.cumsum(pos[::-1])
    fp = np.cumsum(neg[::-1])
    keep = (pos[::-1] + neg[::-1]) > 0
    precision = tp[keep] / (tp[keep] + fp[keep])
    recall = tp[keep] / n_pos
    ap = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    return auc, ap


def quantile_cuts(values: np.ndarray, counts: np.ndarray, q: int) -> np.ndarray:
    """Cut points ``(≤ q−1,)``: the empirical j/q quantiles (inverse CDF) of a column.

    ``values`` sorted distinct values, ``counts`` their rows. A row goes to the first bin
    whose cut is ≥ its value, so ties go to the lower bin; duplicate cuts (heavy ties)
    are merged, giving fewer than q bins.
    """
    cdf = np.cumsum(counts) / np.sum(counts)
    idx = np.searchsorted(cdf, np.arange(1, q) / q - 1e-12, side="left")
    cuts = np.unique(values[np.minimum(idx, len(values) - 1)])
    return cuts[cuts < values[-1]]
