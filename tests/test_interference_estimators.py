"""Interference estimator maths: derivatives against finite differences, the expected
Hessian (autograd, closed form, exact and Monte Carlo), policy values, DB with the true
nuisances, and AIPW against DoubleML. No Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import grad, hessian, vmap

from distributed_hte.estimators import interference as est
from distributed_hte.simulate import interference as sim

# Tolerances, named once.
FD_STEP = 1e-6
FD_RTOL = 1e-6  # central differences in float64
CLOSED_FORM_ATOL = 1e-12  # closed-form Λ against the autograd definition
MC_RTOL = 0.05  # Monte Carlo Λ (20k draws) against exact enumeration, in Frobenius norm
TRUE_NUISANCE_Z = 3.5  # |estimate − truth| / SE with the true nuisances plugged in


def _query(k: int, pad: int = 0, seed: int = 0, outcome: str = "continuous"):
    """One random query: η, w, one-hot e, y and mask (``pad`` padded positions at the end)."""
    g = torch.Generator().manual_seed(seed)
    kk = k + pad
    b = torch.randn(kk, generator=g, dtype=torch.float64)
    tau = 0.7 * torch.randn(kk, generator=g, dtype=torch.float64)
    r = torch.randn(kk, generator=g, dtype=torch.float64)
    mask = torch.arange(kk) < k
    w = (torch.rand(kk, generator=g) < 0.5).to(torch.float64)
    e = int(torch.randint(0, k, (1,), generator=g))
    e1 = torch.nn.functional.one_hot(torch.tensor(e), kk).to(torch.float64)
    y = torch.tensor(1.0 if outcome == "binary" else 0.3, dtype=torch.float64)
    return est.pack(b, tau, r), w, e1, y, mask


def _fd_grad(f, x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        d = torch.zeros_like(x)
        d[i] = FD_STEP
        out[i] = (f(x + d) - f(x - d)) / (2 * FD_STEP)
    return out


@pytest.mark.parametrize("outcome", ["continuous", "binary"])
@pytest.mark.parametrize("pad", [0, 2])
def test_loss_gradient_and_hessian_match_finite_differences(outcome, pad):
    eta, w, e1, y, mask = _query(4, pad, seed=pad, outcome=outcome)

    def loss(x):
        return est.query_loss(x, w, e1, y, mask, outcome)

    g = grad(loss)(eta)
    torch.testing.assert_close(g, _fd_grad(loss, eta), rtol=FD_RTOL, atol=FD_RTOL)
    h = hessian(loss)(eta)
    fd_h = torch.stack([_fd_grad(lambda x, i=i: grad(loss)(x)[i], eta) for i in range(len(eta))])
    torch.testing.assert_close(h, fd_h, rtol=FD_RTOL, atol=FD_RTOL)
    # The note's closed forms: ∂ℓ/∂τ_k = w_k (p_k − 1{e=k}); ∂ℓ/∂r_e = −(y − μ_e).
    k = len(w)
    b, tau, r = est.unpack(eta, k)
    p = torch.softmax(torch.where(mask, b + w * tau, torch.tensor(-1e30, dtype=b.dtype)), dim=0)
    torch.testing.assert_close(g[k - 1 : 2 * k - 1], w * (p - e1))
    mu = torch.sigmoid(r) if outcome == "binary" else r
    torch.testing.assert_close(g[2 * k - 1 :], -(y - mu) * e1)


@pytest.mark.parametrize("outcome", ["continuous", "binary"])
def test_expected_hessian_is_the_randomisation_average_of_loss_hessians(outcome):
    """Λ = Σ_w π(w) Σ_e p_e(w) ∇²ℓ(η; w, e, y), by brute force over w and e."""
    k, p = 4, 0.3
    eta, _, _, y, mask = _query(k, pad=1, seed=3, outcome=outcome)
    design = est.exact_design(k + 1, p)
    brute = torch.zeros(3 * (k + 1) - 1, 3 * (k + 1) - 1, dtype=torch.float64)
    b, tau, r = est.unpack(eta, k + 1)
    for w, pi in zip(design.W, design.weights, strict=True):
        probs = torch.softmax(torch.where(mask, b + w * tau, torch.tensor(-1e30)), dim=0)
        for e in range(k):
            e1 = torch.nn.functional.one_hot(torch.tensor(e), k + 1).to(torch.float64)
            brute += pi * probs[e] * hessian(est.query_loss)(eta, w, e1, y, mask, outcome)
    pad = torch.cat([~mask[1:], ~mask, ~mask]).to(torch.float64)
    brute += torch.diag(pad)  # padded coordinates: identity (documented)
    auto = est.expected_hessian(eta, mask, design.W, design.weights, outcome)
    torch.testing.assert_close(auto, brute, rtol=1e-10, atol=1e-12)
    closed = est.expected_hessians(eta[None], mask[None], design.W, design.weights, outcome)[0]
    torch.testing.assert_close(closed, brute, rtol=0, atol=CLOSED_FORM_ATOL)
    assert torch.linalg.eigvalsh(closed).min() > 0, "Λ is positive definite for 0 < p < 1"


def test_exact_and_monte_carlo_expected_hessians_agree():
    k, p = 6, 0.5
    g = torch.Generator().manual_seed(1)
    etas = torch.stack([_query(k, seed=s)[0] for s in range(5)])
    mask = torch.ones(5, k, dtype=torch.bool)
    exact = est.exact_design(k, p)
    lam_exact = est.expected_hessians(etas, mask, exact.W, exact.weights)
    mc = est.sampled_design(k, p, 20_000, g)
    lam_mc = est.expected_hessians(etas, mask, mc.W, mc.weights)
    rel = torch.linalg.matrix_norm(lam_mc - lam_exact) / torch.linalg.matrix_norm(lam_exact)
    assert rel.max() < MC_RTOL, rel
    # With few draws the MC Hessian is visibly noisy: the comparison has power.
    few = est.sampled_design(k, p, 5, g)
    rel_few = torch.linalg.matrix_norm(
        est.expected_hessians(etas, mask, few.W, few.weights) - lam_exact
    ) / torch.linalg.matrix_norm(lam_exact)
    assert rel_few.max() > MC_RTOL


def test_db_influence_exact_and_monte_carlo_hessians_agree():
    """The same queries through db_influence with hessian=exact and hessian=monte_carlo."""
    batch = _batch(400, k=5, seed=4)
    exact = est.db_influence(batch, est.DBSettings(p=0.5, hessian="exact"))
    mc = est.db_influence(
        batch, est.DBSettings(p=0.5, hessian="monte_carlo", hessian_draws=4000, seed=1)
    )
    diff = (exact.psi[:, 0] - mc.psi[:, 0]).abs()
    scale = (exact.psi[:, 0] - exact.theta[:, 0]).abs().mean()
    assert diff.mean() < 0.05 * scale, (diff.mean(), scale)


def _batch(n: int, k: int, seed: int, pad: int = 0, groups: int = 0) -> est.QueryBatch:
    g = torch.Generator().manual_seed(seed)
    kk = k + pad
    mask = torch.ones(n, kk, dtype=torch.bool)
    if pad:
        mask[: n // 2, k:] = False
    e = torch.randint(0, k, (n,), generator=g)
    group = torch.randint(0, max(groups, 1), (n, kk), generator=g) if groups else None
    return est.QueryBatch(
        torch.randn(n, kk, generator=g, dtype=torch.float64),
        0.5 * torch.randn(n, kk, generator=g, dtype=torch.float64),
        torch.randn(n, kk, generator=g, dtype=torch.float64),
        (torch.rand(n, kk, generator=g) < 0.5).to(torch.float64),
        mask,
        e,
        torch.randn(n, generator=g, dtype=torch.float64),
        group,
    )


def test_policy_values_at_q_zero_and_one_are_global_control_and_treatment():
    batch = _batch(300, k=4, seed=2, pad=2, groups=2)
    settings = est.DBSettings(p=0.5, policy_q=(0.0, 0.5, 1.0), n_groups=2)
    inf = est.db_influence(batch, settings)
    names = list(inf.names)
    m = batch.mask
    neg = torch.tensor(-1e30, dtype=torch.float64)
    v0 = (torch.softmax(torch.where(m, batch.b, neg), 1) * batch.r).sum(1)
    v1 = (torch.softmax(torch.where(m, batch.b + batch.tau, neg), 1) * batch.r).sum(1)
    torch.testing.assert_close(inf.theta[:, names.index("V_q=0")], v0)
    torch.testing.assert_close(inf.theta[:, names.index("V_q=1")], v1)
    torch.testing.assert_close(inf.theta[:, names.index("gte")], v1 - v0)
    # Influence values are linear in the target: ψ(V_1) − ψ(V_0) = ψ(GTE), subgroups add up.
    psi = inf.psi
    torch.testing.assert_close(
        psi[:, names.index("V_q=1")] - psi[:, names.index("V_q=0")], psi[:, names.index("gte")]
    )
    torch.testing.assert_close(
        psi[:, names.index("group=0")] + psi[:, names.index("group=1")], psi[:, names.index("gte")]
    )
    # V_q at q = 0.5 is the plain average over the 2^K assignments (brute force).
    vh = inf.theta[:, names.index("V_q=0.5")]
    for i in range(5):
        k = int(m[i].sum())
        vals = []
        for w in est.exact_design(k, 0.5).W:
            u = batch.b[i, :k] + w * batch.tau[i, :k]
            vals.append(float((torch.softmax(u, 0) * batch.r[i, :k]).sum()))
        assert float(vh[i]) == pytest.approx(np.mean(vals), rel=1e-10)


def test_response_part_of_the_correction_is_a_reweighted_residual():
    """The note's sign check: the μ part of the correction is c_e (y − μ_e) / π̄_e."""
    k, p = 3, 0.5
    batch = _batch(50, k=k, seed=7)
    settings = est.DBSettings(p=p)
    design = est.exact_design(k, p)
    eta = batch.eta()
    lam = est.expected_hessians(eta, batch.mask, design.W, design.weights)
    g_loss = vmap(grad(est.query_loss), in_dims=(0, 0, 0, 0, 0, None))(
        eta, batch.w, batch.e_onehot(), batch.y, batch.mask, "continuous"
    )
    g_theta = vmap(grad(est.gte))(eta, batch.mask)
    v = torch.linalg.solve(lam, g_loss.unsqueeze(-1))[..., 0]
    mu_part = -(g_theta[:, 2 * k - 1 :] * v[:, 2 * k - 1 :]).sum(1)
    neg = torch.tensor(-1e30, dtype=torch.float64)

    def sm(u, mask=batch.mask):
        return torch.softmax(torch.where(mask, u, neg), -1)

    c = sm(batch.b + batch.tau) - sm(batch.b)
    p_w = sm(batch.b[:, None] + design.W * batch.tau[:, None], batch.mask[:, None])
    pbar = torch.einsum("s,nsk->nk", design.weights, p_w)
    idx = batch.e.unsqueeze(1)
    expected = (
        c.gather(1, idx) * (batch.y.unsqueeze(1) - batch.r.gather(1, idx)) / pbar.gather(1, idx)
    )[:, 0]
    torch.testing.assert_close(mu_part, expected)
    inf = est.db_influence(batch, settings)
    full = (inf.psi - inf.theta)[:, 0]
    assert not torch.allclose(full, mu_part), "the choice part contributes too"


@pytest.fixture(scope="module")
def true_nuisance_run():
    """40k simulated queries (K = 3) with the TRUE b, τ, μ plugged into the estimators."""
    cfg = sim.InterferenceSimConfig(n_items=1_000, set_size=3, truth_queries=300_000, seed=11)
    pool = sim.make_pool(cfg.n_items, cfg.p_treat, cfg.seed)
    truth = sim.true_effects(pool, cfg)
    q = sim.simulate_queries(pool, 40_000, 3, 3, "continuous", 1.0, np.random.default_rng(5))
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    cb = torch.as_tensor(pool.c_bin[q.items]).long()
    batch = est.QueryBatch(
        t(q.b), t(q.tau), t(q.mu), t(q.w), torch.as_tensor(q.mask), torch.as_tensor(q.e), t(q.y), cb
    )
    settings = est.DBSettings(p=cfg.p_treat, policy_q=(0.0, 0.5, 1.0), n_groups=2)
    return truth, batch, est.db_influence(batch, settings)


def test_db_with_true_nuisances_recovers_the_true_gte(true_nuisance_run):
    truth, batch, inf = true_nuisance_run
    names = list(inf.names)
    for target in ["gte", "V_q=0", "V_q=0.5", "V_q=1", "group=0", "group=1"]:
        col = names.index(target)
        e = est.mean_estimate(est.mean_sums(inf.psi[:, col]))
        tv = truth[target]["value"]
        z = abs(e.estimate - tv) / math.hypot(e.se, truth[target]["mc_se"])
        assert z < TRUE_NUISANCE_Z, (target, e, tv)
    # The correction has mean zero at the truth (its SE is the scale).
    corr = inf.psi[:, 0] - inf.theta[:, 0]
    c = est.mean_estimate(est.mean_sums(corr))
    assert abs(c.estimate) < TRUE_NUISANCE_Z * c.se, c
    assert (inf.ridge == 0).all()


def test_difference_in_means_is_biased_in_the_simulated_design(true_nuisance_run):
    """The design creates interference: HT- and HA-DIM miss the GTE by many SEs."""
    truth, batch, _ = true_nuisance_run
    tv = truth["gte"]["value"]
    ht = est.mean_estimate(
        est.mean_sums(est.benchmark_terms(batch.w, batch.e, batch.y, batch.mask, 0.5)["HT_DIM"])
    )
    ha = est.hajek_estimate(est.hajek_sums(batch.w, batch.e, batch.y))
    assert (ht.estimate - tv) / ht.se > 10
    assert (ha.estimate - tv) / ha.se > 5
    share = float(est.exposed_treated(batch.w, batch.e).mean())
    assert share > 0.55, "content-exposure bias: treated items get more than p of exposures"


def test_aipw_with_one_item_equals_doubleml_irm():
    """With K = 1 the set's propensity is p, and AIPW is DoubleML's IRM ATE score."""
    dml = pytest.importorskip("doubleml")
    rng = np.random.default_rng(0)
    n, p = 3_000, 0.4
    x = rng.normal(size=(n, 2))
    d = rng.binomial(1, p, n)
    y = x[:, 0] + d * (1 + x[:, 1]) + rng.normal(size=n)
    f0 = 0.9 * x[:, 0]
    f1 = x[:, 0] + 1.1 + 0.8 * x[:, 1]
    data = dml.DoubleMLData.from_arrays(x, y, d)
    from sklearn.linear_model import LinearRegression, LogisticRegression

    irm = dml.DoubleMLIRM(data, LinearRegression(), LogisticRegression(), n_folds=2)
    irm.fit(
        external_predictions={
            "d": {
                "ml_g0": f0.reshape(-1, 1),
                "ml_g1": f1.reshape(-1, 1),
                "ml_m": np.full((n, 1), p),
            }
        }
    )
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    w = t(d).unsqueeze(1)
    terms = est.benchmark_terms(
        w, torch.zeros(n, dtype=torch.int64), t(y), torch.ones(n, 1, dtype=torch.bool), p,
        torch.where(w[:, 0] > 0, t(f1), t(f0)), t(f1), t(f0),
    )  # fmt: skip
    ours = est.mean_estimate(est.mean_sums(terms["AIPW"]))
    assert ours.estimate == pytest.approx(float(irm.coef[0]), rel=1e-9)
    assert ours.se == pytest.approx(float(irm.se[0]), rel=1e-6)
    # IPW with K = 1 is the Horvitz–Thompson difference.
    torch.testing.assert_close(terms["IPW"], terms["HT_DIM"])
