"""The group-lasso solver of ``segments`` against outside references (no Ray needed).

* cvxpy (Clarabel, interior point) on the same reparametrised problem: objective to a
  relative 1e-6 and the same exact-zero pattern;
* scikit-learn unpenalised logistic regressions for the special cases α = 1 and α = 0;
* finite differences for the gradient and the Hessian.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed_hte.models.segments import (
    DataPass,
    Layout,
    Params,
    accumulate_stats,
    fit_path,
    kkt_residual,
    lambda_max,
    penalty,
    prox,
)
from distributed_hte.train.segments_worker import group_blocks


def make_problem(n=2500, p=4, segment_of=(0, 0, 1, 1, 1), seed=0, n_folds=0):
    """Small logistic data with one off-message creative; returns (layout, arrays, data pass)."""
    rng = np.random.default_rng(seed)
    segment_of = np.asarray(segment_of)
    C, m = len(segment_of), int(segment_of.max()) + 1
    x = rng.normal(size=(n, p))
    k = rng.integers(0, C, n)
    gamma = np.zeros((m, p))
    gamma[0, 0], gamma[-1, 1] = 1.0, -0.8
    delta = np.zeros((C, p))
    delta[-2] = 0.6
    s = -0.4 + np.einsum("ij,ij->i", x, gamma[segment_of[k]] + delta[k])
    y = (rng.random(n) < 1 / (1 + np.exp(-s))).astype(float)
    fold = rng.integers(0, max(n_folds, 1), n)
    layout = Layout(torch.as_tensor(segment_of), m, p)
    blocks = list(group_blocks(k, x, y, fold, max_rows=700))
    return layout, (x, k, y, fold), DataPass(lambda: iter(blocks), layout, n_folds)


def cvxpy_solve(x, k, y, segment_of, lam, alpha):
    import cvxpy as cp

    segment_of = np.asarray(segment_of)
    C, m, p = len(segment_of), int(segment_of.max()) + 1, x.shape[1]
    n_j = np.bincount(segment_of)
    c, G, D = cp.Variable(C), cp.Variable((m, p)), cp.Variable((C, p))
    parts, labels = [], []
    for kk in range(C):
        rows = k == kk
        parts.append(c[kk] + x[rows] @ (G[segment_of[kk]] + D[kk]))
        labels.append(y[rows])
    score, yy = cp.hstack(parts), np.concatenate(labels)
    loss = cp.sum(cp.logistic(score) - cp.multiply(yy, score)) / len(y)
    pen = lam * alpha * cp.sum(cp.abs(G)) + sum(
        lam * (1 - alpha) / n_j[segment_of[kk]] * cp.norm(D[kk], 2) for kk in range(C)
    )
    prob = cp.Problem(cp.Minimize(loss + pen))
    prob.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return prob.value, c.value, G.value, D.value


@pytest.mark.parametrize("lam,alpha", [(0.02, 0.3), (0.05, 0.1), (0.01, 0.0), (0.004, 0.05)])
def test_matches_cvxpy_objective_and_zero_pattern(lam, alpha):
    layout, (x, k, y, _), data = make_problem()
    params, infos, _ = fit_path(data, 1, lam, alpha, tol=1e-10, path_steps=4)
    ours = infos[-1].objective[0]
    ref, c, G, D = cvxpy_solve(x, k, y, layout.segment_of.numpy(), lam, alpha)
    assert abs(ours - ref) / abs(ref) < 1e-6
    assert ours <= ref + 1e-9  # an exact solver is never worse than an interior point
    ours_zero = (params.delta[0].norm(dim=1) == 0).numpy()
    ref_zero = np.linalg.norm(D, axis=1) < 1e-5
    np.testing.assert_array_equal(ours_zero, ref_zero)
    assert ours_zero.any() and not ours_zero.all()  # the case exercises both sides
    # Per-creative coefficients are unique (strictly convex loss); γ alone need not be
    # when α = 0 (any point between two creatives' β minimises their group norms).
    ref_theta = np.column_stack([c, G[layout.segment_of.numpy()] + D])
    np.testing.assert_allclose(
        params.creative_coefficients(layout)[0].numpy(), ref_theta, atol=2e-4
    )


def test_lambda_max_zeroes_every_penalised_coefficient():
    layout, _, data = make_problem(seed=1)
    alpha = 0.2
    params, infos, lmax = fit_path(data, 1, 10.0, alpha, path_steps=1)
    st = data.stats(params, want="gradient")
    assert float(lambda_max(st.grad / st.n[:, None, None], alpha, layout)[0]) == pytest.approx(
        lmax, rel=1e-9
    )
    for scale, expect_zero in [(1.0001, True), (3.0, True), (0.9, False)]:
        params, infos, _ = fit_path(data, 1, lmax * scale, alpha, path_steps=1)
        all_zero = bool((params.gamma == 0).all() and (params.delta == 0).all())
        assert all_zero == expect_zero, scale
        assert infos[-1].converged == [True]


def test_alpha_one_gives_per_creative_unpenalised_logistic_fits():
    from sklearn.linear_model import LogisticRegression

    layout, (x, k, y, _), data = make_problem(n=3000, seed=2)
    params, infos, _ = fit_path(data, 1, 0.05, 1.0, tol=1e-10, path_steps=3)
    assert bool((params.gamma == 0).all())
    theta = params.creative_coefficients(layout)[0].numpy()
    for kk in range(layout.n_creatives):
        rows = k == kk
        ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(x[rows], y[rows])
        np.testing.assert_allclose(theta[kk, 0], ref.intercept_[0], atol=1e-5)
        np.testing.assert_allclose(theta[kk, 1:], ref.coef_[0], atol=1e-5)


def test_alpha_zero_large_lambda_gives_pooled_fit_per_segment():
    from sklearn.linear_model import LogisticRegression

    layout, (x, k, y, _), data = make_problem(n=3000, seed=3)
    params, infos, _ = fit_path(data, 1, 50.0, 0.0, tol=1e-10, path_steps=1)
    assert bool((params.delta == 0).all())
    seg = layout.segment_of.numpy()
    for j in range(layout.n_segments):
        creatives = np.flatnonzero(seg == j)
        rows = np.isin(k, creatives)
        dummies = (k[rows][:, None] == creatives[None, :]).astype(float)
        design = np.hstack([dummies, x[rows]])
        ref = LogisticRegression(C=np.inf, fit_intercept=False, tol=1e-12, max_iter=10_000)
        ref.fit(design, y[rows])
        np.testing.assert_allclose(
            params.c[0, creatives].numpy(), ref.coef_[0, : len(creatives)], atol=1e-5
        )
        np.testing.assert_allclose(
            params.gamma[0, j].numpy(), ref.coef_[0, len(creatives) :], atol=1e-5
        )


def _loss(data: DataPass, params: Params) -> float:
    st = data.stats(params, want="loss")
    return float(st.loss[0] / st.n[0])


def test_gradient_and_hessian_match_finite_differences():
    layout, _, data = make_problem(n=800, p=3, seed=4)
    rng = np.random.default_rng(0)
    params = Params.zeros(1, layout)
    params.c += torch.as_tensor(rng.normal(0, 0.3, params.c.shape))
    params.gamma += torch.as_tensor(rng.normal(0, 0.3, params.gamma.shape))
    params.delta += torch.as_tensor(rng.normal(0, 0.3, params.delta.shape))
    st = data.stats(params, want="hessian")
    grad = (st.grad / st.n[:, None, None])[0]  # (C, p+1)
    hess = (st.hess.double() / st.n[:, None, None, None])[0]
    eps = 1e-6
    for kk in range(layout.n_creatives):
        for i in range(layout.n_features + 1):

            def shifted(h: float, kk=kk, i=i) -> Params:
                q = params.clone()
                if i == 0:
                    q.c[0, kk] += h
                else:
                    q.delta[0, kk, i - 1] += h
                return q

            fd = (_loss(data, shifted(eps)) - _loss(data, shifted(-eps))) / (2 * eps)
            assert fd == pytest.approx(float(grad[kk, i]), abs=1e-8)
            g_plus = accumulate_stats(iter(data.blocks()), shifted(eps), layout, 0, "gradient")
            g_minus = accumulate_stats(iter(data.blocks()), shifted(-eps), layout, 0, "gradient")
            fd_col = ((g_plus.grad - g_minus.grad) / (2 * eps) / st.n[0])[0, kk]
            np.testing.assert_allclose(hess[kk, :, i].numpy(), fd_col.numpy(), atol=1e-6)


def test_cv_problems_equal_separate_fits_on_their_folds():
    """Solving k folds + refit side by side gives what solving each subset alone gives."""
    layout, (x, k, y, fold), data = make_problem(n=3000, seed=5, n_folds=3)
    together, infos, _ = fit_path(data, 4, 0.01, 0.2, tol=1e-10, path_steps=3)
    for q in range(4):
        rows = fold != q if q < 3 else np.ones(len(y), dtype=bool)
        blocks = list(group_blocks(k[rows], x[rows], y[rows], np.zeros(rows.sum(), dtype=np.int64)))
        alone = DataPass(lambda blocks=blocks: iter(blocks), layout, 0)
        single, single_infos, _ = fit_path(alone, 1, 0.01, 0.2, tol=1e-10, path_steps=3)
        assert infos[-1].objective[q] == pytest.approx(single_infos[-1].objective[0], rel=1e-9)
        np.testing.assert_allclose(together.gamma[q].numpy(), single.gamma[0].numpy(), atol=1e-6)


def test_prox_gives_exact_zeros_and_kkt_is_zero_at_a_fixed_point():
    layout = Layout(torch.tensor([0, 0, 1]), 2, 3)
    params = Params.zeros(1, layout)
    params.gamma[0] = torch.tensor([[0.05, -2.0, 0.0], [0.3, 0.0, -0.01]], dtype=torch.float64)
    params.delta[0] = torch.tensor(
        [[0.01, 0.01, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    out = prox(params, torch.tensor([1.0], dtype=torch.float64), lam=0.2, alpha=0.5, layout=layout)
    # γ threshold 0.1; δ thresholds 0.1/2 and 0.1/1.
    np.testing.assert_allclose(
        out.gamma[0].numpy(), np.array([[0.0, -1.9, 0.0], [0.2, 0.0, 0.0]]), atol=1e-15
    )
    assert int((out.gamma == 0).sum()) == 4  # exact zeros, not small numbers
    assert float(out.delta[0, 0].norm()) == 0.0
    assert float(out.delta[0, 1, 0]) == pytest.approx(0.95)
    # A prox fixed point with zero gradient has zero KKT residual only when it is zero.
    zero_grad = torch.zeros(1, 3, 4, dtype=torch.float64)
    assert float(kkt_residual(Params.zeros(1, layout), zero_grad, 0.2, 0.5, layout)[0]) == 0.0
    assert float(kkt_residual(out, zero_grad, 0.2, 0.5, layout)[0]) > 0.0
    assert float(penalty(Params.zeros(1, layout), 0.2, 0.5, layout)[0]) == 0.0
