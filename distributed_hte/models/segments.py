"""Segment discovery by group lasso over creatives, solved exactly (kind ``segments``).

Problem (see ``shared/notes/group_lasso_segments.md``). Person i saw creative k of segment
j = seg(k) and responded y_i ∈ {0, 1}; x_i ∈ R^p are standardised covariates. With an
unpenalised intercept c_k per creative and β_k = γ_seg(k) + δ_k,

    F(c, γ, δ) = (1/N) Σ_i logloss(y_i, c_k(i) + β_k(i)ᵀ x_i)
                 + λ Σ_j [ (1 − α)/n_j Σ_{k in j} ‖δ_k‖₂ + α ‖γ_j‖₁ ].

The solver is a proximal Newton method. One data pass gives the loss, the gradient and
the (p+1)×(p+1) Hessian of every creative's block, summed over rows (and over workers by
an all-reduce). Everything after that needs no data: a FISTA solve of the penalised
quadratic model (closed-form proximal operators, so zeros are exact), then a line search
whose candidate losses come from one more pass. A few passes reach a KKT residual of
1e-8, so the data can stream from disk every pass: memory is flat in N.

Several problems are solved side by side in lockstep (the leading ``P`` dimension): the
k cross-validation folds and the full-data refit share every data pass.

Shapes: C creatives, m segments, p features, P problems.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

# One block of rows that all saw the same creative.
#   creative: int, x: (n, p) float, y: (n,) float, fold: (n,) int64
CreativeBlock = tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Layout:
    """Which segment every creative belongs to.

    ``segment_of`` is ``(C,)`` int64 with values in ``[0, m)``; ``n_features`` is p.
    """

    segment_of: torch.Tensor
    n_segments: int
    n_features: int

    @property
    def n_creatives(self) -> int:
        return int(self.segment_of.numel())

    def creatives_per_segment(self) -> torch.Tensor:
        """``(m,)`` float64: n_j."""
        return torch.bincount(self.segment_of, minlength=self.n_segments).double()

    def to(self, device: torch.device) -> Layout:
        return Layout(self.segment_of.to(device), self.n_segments, self.n_features)


@dataclass
class Params:
    """Coefficients of P problems: ``c (P, C)``, ``gamma (P, m, p)``, ``delta (P, C, p)``."""

    c: torch.Tensor
    gamma: torch.Tensor
    delta: torch.Tensor

    @staticmethod
    def zeros(n_problems: int, layout: Layout, device=None) -> Params:
        C, m, p = layout.n_creatives, layout.n_segments, layout.n_features
        kw = {"dtype": torch.float64, "device": device}
        return Params(
            torch.zeros(n_problems, C, **kw),
            torch.zeros(n_problems, m, p, **kw),
            torch.zeros(n_problems, C, p, **kw),
        )

    def clone(self) -> Params:
        return Params(self.c.clone(), self.gamma.clone(), self.delta.clone())

    def axpy(self, t: torch.Tensor, d: Params) -> Params:
        """``self + t·d`` with a step ``t`` of shape ``(P,)``."""
        return Params(
            self.c + t[:, None] * d.c,
            self.gamma + t[:, None, None] * d.gamma,
            self.delta + t[:, None, None] * d.delta,
        )

    def minus(self, other: Params) -> Params:
        return Params(self.c - other.c, self.gamma - other.gamma, self.delta - other.delta)

    def select(self, keep: torch.Tensor, other: Params) -> Params:
        """Per problem: ``self`` where ``keep`` (P,) is True, else ``other``."""
        return Params(
            torch.where(keep[:, None], self.c, other.c),
            torch.where(keep[:, None, None], self.gamma, other.gamma),
            torch.where(keep[:, None, None], self.delta, other.delta),
        )

    def flat(self) -> torch.Tensor:
        """``(P, C + m p + C p)``: every coefficient of each problem."""
        P = self.c.shape[0]
        return torch.cat([self.c, self.gamma.reshape(P, -1), self.delta.reshape(P, -1)], dim=1)

    def creative_coefficients(self, layout: Layout) -> torch.Tensor:
        """``(P, C, p + 1)``: per creative, the intercept then β_k = γ_seg(k) + δ_k."""
        beta = self.gamma[:, layout.segment_of] + self.delta
        return torch.cat([self.c[..., None], beta], dim=-1)


# ----------------------------------------------------------------------------- penalty


def penalty_weights(lam: float, alpha: float, layout: Layout) -> tuple[float, torch.Tensor]:
    """``(λα, (C,) λ(1−α)/n_seg(k))``: the l1 weight on γ and each creative's group weight."""
    n_j = layout.creatives_per_segment()
    return lam * alpha, lam * (1.0 - alpha) / n_j[layout.segment_of]


def penalty(params: Params, lam: float, alpha: float, layout: Layout) -> torch.Tensor:
    """``(P,)`` penalty value of every problem."""
    l1, group = penalty_weights(lam, alpha, layout)
    group = group.to(params.delta)
    return l1 * params.gamma.abs().sum(dim=(1, 2)) + (group[None] * params.delta.norm(dim=-1)).sum(
        dim=1
    )


def prox(params: Params, step: torch.Tensor, lam: float, alpha: float, layout: Layout) -> Params:
    """Proximal operator of ``step·penalty`` (``step`` is ``(P,)``); intercepts untouched.

    γ: soft-threshold at step·λα. δ_k: group soft-threshold at step·λ(1−α)/n_j, so a
    creative that matches its segment gets δ_k exactly 0.
    """
    l1, group = penalty_weights(lam, alpha, layout)
    group = group.to(params.delta)
    g_thr = (step * l1)[:, None, None]
    gamma = params.gamma.sign() * (params.gamma.abs() - g_thr).clamp_min(0.0)
    norms = params.delta.norm(dim=-1, keepdim=True)
    d_thr = step[:, None, None] * group[None, :, None]
    scale = (1.0 - d_thr / norms.clamp_min(1e-300)).clamp_min(0.0)
    return Params(params.c, gamma, params.delta * scale)


def gradient_in_params(grad_theta: torch.Tensor, layout: Layout) -> Params:
    """Chain rule from per-creative coefficients to (c, γ, δ).

    ``grad_theta`` is ``(P, C, p + 1)`` (intercept first). ∇δ_k = ∇β_k and
    ∇γ_j = Σ_{k in j} ∇β_k.
    """
    P = grad_theta.shape[0]
    g_beta = grad_theta[..., 1:]
    g_gamma = torch.zeros(
        P, layout.n_segments, layout.n_features, dtype=grad_theta.dtype, device=grad_theta.device
    )
    g_gamma.index_add_(1, layout.segment_of, g_beta)
    return Params(grad_theta[..., 0], g_gamma, g_beta)


def kkt_residual(
    params: Params, grad_theta: torch.Tensor, lam: float, alpha: float, layout: Layout
) -> torch.Tensor:
    """``(P,)`` distance of −∇f to the subdifferential of the penalty (sup norm over blocks).

    Zero exactly at the optimum. Per block: |∇c|; for γ coordinates |∇ + λα sign γ| when
    γ ≠ 0, else (|∇| − λα)₊; for δ_k ‖∇ + w δ/‖δ‖‖ when δ ≠ 0, else (‖∇‖ − w)₊.
    """
    g = gradient_in_params(grad_theta, layout)
    l1, group = penalty_weights(lam, alpha, layout)
    group = group.to(params.delta)
    r_c = g.c.abs().amax(dim=1)
    nz = params.gamma != 0
    r_gamma = torch.where(
        nz, (g.gamma + l1 * params.gamma.sign()).abs(), (g.gamma.abs() - l1).clamp_min(0.0)
    ).amax(dim=(1, 2))
    norms = params.delta.norm(dim=-1)
    unit = params.delta / norms.clamp_min(1e-300)[..., None]
    r_active = (g.delta + group[None, :, None] * unit).norm(dim=-1)
    r_zero = (g.delta.norm(dim=-1) - group[None]).clamp_min(0.0)
    r_delta = torch.where(norms > 0, r_active, r_zero).amax(dim=1)
    return torch.stack([r_c, r_gamma, r_delta], dim=1).amax(dim=1)


def lambda_max(grad_theta: torch.Tensor, alpha: float, layout: Layout) -> torch.Tensor:
    """``(P,)`` smallest λ at which γ = δ = 0 satisfies the KKT conditions.

    ``grad_theta`` is the gradient at γ = δ = 0 with the intercepts fitted:
    ‖∇γ_j‖_∞ ≤ λα and ‖∇δ_k‖₂ ≤ λ(1 − α)/n_j for every j, k. With α = 0 (γ unpenalised)
    or α = 1 (δ unpenalised) only the penalised part counts.
    """
    g = gradient_in_params(grad_theta, layout)
    n_j = layout.creatives_per_segment().to(grad_theta)
    out = torch.zeros(grad_theta.shape[0], dtype=grad_theta.dtype, device=grad_theta.device)
    if alpha > 0:
        out = torch.maximum(out, g.gamma.abs().amax(dim=(1, 2)) / alpha)
    if alpha < 1:
        scaled = g.delta.norm(dim=-1) * n_j[layout.segment_of][None]
        out = torch.maximum(out, scaled.amax(dim=1) / (1.0 - alpha))
    return out


# ----------------------------------------------------------------------------- data passes


@dataclass
class PassStats:
    """Sums over rows (and workers) from one data pass, for P problems.

    loss (P,): summed log loss over each problem's training rows; n (P,) their count;
    grad (P, C, p+1) and hess (P, C, p+1, p+1): summed per creative. ``heldout_loss`` and
    ``heldout_n`` (P,): the same for rows held out of each problem (its CV fold).
    """

    loss: torch.Tensor
    n: torch.Tensor
    grad: torch.Tensor | None = None
    hess: torch.Tensor | None = None
    heldout_loss: torch.Tensor | None = None
    heldout_n: torch.Tensor | None = None
    label_sum: torch.Tensor | None = None  # (P, C): Σ y over training rows per creative
    rows: torch.Tensor | None = None  # (P, C): training rows per creative

    def tensors(self) -> list[torch.Tensor]:
        return [
            t
            for t in (
                self.loss,
                self.n,
                self.grad,
                self.hess,
                self.heldout_loss,
                self.heldout_n,
                self.label_sum,
                self.rows,
            )
            if t is not None
        ]


def problem_masks(
    fold: torch.Tensor, n_folds: int, n_problems: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, P)`` float masks of training rows and of held-out rows for every problem.

    Problems ``0..n_folds-1`` are the CV fits (trained without their fold); a problem
    beyond those trains on every row (the refit). ``fold`` is ``(n,)`` int64.
    """
    q = torch.arange(n_problems, device=fold.device)
    is_cv = q < n_folds
    held = (fold[:, None] == q[None, :]) & is_cv[None, :]
    return (~held).to(torch.float64), held.to(torch.float64)


def _logloss(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise log loss of scores ``s`` for labels ``y`` (broadcast)."""
    return torch.nn.functional.softplus(s) - y * s


def accumulate_stats(
    blocks: Iterable[CreativeBlock],
    params: Params,
    layout: Layout,
    n_folds: int,
    want: str = "hessian",
) -> PassStats:
    """One pass over ``blocks``: loss sums, and gradient (+ Hessian) per creative.

    ``want``: "loss", "gradient" or "hessian". Scores and gradients are float64; the
    Hessian is accumulated in float32, as it only steers the Newton step (the solution's
    accuracy comes from the float64 gradient).
    """
    P, C = params.c.shape
    p = layout.n_features
    dev = params.c.device
    theta = params.creative_coefficients(layout)  # (P, C, p+1)
    z = lambda *s, dt=torch.float64: torch.zeros(*s, dtype=dt, device=dev)  # noqa: E731
    st = PassStats(loss=z(P), n=z(P), heldout_loss=z(P), heldout_n=z(P))
    if want in ("gradient", "hessian"):
        st.grad = z(P, C, p + 1)
        st.label_sum, st.rows = z(P, C), z(P, C)
    if want == "hessian":
        st.hess = z(P, C, p + 1, p + 1, dt=torch.float32)
    for k, x, y, fold in blocks:
        x64 = x.to(dev, torch.float64)
        y = y.to(dev, torch.float64)
        train, held = problem_masks(fold.to(dev), n_folds, P)
        s = x64 @ theta[:, k, 1:].T + theta[:, k, 0][None, :]  # (n, P)
        ll = _logloss(s, y[:, None])
        st.loss += (ll * train).sum(0)
        st.n += train.sum(0)
        st.heldout_loss += (ll * held).sum(0)
        st.heldout_n += held.sum(0)
        if st.grad is None:
            continue
        prob = torch.sigmoid(s)
        r = (prob - y[:, None]) * train  # (n, P)
        st.grad[:, k, 0] += r.sum(0)
        st.grad[:, k, 1:] += (x64.T @ r).T
        st.label_sum[:, k] += (y[:, None] * train).sum(0)
        st.rows[:, k] += train.sum(0)
        if st.hess is None:
            continue
        w = (prob * (1.0 - prob) * train).to(torch.float32)  # (n, P)
        x1 = torch.cat([torch.ones(len(y), 1, device=dev), x.to(dev, torch.float32)], dim=1)
        for q in range(P):
            st.hess[q, k] += x1.T @ (x1 * w[:, q : q + 1])
    return st


def accumulate_line_losses(
    blocks: Iterable[CreativeBlock],
    params: Params,
    direction: Params,
    steps: torch.Tensor,
    layout: Layout,
    n_folds: int,
) -> torch.Tensor:
    """``(P, T)`` summed training log loss at ``params + t·direction`` for each of T steps."""
    theta = params.creative_coefficients(layout)
    dtheta = direction.creative_coefficients(layout)
    P = theta.shape[0]
    out = torch.zeros(P, len(steps), dtype=torch.float64, device=theta.device)
    for k, x, y, fold in blocks:
        x64 = x.to(theta.device, torch.float64)
        y = y.to(theta.device, torch.float64)
        train, _ = problem_masks(fold.to(theta.device), n_folds, P)
        s0 = x64 @ theta[:, k, 1:].T + theta[:, k, 0][None, :]  # (n, P)
        sd = x64 @ dtheta[:, k, 1:].T + dtheta[:, k, 0][None, :]
        s = s0[..., None] + sd[..., None] * steps[None, None, :]  # (n, P, T)
        out += (_logloss(s, y[:, None, None]) * train[..., None]).sum(0)
    return out


class DataPass:
    """How the solver reads the data: a fresh iterator of creative blocks per pass.

    ``reduce`` sums a list of tensors across workers in place (identity on one process).
    """

    def __init__(
        self,
        blocks: Callable[[], Iterator[CreativeBlock]],
        layout: Layout,
        n_folds: int,
        reduce: Callable[[list[torch.Tensor]], None] | None = None,
    ):
        self.blocks = blocks
        self.layout = layout
        self.n_folds = n_folds
        self.reduce = reduce or (lambda tensors: None)
        self.passes = 0

    def stats(self, params: Params, want: str = "hessian") -> PassStats:
        st = accumulate_stats(self.blocks(), params, self.layout, self.n_folds, want)
        self.reduce(st.tensors())
        self.passes += 1
        return st

    def line_losses(self, params: Params, direction: Params, steps: torch.Tensor) -> torch.Tensor:
        out = accumulate_line_losses(
            self.blocks(), params, direction, steps, self.layout, self.n_folds
        )
        self.reduce([out])
        self.passes += 1
        return out


# ----------------------------------------------------------------------------- Newton step


def _quadratic_operator(hess: torch.Tensor, layout: Layout) -> Callable[[Params], Params]:
    """``u ↦ Aᵀ H A u``: the Hessian of the smooth part in (c, γ, δ) coordinates."""

    def apply(u: Params) -> Params:
        theta = u.creative_coefficients(layout)
        return gradient_in_params(torch.einsum("qkij,qkj->qki", hess, theta), layout)

    return apply


def _dot(a: Params, b: Params) -> torch.Tensor:
    return (a.flat() * b.flat()).sum(dim=1)


def _lipschitz(op: Callable[[Params], Params], like: Params, iters: int = 30) -> torch.Tensor:
    """``(P,)`` largest eigenvalue of ``op`` by power iteration (an upper estimate)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = Params(
        torch.randn(like.c.shape, generator=gen, dtype=torch.float64).to(like.c.device),
        torch.randn(like.gamma.shape, generator=gen, dtype=torch.float64).to(like.c.device),
        torch.randn(like.delta.shape, generator=gen, dtype=torch.float64).to(like.c.device),
    )
    est = torch.ones(like.c.shape[0], dtype=torch.float64, device=like.c.device)
    for _ in range(iters):
        norm = v.flat().norm(dim=1).clamp_min(1e-300)
        v = v.axpy(1.0 / norm - 1.0, v)  # v / ‖v‖
        w = op(v)
        est = _dot(v, w)
        v = w
    return est.clamp_min(1e-12) * 1.02


def solve_quadratic_model(
    grad: torch.Tensor,
    hess: torch.Tensor,
    start: Params,
    lam: float,
    alpha: float,
    layout: Layout,
    tol: torch.Tensor,
    max_iter: int = 5000,
) -> tuple[Params, int]:
    """Minimise the penalised Newton model around ``start`` by FISTA with restarts.

    Model: gᵀΔθ + ½ Δθᵀ H Δθ + penalty(start + Δ) with Δθ = A Δ, per creative block.
    ``grad`` (P, C, p+1) and ``hess`` (P, C, p+1, p+1) are the mean-loss gradient and
    Hessian at ``start``; ``tol`` (P,) is the KKT tolerance of each model. Returns the
    minimiser and the iterations used.
    """
    hess64 = hess.to(torch.float64)
    op = _quadratic_operator(hess64, layout)
    step = 1.0 / _lipschitz(op, start)
    g0 = gradient_in_params(grad, layout)

    def model_grad(u: Params) -> Params:
        hu = op(u.minus(start))
        return Params(g0.c + hu.c, g0.gamma + hu.gamma, g0.delta + hu.delta)

    u = start.clone()
    y = start.clone()
    t_mom = 1.0
    it = 0
    for it in range(1, max_iter + 1):
        gy = model_grad(y)
        u_new = prox(y.axpy(-step, gy), step, lam, alpha, layout)
        # Gradient-based adaptive restart (O'Donoghue & Candès): drop momentum when it
        # points uphill.
        uphill = _dot(y.minus(u_new), u_new.minus(u)) > 0
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t_mom * t_mom)) / 2.0
        beta = torch.full_like(step, (t_mom - 1.0) / t_next)
        beta = torch.where(uphill, torch.zeros_like(beta), beta)
        y = u_new.axpy(beta, u_new.minus(u))
        u = u_new
        t_mom = 1.0 if bool(uphill.all()) else t_next
        if it % 10 == 0:
            # The model's own KKT residual: exact in (c, γ, δ), no data needed.
            theta_grad = grad + torch.einsum(
                "qkij,qkj->qki", hess64, u.minus(start).creative_coefficients(layout)
            )
            if bool((kkt_residual(u, theta_grad, lam, alpha, layout) <= tol).all()):
                break
    return u, it


@dataclass
class SolveInfo:
    """Convergence record of one λ for every problem (lists have length P)."""

    lam: float
    alpha: float
    converged: list[bool]
    kkt: list[float]
    objective: list[float]
    newton_iterations: int
    inner_iterations: int
    data_passes: int
    seconds: float
    line_search_failures: int = 0
    history: list[dict] = field(default_factory=list)


LINE_SEARCH_STEPS = torch.tensor([0.5**i for i in range(12)], dtype=torch.float64)
ARMIJO = 1e-4


def intercept_only(data: DataPass, n_problems: int) -> tuple[Params, PassStats]:
    """Params with γ = δ = 0 and every creative's intercept at logit(its response rate)."""
    layout = data.layout
    params = Params.zeros(n_problems, layout)
    st = data.stats(params, want="gradient")
    assert st.label_sum is not None and st.rows is not None
    rate = (st.label_sum / st.rows.clamp_min(1.0)).clamp(1e-12, 1 - 1e-12)
    params.c = torch.log(rate) - torch.log1p(-rate)
    return params, st


def solve(
    data: DataPass,
    params: Params,
    lam: float,
    alpha: float,
    tol: float = 1e-8,
    max_iter: int = 100,
    on_iteration: Callable[[dict], None] | None = None,
) -> tuple[Params, SolveInfo, PassStats]:
    """Proximal Newton from ``params`` (warm start) to KKT residual ≤ ``tol`` for every problem.

    Each iteration: one pass for loss/gradient/Hessian, a data-free solve of the penalised
    quadratic model, and one pass evaluating the loss at 12 step sizes along the Newton
    direction (Armijo rule on the full objective). All problems share the passes. Also
    returns the stats of the last pass, taken at the returned params (held-out losses).
    """
    layout = data.layout
    t0 = time.perf_counter()
    passes0 = data.passes
    P = params.c.shape[0]
    steps = LINE_SEARCH_STEPS.to(params.c.device)
    inner_total = 0
    failures = 0
    history: list[dict] = []
    done = torch.zeros(P, dtype=torch.bool)
    kkt = torch.full((P,), float("inf"), dtype=torch.float64)
    objective = torch.full((P,), float("inf"), dtype=torch.float64)
    it = 0
    for it in range(max_iter + 1):
        st = data.stats(params, want="hessian")
        n = st.n.clamp_min(1.0)
        grad = st.grad / n[:, None, None]
        kkt = kkt_residual(params, grad, lam, alpha, layout)
        objective = st.loss / n + penalty(params, lam, alpha, layout)
        done = kkt <= tol
        record = {
            "iteration": it,
            "lam": lam,
            "kkt_max": float(kkt.max()),
            "objective": objective.tolist(),
            "passes": data.passes - passes0,
        }
        history.append(record)
        if on_iteration is not None:
            on_iteration(record)
        if bool(done.all()) or it == max_iter:
            break
        hess = st.hess / n.to(torch.float32)[:, None, None, None]
        # Solve the model a little tighter than the current residual (inexact Newton).
        inner_tol = torch.clamp(0.1 * kkt, min=0.1 * tol)
        target, inner_it = solve_quadratic_model(grad, hess, params, lam, alpha, layout, inner_tol)
        inner_total += inner_it
        direction = target.minus(params)
        # Armijo: F(θ + t d) ≤ F(θ) + σ t (gᵀd + P(θ + d) − P(θ)).
        decrease = (
            (grad * direction.creative_coefficients(layout)).sum(dim=(1, 2))
            + penalty(target, lam, alpha, layout)
            - penalty(params, lam, alpha, layout)
        )
        losses = data.line_losses(params, direction, steps) / n[:, None]
        pens = torch.stack(
            [
                penalty(params.axpy(torch.full((P,), float(t)), direction), lam, alpha, layout)
                for t in steps
            ],
            dim=1,
        )
        values = losses + pens  # (P, T)
        ok = values <= objective[:, None] + ARMIJO * steps[None, :] * decrease[:, None]
        first_ok = torch.where(ok.any(dim=1), ok.float().argmax(dim=1), torch.full((P,), -1))
        t = torch.where(
            first_ok >= 0, steps[first_ok.clamp_min(0)], torch.zeros(P, dtype=torch.float64)
        )
        if bool(((first_ok < 0) & ~done).any()):
            # No sufficient decrease (round-off near the optimum): keep the best candidate
            # if it improves at all.
            failures += 1
            best = values.argmin(dim=1)
            improves = values.gather(1, best[:, None])[:, 0] < objective
            t = torch.where((first_ok < 0) & improves, steps[best], t)
        t = torch.where(done, torch.zeros_like(t), t)
        # A full step lands exactly on the model's minimiser, zeros included.
        full = t == 1.0
        params = target.select(full, params.axpy(t, direction))
        if bool((t == 0).all()):
            break
    info = SolveInfo(
        lam=lam,
        alpha=alpha,
        converged=done.tolist(),
        kkt=kkt.tolist(),
        objective=objective.tolist(),
        newton_iterations=it,
        inner_iterations=inner_total,
        data_passes=data.passes - passes0,
        seconds=time.perf_counter() - t0,
        line_search_failures=failures,
        history=history,
    )
    return params, info, st


def lambda_path(lam_start: float, lam_end: float, steps: int) -> list[float]:
    """Geometric path from ``lam_start`` down to ``lam_end`` (just ``[lam_end]`` if it is above)."""
    if lam_end >= lam_start or steps <= 1:
        return [lam_end]
    ratio = (lam_end / lam_start) ** (1.0 / (steps - 1))
    return [lam_start * ratio**i for i in range(steps - 1)] + [lam_end]


def fit_path(
    data: DataPass,
    n_problems: int,
    lam: float,
    alpha: float,
    tol: float = 1e-8,
    max_iter: int = 100,
    path_steps: int = 8,
    on_step: Callable[[Params, SolveInfo, PassStats], None] | None = None,
    on_iteration: Callable[[dict], None] | None = None,
    on_path: Callable[[list[float], float], None] | None = None,
) -> tuple[Params, list[SolveInfo], float]:
    """Warm-started path from λ_max down to ``lam``; return the final params, per-λ info, λ_max.

    ``on_step(params, info, stats)`` runs after each λ with the stats of its last pass
    (held-out losses included); ``on_path(lams, lam_max)`` once before the first solve.
    """
    params, _ = intercept_only(data, n_problems)
    st = data.stats(params, want="gradient")  # the KKT check of zero needs ∇ at the intercepts
    n = st.n.clamp_min(1.0)
    lam_max = float(lambda_max(st.grad / n[:, None, None], alpha, data.layout).max())
    infos = []
    lams = lambda_path(lam_max, lam, path_steps)
    if on_path is not None:
        on_path(lams, lam_max)
    for lam_k in lams:
        params, info, last = solve(data, params, lam_k, alpha, tol, max_iter, on_iteration)
        infos.append(info)
        if on_step is not None:
            on_step(params, info, last)
    return params, infos, lam_max
