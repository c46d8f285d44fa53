"""Pure numpy/scipy functions of the ``mmm`` kind: panel fit metrics, steady-state response
curves and the budget optimiser. No torch, no Ray.

Response model (what the fitted MMM says about a future period of ``W`` weeks): with
adstock weights that sum to one, a constant weekly activity ``a`` has steady-state
adstock ``a``, so channel ``c`` in region ``r`` yields per week::

    f_rc(a) = kpi_scale[r] · beta[r, c] · hill(a / media_scale[r, c]; K_c, s_c)

with ``beta[r, c]`` the channel's coefficient averaged over the region's fit weeks. A
spend ``S`` over the period buys ``S / cost_c`` activity, spread evenly over the weeks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from distributed_hte.errors import UserError

# ----------------------------------------------------------------------------- metrics


def fit_metrics(y: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """rmse, mape, r2 (pooled over region-weeks) and r2_within_region on ``mask``.

    Args: y, pred ``(R, T)``; mask ``(R, T)`` bool. Within-region R² demeans the KPI by
    each region's mean over its masked weeks (the prediction by the same number).
    """
    m = mask.astype(bool)
    n = m.sum()
    if n == 0:
        return {"rmse": float("nan"), "mape": float("nan"), "r2": float("nan"),
                "r2_within_region": float("nan"), "region_weeks": 0}  # fmt: skip
    err = (y - pred)[m]
    sse = float(err @ err)
    yv = y[m]
    tss = float(((yv - yv.mean()) ** 2).sum())
    cnt = np.maximum(m.sum(1, keepdims=True), 1)
    region_mean = (y * m).sum(1, keepdims=True) / cnt
    tss_w = float((((y - region_mean) ** 2) * m).sum())
    nz = m & (y != 0)
    return {
        "rmse": float(np.sqrt(sse / n)),
        "mape": float(np.mean(np.abs((y - pred)[nz] / y[nz]))) if nz.any() else float("nan"),
        "r2": 1.0 - sse / tss if tss > 0 else float("nan"),
        "r2_within_region": 1.0 - sse / tss_w if tss_w > 0 else float("nan"),
        "region_weeks": int(n),
    }


def naive_forecasts(y: np.ndarray, fit: np.ndarray, last: int = 8) -> dict[str, np.ndarray]:
    """The two naive forecasts ``(R, T)``: each region's fit-period mean, and the mean of
    its last ``last`` fit weeks."""
    cnt = np.maximum(fit.sum(1, keepdims=True), 1)
    mean = (y * fit).sum(1, keepdims=True) / cnt
    rank_from_end = np.cumsum(fit[:, ::-1], axis=1)[:, ::-1]
    tail = fit & (rank_from_end <= last)
    tail_mean = (y * tail).sum(1, keepdims=True) / np.maximum(tail.sum(1, keepdims=True), 1)
    shape = y.shape
    return {
        "naive_region_mean": np.broadcast_to(mean, shape),
        f"naive_last_{last}_weeks": np.broadcast_to(tail_mean, shape),
    }


# ----------------------------------------------------------------------------- response


def hill_np(a: np.ndarray, k: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """``a^s / (a^s + K^s)``, 0 at 0. Broadcasts."""
    a = np.maximum(a, 0.0)
    safe = np.where(a > 0, a, 1.0)
    return np.where(a > 0, 1.0 / (1.0 + (k / safe) ** slope), 0.0)


def hill_grad(a: np.ndarray, k: np.ndarray, slope: np.ndarray) -> np.ndarray:
    """d hill / d a. Broadcasts."""
    a = np.maximum(a, 1e-12)
    r = (k / a) ** slope
    return slope * r / (a * (1.0 + r) ** 2)


@dataclass(frozen=True)
class Response:
    """What the response curves need. R regions, C channels."""

    kpi_scale: np.ndarray  # (R,)
    beta: np.ndarray  # (R, C) mean coefficient over the fit weeks
    media_scale: np.ndarray  # (R, C)
    hill_k: np.ndarray  # (C,)
    hill_slope: np.ndarray  # (C,)
    cost: np.ndarray  # (C,) spend per unit of activity
    split: np.ndarray  # (R, C) each region's share of the channel's fit-period spend

    def weekly(self, spend_rc: np.ndarray) -> np.ndarray:
        """KPI per week ``(R, C)`` at weekly spend ``spend_rc`` ``(R, C)``."""
        a = spend_rc / self.cost / self.media_scale
        return self.kpi_scale[:, None] * self.beta * hill_np(a, self.hill_k, self.hill_slope)

    def weekly_grad(self, spend_rc: np.ndarray) -> np.ndarray:
        """d weekly KPI / d weekly spend ``(R, C)``."""
        unit = self.cost * self.media_scale
        g = hill_grad(spend_rc / unit, self.hill_k, self.hill_slope)
        return self.kpi_scale[:, None] * self.beta * g / unit

    def period_kpi(self, alloc: np.ndarray, weeks: int) -> float:
        """KPI over ``weeks`` from channel totals ``(C,)`` or region totals ``(R, C)``."""
        rc = alloc if alloc.ndim == 2 else self.split * alloc[None, :]
        return float(self.weekly(rc / weeks).sum() * weeks)


@dataclass(frozen=True)
class BudgetResult:
    """An allocation and what it is predicted to yield."""

    allocation: np.ndarray  # (C,) or (R, C) total spend over the period
    kpi: float  # media KPI over the period
    current_allocation: np.ndarray  # (C,) the fit-period spend mix scaled to the budget
    current_kpi: float
    success: bool
    message: str


def optimise_budget(
    resp: Response,
    budget: float,
    weeks: int,
    bounds: np.ndarray,
    current_mix: np.ndarray,
    by_region: bool = False,
) -> BudgetResult:
    """Maximise the period's media KPI subject to ``Σ spend = budget`` and channel bounds.

    Args: bounds ``(C, 2)`` total spend per channel over the period (``inf`` allowed);
    current_mix ``(C,)`` fractions summing to one (the historical spend mix). With
    ``by_region`` the variables are ``(R, C)`` and a channel's bounds apply to its sum
    over regions. scipy SLSQP; the result is checked against every constraint.
    """
    r_n, c_n = resp.beta.shape
    lo, hi = bounds[:, 0], np.minimum(bounds[:, 1], budget)
    if lo.sum() > budget * (1 + 1e-9) or hi.sum() < budget * (1 - 1e-9):
        raise UserError(
            f"optimize: no allocation meets the bounds: lower bounds add up to {lo.sum():g}, "
            f"upper bounds to {hi.sum():g}, the budget is {budget:g}"
        )
    current = _project(current_mix * budget, lo, hi, budget)
    x0 = current / budget
    if by_region:
        x0 = (resp.split * x0[None, :]).ravel()
        var_bounds = [(0.0, hi[j] / budget) for _ in range(r_n) for j in range(c_n)]
        cons = [{"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones_like(x)}]
        for j in range(c_n):
            sel = np.zeros(r_n * c_n)
            sel[j::c_n] = 1.0
            cons.append({"type": "ineq", "fun": lambda x, s=sel, b=hi[j]: b / budget - s @ x,
                         "jac": lambda x, s=sel: -s})  # fmt: skip
            cons.append({"type": "ineq", "fun": lambda x, s=sel, b=lo[j]: s @ x - b / budget,
                         "jac": lambda x, s=sel: s})  # fmt: skip

        def unpack(x: np.ndarray) -> np.ndarray:
            return x.reshape(r_n, c_n) * budget
    else:
        var_bounds = [(lo[j] / budget, hi[j] / budget) for j in range(c_n)]
        cons = [{"type": "eq", "fun": lambda x: x.sum() - 1.0, "jac": lambda x: np.ones_like(x)}]

        def unpack(x: np.ndarray) -> np.ndarray:
            return x * budget

    norm = max(resp.period_kpi(current, weeks), 1e-12)

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        alloc = unpack(x)
        rc = alloc if by_region else resp.split * alloc[None, :]
        value = resp.weekly(rc / weeks).sum() * weeks
        g_rc = resp.weekly_grad(rc / weeks)  # d period KPI / d region-channel total
        grad = g_rc.ravel() if by_region else (g_rc * resp.split).sum(0)
        return -value / norm, -grad * budget / norm

    res = minimize(
        objective, x0, jac=True, method="SLSQP", bounds=var_bounds, constraints=cons,
        options={"maxiter": 500, "ftol": 1e-12},
    )  # fmt: skip
    alloc = unpack(np.clip(res.x, [b[0] for b in var_bounds], [b[1] for b in var_bounds]))
    totals = alloc.sum(0) if by_region else alloc
    # SLSQP meets constraints to its tolerance; rescale onto the exact budget within bounds.
    fixed = _project(totals, lo, hi, budget)
    if by_region:
        ratio = np.divide(fixed, totals, out=np.ones_like(fixed), where=totals > 0)
        alloc = alloc * ratio[None, :]
        zero = totals <= 0
        alloc[:, zero] = resp.split[:, zero] * fixed[None, zero]
    else:
        alloc = fixed
    kpi = resp.period_kpi(alloc, weeks)
    cur_kpi = resp.period_kpi(current, weeks)
    if kpi < cur_kpi:  # never recommend something worse than the current mix
        alloc = resp.split * current[None, :] if by_region else current
        kpi = cur_kpi
    return BudgetResult(alloc, kpi, current, cur_kpi, bool(res.success), str(res.message))


def _project(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, total: float) -> np.ndarray:
    """The point of ``{lo ≤ z ≤ hi, Σ z = total}`` reached by shifting ``x`` uniformly
    (bisection on the shift): exact feasibility after an iterative solver."""
    a, b = -total - np.abs(x).max() - hi.max(), total + hi.max()
    for _ in range(200):
        mid = (a + b) / 2
        if np.clip(x + mid, lo, hi).sum() < total:
            a = mid
        else:
            b = mid
    return np.clip(x + (a + b) / 2, lo, hi)
