"""Global treatment effect under algorithmic interference: DB estimator and benchmarks.

Numbers only: pure functions of float64 tensors, no ray, no I/O. The maths is in
``shared/notes/interference_estimator.md``. Per query i (``K`` positions, padded ones
masked out, real items first):

* nuisance vector η = (b_2 − b_1, …, b_K − b_1, τ_1..τ_K, r_1..r_K), ``d = 3K − 1``
  (b is identified only up to a constant per query, so b_1 := 0);
  μ_k = r_k (continuous outcome) or sigmoid(r_k) (binary outcome, r is a logit);
* loss ℓ(η; w, e, y) = −log p_e(w) + ½(y − μ_e)² (or the binary cross-entropy in r);
* target θ(η) = Σ_k softmax(b + τ)_k μ_k − Σ_k softmax(b)_k μ_k, and the policy value
  V_q(η) = E_{w ~ Bern(q)^K} Σ_k p_k(w) μ_k;
* expected Hessian Λ = E_w E_{e|w} ∇²ℓ over the experiment's randomisation, exact by
  enumerating the 2^K assignments or Monte Carlo over sampled ones;
* DB influence value ψ = θ(η) − ∇θ(η)ᵀ Λ⁻¹ ∇ℓ(η; w, e, y).

Gradients, Jacobians and the choice block of Λ come from ``torch.func`` (``grad``,
``jacrev``, ``hessian``, ``vmap``); the response block of Λ is diagonal,
diag(π̄_k h(r_k)) with π̄_k = E_w p_k(w) and h = 1 or μ(1 − μ).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch.func import grad, hessian, jacrev, vmap

from distributed_hte.models.interference import NEG

HessianMethod = Literal["auto", "exact", "monte_carlo"]
OutcomeType = Literal["continuous", "binary"]
DTYPE = torch.float64
# Largest set size whose 2^K assignments are enumerated when ``hessian: auto``.
EXACT_MAX_K = 10
# Elements of the largest intermediate tensor per chunk of queries (bounds memory).
CHUNK_ELEMENTS = 4_000_000


# ----------------------------------------------------------------------------- layout


def pack(b: torch.Tensor, tau: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """η ``(..., 3K − 1)`` from ``b``, ``tau``, ``r`` ``(..., K)`` (normalised so b_1 = 0)."""
    return torch.cat([b[..., 1:] - b[..., :1], tau, r], dim=-1)


def unpack(eta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``b`` (with b_1 = 0), ``tau``, ``r``, each ``(..., K)``, from η ``(..., 3K − 1)``."""
    db = eta[..., : k - 1]
    b = torch.cat([torch.zeros_like(eta[..., :1]), db], dim=-1)
    return b, eta[..., k - 1 : 2 * k - 1], eta[..., 2 * k - 1 :]


def _probs(b: torch.Tensor, tau: torch.Tensor, w: torch.Tensor, mask: torch.Tensor):
    u = b + w * tau
    return torch.softmax(torch.where(mask, u, torch.full_like(u, NEG)), dim=-1)


def _mu(r: torch.Tensor, outcome: OutcomeType) -> torch.Tensor:
    return torch.sigmoid(r) if outcome == "binary" else r


# ----------------------------------------------------------------------------- designs


@dataclass(frozen=True)
class Design:
    """Assignments ``W`` ``(S, K)`` and their weights ``(S,)`` (summing to one)."""

    W: torch.Tensor
    weights: torch.Tensor
    exact: bool


def exact_design(k: int, q: float) -> Design:
    """All 2^K assignments with Bernoulli(q) probabilities (q = 0 or 1: the one point)."""
    if q in (0.0, 1.0):
        return Design(torch.full((1, k), float(q), dtype=DTYPE), torch.ones(1, dtype=DTYPE), True)
    W = torch.tensor(list(itertools.product([0.0, 1.0], repeat=k)), dtype=DTYPE)
    n1 = W.sum(dim=1)
    weights = q**n1 * (1.0 - q) ** (k - n1)
    return Design(W, weights, True)


def sampled_design(k: int, q: float, draws: int, generator: torch.Generator) -> Design:
    """``draws`` assignments from Bernoulli(q)^K, equally weighted."""
    W = (torch.rand(draws, k, generator=generator, dtype=DTYPE) < q).to(DTYPE)
    return Design(W, torch.full((draws,), 1.0 / draws, dtype=DTYPE), False)


def policy_design(
    k: int,
    q: float,
    method: HessianMethod,
    draws: int,
    seed: int = 0,
    exact_max_k: int = EXACT_MAX_K,
) -> Design:
    """The design that averages over Bernoulli(q)^K: exact when small (or q ∈ {0, 1})."""
    if q in (0.0, 1.0) or method == "exact" or (method == "auto" and k <= exact_max_k):
        return exact_design(k, q)
    return sampled_design(k, q, draws, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- per query


def query_loss(
    eta: torch.Tensor,
    w: torch.Tensor,
    e_onehot: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    outcome: OutcomeType = "continuous",
) -> torch.Tensor:
    """ℓ(η; w, e, y) of one query (``eta`` ``(3K − 1,)``, the rest ``(K,)``, ``y`` scalar)."""
    k = w.shape[-1]
    b, tau, r = unpack(eta, k)
    u = torch.where(mask, b + w * tau, torch.full_like(b, NEG))
    logp = torch.log_softmax(u, dim=-1)
    hit = e_onehot > 0
    choice = -torch.where(hit, logp, torch.zeros_like(logp)).sum()
    r_e = torch.where(hit, r, torch.zeros_like(r)).sum()
    if outcome == "binary":
        response = torch.nn.functional.softplus(r_e) - y * r_e
    else:
        response = 0.5 * (y - r_e) ** 2
    return choice + response


def policy_value(
    eta: torch.Tensor,
    mask: torch.Tensor,
    W: torch.Tensor,
    weights: torch.Tensor,
    outcome: OutcomeType = "continuous",
    group: torch.Tensor | None = None,
) -> torch.Tensor:
    """V(η) = Σ_s weights_s Σ_k p_k(W_s) μ_k (only items with ``group`` = 1 when given)."""
    k = mask.shape[-1]
    b, tau, r = unpack(eta, k)
    p = _probs(b, tau, W, mask)  # (S, K)
    pbar = weights @ p  # (K,)
    mu = _mu(r, outcome)
    if group is not None:
        mu = mu * group
    return (pbar * mu).sum()


def gte(
    eta: torch.Tensor,
    mask: torch.Tensor,
    outcome: OutcomeType = "continuous",
    group: torch.Tensor | None = None,
) -> torch.Tensor:
    """θ(η) = Σ_k (softmax(b + τ)_k − softmax(b)_k) μ_k (over ``group`` items when given)."""
    k = mask.shape[-1]
    b, tau, r = unpack(eta, k)
    ones = torch.ones_like(b)
    c = _probs(b, tau, ones, mask) - _probs(b, tau, 0 * ones, mask)
    mu = _mu(r, outcome)
    if group is not None:
        mu = mu * group
    return (c * mu).sum()


def _choice_curvature(theta_c: torch.Tensor, mask: torch.Tensor, W: torch.Tensor, weights):
    """Σ_s weights_s logsumexp(u_s): its Hessian is the expected choice Hessian.

    −log p_e(w) = logsumexp(u) − u_e and u is linear in (b, τ), so the e term has no
    curvature and the Hessian does not depend on the exposed item.
    """
    k = mask.shape[-1]
    b = torch.cat([torch.zeros_like(theta_c[:1]), theta_c[: k - 1]])
    tau = theta_c[k - 1 :]
    u = torch.where(mask, b + W * tau, torch.full_like(W, NEG))
    return weights @ torch.logsumexp(u, dim=-1)


def expected_hessian(
    eta: torch.Tensor,
    mask: torch.Tensor,
    W: torch.Tensor,
    weights: torch.Tensor,
    outcome: OutcomeType = "continuous",
) -> torch.Tensor:
    """Λ ``(3K − 1, 3K − 1)`` of one query, averaged over the design (W, weights).

    Padded positions get 1 on the diagonal (their rows are otherwise zero; the target
    and the loss do not depend on them, so this changes no influence value).
    """
    k = mask.shape[-1]
    d_c = 2 * k - 1
    h_c = hessian(_choice_curvature)(eta[:d_c], mask, W, weights)
    b, tau, r = unpack(eta, k)
    pbar = weights @ _probs(b, tau, W, mask)
    if outcome == "binary":
        mu = torch.sigmoid(r)
        h_r = pbar * mu * (1 - mu)
    else:
        h_r = pbar
    top = torch.cat([h_c, torch.zeros(d_c, k, dtype=eta.dtype)], dim=1)
    bottom = torch.cat([torch.zeros(k, d_c, dtype=eta.dtype), torch.diag_embed(h_r)], dim=1)
    pad = torch.cat([~mask[1:], ~mask, ~mask]).to(eta.dtype)
    return torch.cat([top, bottom], dim=0) + torch.diag_embed(pad)


def expected_hessians(
    eta: torch.Tensor,
    mask: torch.Tensor,
    W: torch.Tensor,
    weights: torch.Tensor,
    outcome: OutcomeType = "continuous",
) -> torch.Tensor:
    """Λ ``(N, 3K − 1, 3K − 1)`` for N queries in closed form (what the estimator uses).

    ``eta`` ``(N, 3K − 1)``, ``mask`` ``(N, K)``; ``W`` ``(S, K)`` with ``weights``
    ``(S,)`` shared by every query, or ``(N, S, K)`` / ``(N, S)`` per query. With
    M(w) = diag(p) − ppᵀ the choice Hessian is Aᵀ M A, A = ∂u/∂(b_2..b_K, τ), whose
    blocks are M[1:, 1:], M_kl w_l and w_k M_kl w_l; their expectations need only the
    weighted first and second moments of p(w) and w ⊙ p(w), never an (S, K, K) tensor
    per query. Equal to :func:`expected_hessian` (the autograd definition) to rounding;
    the tests check it.
    """
    n, k = mask.shape
    b, tau, r = unpack(eta, k)
    if W.dim() == 2:
        W = W.unsqueeze(0).expand(n, -1, -1)
        weights = weights.unsqueeze(0).expand(n, -1)
    p = _probs(b.unsqueeze(1), tau.unsqueeze(1), W, mask.unsqueeze(1))  # (N, S, K)
    wp = W * p
    pbar = torch.einsum("ns,nsk->nk", weights, p)
    wpbar = torch.einsum("ns,nsk->nk", weights, wp)
    a = torch.diag_embed(pbar) - torch.einsum("ns,nsk,nsl->nkl", weights, p, p)
    bt = torch.diag_embed(wpbar) - torch.einsum("ns,nsk,nsl->nkl", weights, p, wp)
    c = torch.diag_embed(wpbar) - torch.einsum("ns,nsk,nsl->nkl", weights, wp, wp)
    if outcome == "binary":
        mu = torch.sigmoid(r)
        h_r = pbar * mu * (1 - mu)
    else:
        h_r = pbar
    d = 3 * k - 1
    lam = torch.zeros(n, d, d, dtype=eta.dtype)
    lam[:, : k - 1, : k - 1] = a[:, 1:, 1:]
    lam[:, : k - 1, k - 1 : 2 * k - 1] = bt[:, 1:, :]
    lam[:, k - 1 : 2 * k - 1, : k - 1] = bt[:, 1:, :].transpose(1, 2)
    lam[:, k - 1 : 2 * k - 1, k - 1 : 2 * k - 1] = c
    lam[:, 2 * k - 1 :, 2 * k - 1 :] = torch.diag_embed(h_r)
    pad = torch.cat([~mask[:, 1:], ~mask, ~mask], dim=1).to(eta.dtype)
    return lam + torch.diag_embed(pad)


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True, slots=True)
class QueryBatch:
    """N queries as float64 tensors.

    ``b``, ``tau``, ``r``, ``w`` ``(N, K)``; ``mask`` ``(N, K)`` bool with real items
    first; ``e`` ``(N,)`` int64 exposed position; ``y`` ``(N,)``; ``group`` ``(N, K)``
    int64 subgroup index of each item (−1 when padded), or None.
    """

    b: torch.Tensor
    tau: torch.Tensor
    r: torch.Tensor
    w: torch.Tensor
    mask: torch.Tensor
    e: torch.Tensor
    y: torch.Tensor
    group: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.b.shape[0]

    @property
    def k(self) -> int:
        return self.b.shape[1]

    def eta(self) -> torch.Tensor:
        return pack(self.b, self.tau, self.r)

    def e_onehot(self) -> torch.Tensor:
        return torch.nn.functional.one_hot(self.e, self.k).to(DTYPE)

    def slice(self, lo: int, hi: int) -> QueryBatch:
        return QueryBatch(
            *(getattr(self, f)[lo:hi] for f in ("b", "tau", "r", "w", "mask", "e", "y")),
            group=None if self.group is None else self.group[lo:hi],
        )


@dataclass(frozen=True)
class DBSettings:
    """How the DB influence values are computed.

    ``hessian``: exact enumeration, Monte Carlo (``hessian_draws`` assignments per
    query), or ``auto`` (exact when K ≤ ``exact_max_k``). ``policy_q``: treated
    fractions whose policy values V_q are estimated. ``n_groups``: item subgroups.
    """

    p: float
    outcome: OutcomeType = "continuous"
    hessian: HessianMethod = "auto"
    hessian_draws: int = 500
    exact_max_k: int = EXACT_MAX_K
    policy_q: tuple[float, ...] = ()
    n_groups: int = 0
    seed: int = 0

    def use_exact(self, k: int) -> bool:
        return self.hessian == "exact" or (self.hessian == "auto" and k <= self.exact_max_k)


@dataclass(frozen=True, slots=True)
class InfluenceValues:
    """Per-query DB output.

    ``theta`` ``(N, T)`` plug-in targets and ``psi`` ``(N, T)`` influence values for the
    targets named in ``names`` (``gte``, ``V_q=<q>``…, ``group=<g>``…);
    ``ridge`` ``(N,)`` the ridge added to Λ (0 when Λ was positive definite).
    """

    names: tuple[str, ...]
    theta: torch.Tensor
    psi: torch.Tensor
    ridge: torch.Tensor


def target_names(settings: DBSettings) -> tuple[str, ...]:
    """Names of the DB targets, in column order."""
    return (
        "gte",
        *(f"V_q={q:g}" for q in settings.policy_q),
        *(f"group={g}" for g in range(settings.n_groups)),
    )


def _targets_fn(settings: DBSettings, k: int):
    designs = [
        policy_design(k, q, settings.hessian, settings.hessian_draws, settings.seed + 7919 * i)
        for i, q in enumerate(settings.policy_q)
    ]
    outcome = settings.outcome

    def targets(eta, mask, group_onehot):
        out = [gte(eta, mask, outcome)]
        out += [policy_value(eta, mask, d.W, d.weights, outcome) for d in designs]
        out += [gte(eta, mask, outcome, group_onehot[:, g]) for g in range(settings.n_groups)]
        return torch.stack(out)

    return targets


def _solve_spd(lam: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve Λ v = rhs per query by Cholesky, adding a growing ridge where Λ is not PD."""
    ridge = torch.zeros(lam.shape[0], dtype=lam.dtype)
    scale = lam.diagonal(dim1=-2, dim2=-1).abs().mean(dim=-1).clamp_min(1e-12)
    eye = torch.eye(lam.shape[-1], dtype=lam.dtype)
    chol, info = torch.linalg.cholesky_ex(lam)
    factor = 1e-10
    while bool((info > 0).any()):
        bad = info > 0
        ridge = torch.where(bad, scale * factor, ridge)
        chol_bad, info_bad = torch.linalg.cholesky_ex(lam[bad] + ridge[bad, None, None] * eye)
        chol[bad] = chol_bad
        info = torch.zeros_like(info)
        info[bad] = info_bad
        factor *= 100.0
        if factor > 1e6:
            raise FloatingPointError("expected Hessian is not positive definite even with a ridge")
    return torch.cholesky_solve(rhs.unsqueeze(-1), chol)[..., 0], ridge


def db_influence(
    batch: QueryBatch, settings: DBSettings, generator: torch.Generator | None = None
) -> InfluenceValues:
    """DB influence values of every target for a batch of queries (chunked for memory)."""
    k = batch.k
    exact = settings.use_exact(k)
    if exact:
        design = exact_design(k, settings.p)
        per_query = design.W.shape[0] * k
    else:
        per_query = settings.hessian_draws * k
    chunk = max(1, CHUNK_ELEMENTS // per_query)
    gen = generator or torch.Generator().manual_seed(settings.seed)
    targets = _targets_fn(settings, k)
    loss_grad = vmap(grad(query_loss), in_dims=(0, 0, 0, 0, 0, None))
    target_jac = vmap(jacrev(targets), in_dims=(0, 0, 0))
    target_val = vmap(targets, in_dims=(0, 0, 0))
    thetas, psis, ridges = [], [], []
    for lo in range(0, batch.n, chunk):
        part = batch.slice(lo, min(lo + chunk, batch.n))
        eta = part.eta()
        mask = part.mask
        if part.group is not None and settings.n_groups:
            g1 = torch.nn.functional.one_hot(part.group.clamp_min(0), settings.n_groups).to(DTYPE)
            g1 = g1 * mask.unsqueeze(-1)
        else:
            g1 = torch.zeros(part.n, k, max(settings.n_groups, 1), dtype=DTYPE)
        if exact:
            lam = expected_hessians(eta, mask, design.W, design.weights, settings.outcome)
        else:
            W = (
                torch.rand(part.n, settings.hessian_draws, k, generator=gen, dtype=DTYPE)
                < settings.p
            ).to(DTYPE)
            wts = torch.full((part.n, settings.hessian_draws), 1.0 / settings.hessian_draws)
            lam = expected_hessians(eta, mask, W, wts.to(DTYPE), settings.outcome)
        g_loss = loss_grad(eta, part.w, part.e_onehot(), part.y, mask, settings.outcome)
        v, ridge = _solve_spd(lam, g_loss)
        theta = target_val(eta, mask, g1)
        jac = target_jac(eta, mask, g1)  # (n, T, d)
        psis.append(theta - torch.einsum("ntd,nd->nt", jac, v))
        thetas.append(theta)
        ridges.append(ridge)
    return InfluenceValues(
        names=target_names(settings),
        theta=torch.cat(thetas),
        psi=torch.cat(psis),
        ridge=torch.cat(ridges),
    )


# ----------------------------------------------------------------------------- benchmarks


def exposed_treated(w: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``(N,)`` treatment of the exposed item."""
    return w.gather(1, e.unsqueeze(1))[:, 0]


def benchmark_terms(
    w: torch.Tensor,
    e: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    p: float,
    f_obs: torch.Tensor | None = None,
    f1: torch.Tensor | None = None,
    f0: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-query terms ``(N,)`` whose means are HT-DIM, IPW and (given a PDL net) PDL, AIPW.

    ``f_obs``, ``f1``, ``f0``: PDL predictions at the observed assignment, all treated
    and all control (cross-fitted). IPW/AIPW weights use each query's own set size.
    """
    we = exposed_treated(w, e)
    out = {"HT_DIM": we * y / p - (1 - we) * y / (1 - p)}
    m = mask.to(w.dtype)
    size = m.sum(dim=1)
    all_t = ((w * m).sum(dim=1) == size).to(w.dtype)
    all_c = ((w * m).sum(dim=1) == 0).to(w.dtype)
    ratio = all_t / p**size - all_c / (1 - p) ** size
    out["IPW"] = y * ratio
    if f_obs is not None and f1 is not None and f0 is not None:
        out["PDL"] = f1 - f0
        out["AIPW"] = f1 - f0 + ratio * (y - f_obs)
    return out


def hajek_sums(w: torch.Tensor, e: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Additive sums for the Hájek DIM and its plug-in variance."""
    return hajek_sums_exposed(exposed_treated(w, e), y)


def hajek_sums_exposed(we, y) -> dict[str, float]:
    """:func:`hajek_sums` from ``we`` ``(n,)`` (1 where the exposed item is treated), ``y`` ``(n,)``.

    Works on torch tensors and numpy arrays alike.
    """
    return {
        "n_t": float(we.sum()),
        "n_c": float((1 - we).sum()),
        "sy_t": float((we * y).sum()),
        "sy_c": float(((1 - we) * y).sum()),
        "syy_t": float((we * y * y).sum()),
        "syy_c": float(((1 - we) * y * y).sum()),
    }


# ----------------------------------------------------------------------------- summaries


@dataclass(frozen=True, slots=True)
class Estimate:
    """A point estimate with its standard error and a normal confidence interval."""

    estimate: float
    se: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def z_value(level: float = 0.95) -> float:
    """Two-sided normal quantile for a confidence ``level``."""
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def estimate_from(est: float, se: float, level: float = 0.95) -> Estimate:
    z = z_value(level)
    return Estimate(float(est), float(se), float(est - z * se), float(est + z * se))


def mean_sums(x: torch.Tensor) -> dict[str, float]:
    """Additive sums ``n``, ``s``, ``ss`` of a per-query term ``(N,)``."""
    x = x.to(DTYPE)
    return {"n": float(x.numel()), "s": float(x.sum()), "ss": float((x * x).sum())}


def add_sums(into: dict[str, float], part: dict[str, float]) -> None:
    for key, value in part.items():
        into[key] = into.get(key, 0.0) + value


def mean_estimate(sums: dict[str, float], level: float = 0.95) -> Estimate:
    """Mean of a per-query term with SE = sqrt(mean (x − x̄)² / N) (the note's formula)."""
    n = max(sums["n"], 1.0)
    mean = sums["s"] / n
    var = max(sums["ss"] / n - mean * mean, 0.0)
    return estimate_from(mean, math.sqrt(var / n), level)


def hajek_estimate(s: dict[str, float], level: float = 0.95) -> Estimate:
    """Hájek DIM with the plug-in variance s²_T/n_T + s²_C/n_C (Wager 2024, Thm 1.2)."""
    if s["n_t"] < 1 or s["n_c"] < 1:
        return estimate_from(float("nan"), float("nan"), level)
    m_t, m_c = s["sy_t"] / s["n_t"], s["sy_c"] / s["n_c"]
    v_t = max(s["syy_t"] / s["n_t"] - m_t**2, 0.0)
    v_c = max(s["syy_c"] / s["n_c"] - m_c**2, 0.0)
    return estimate_from(m_t - m_c, math.sqrt(v_t / s["n_t"] + v_c / s["n_c"]), level)


def all_estimates(
    terms: dict[str, torch.Tensor],
    influence: InfluenceValues,
    hajek: dict[str, float],
    level: float = 0.95,
) -> dict[str, Estimate]:
    """Every estimator of the GTE from in-memory per-query values (the coverage study's path)."""
    gte_col = influence.names.index("gte")
    out = {
        "DB": mean_estimate(mean_sums(influence.psi[:, gte_col]), level),
        "plug_in": mean_estimate(mean_sums(influence.theta[:, gte_col]), level),
        "HA_DIM": hajek_estimate(hajek, level),
    }
    for name, values in terms.items():
        out[name] = mean_estimate(mean_sums(values), level)
    return out


def all_assignments(k: int) -> torch.Tensor:
    """The 2^K assignments ``(2^K, K)`` (helper for tests and the simulator)."""
    return exact_design(k, 0.5).W


def db_targets_by_name(influence: InfluenceValues, names: Sequence[str]) -> list[int]:
    return [influence.names.index(n) for n in names]
