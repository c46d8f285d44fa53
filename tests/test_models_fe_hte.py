"""The fe_hte network in one process: shapes, normalisation, coefficients, gradients."""

from __future__ import annotations

import numpy as np
import torch

from distributed_hte.models.fe_hte import FixedEffectsHTE, MLPConfig


def _model(hidden=(), dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = FixedEffectsHTE(
        3,
        2,
        [5, 4],
        MLPConfig(hidden),
        MLPConfig(hidden),
        beta_mean=[1.0, -2.0, 0.5],
        beta_scale=[2.0, 0.5, 3.0],
        g_mean=[0.3, 0.0],
        g_scale=[1.5, 2.0],
    ).to(dtype)
    for emb in m.fixed_effects:
        torch.nn.init.normal_(emb.weight)
    return m


def _batch(n=16, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, generator=g, dtype=dtype),
        torch.randn(n, 2, generator=g, dtype=dtype),
        torch.rand(n, generator=g, dtype=dtype) * 3,
        torch.stack(
            [torch.randint(0, 5, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)], 1
        ),
    )


def test_forward_shapes_and_decomposition():
    m = _model(hidden=(8, 4))
    xb, xg, t, ids = _batch()
    out = m(xb, xg, t, ids)
    assert out["y_hat"].shape == out["beta"].shape == out["g"].shape == (16,)
    expected = out["beta"] * t + out["g"] + m.fixed_effect_sum(ids)
    torch.testing.assert_close(out["y_hat"], expected)


def test_normalize_keeps_predictions_and_centres_each_family():
    m = _model()
    xb, xg, t, ids = _batch()
    before = m(xb, xg, t, ids)["y_hat"].detach().clone()
    m.normalize_()
    after = m(xb, xg, t, ids)["y_hat"].detach()
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)
    for emb in m.fixed_effects:
        assert abs(float(emb.weight.detach().mean())) < 1e-6


def test_normalize_with_counts_zeroes_unseen_ids():
    m = _model()
    m.normalize_([torch.tensor([3, 0, 1, 1, 2]), torch.ones(4)])
    w = m.fixed_effects[0].weight[:, 0]
    assert float(w[1].detach()) == 0.0
    assert abs(float(w[[0, 2, 3, 4]].detach().mean())) < 1e-6


def test_linear_coefficients_are_on_the_raw_feature_scale():
    m = _model()
    coefs = m.linear_coefficients(["a", "b", "c"], ["z0", "z1"])
    xb, xg, _, _ = _batch()
    beta_raw = coefs["beta"]["(intercept)"] + xb.double() @ torch.tensor(
        [coefs["beta"][k] for k in "abc"], dtype=torch.float64
    )
    torch.testing.assert_close(m.beta(xb).double(), beta_raw, atol=1e-5, rtol=1e-5)
    g_raw = xg.double() @ torch.tensor([coefs["g"]["z0"], coefs["g"]["z1"]], dtype=torch.float64)
    # g's constant is folded into the reported intercept.
    shift = coefs["intercept"] - float(m.intercept)
    torch.testing.assert_close(m.g(xg).double(), g_raw + shift, atol=1e-5, rtol=1e-5)


def test_nonlinear_nets_export_no_coefficients():
    assert set(_model(hidden=(4,)).linear_coefficients(["a", "b", "c"], ["z0", "z1"])) == {
        "intercept"
    }


def test_loss_gradient_matches_finite_differences_in_float64():
    m = _model(hidden=(6,), dtype=torch.float64)
    xb, xg, t, ids = _batch(dtype=torch.float64)
    y = torch.randn(16, dtype=torch.float64)
    inputs = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    # gradcheck compares autograd against central finite differences.
    assert torch.autograd.gradcheck(
        lambda *f: _functional_loss(m, f, xb, xg, t, ids, y), inputs, eps=1e-6, atol=1e-5
    )


def _functional_loss(m, flat_params, xb, xg, t, ids, y):
    names = [n for n, _ in m.named_parameters()]
    out = torch.func.functional_call(
        m, dict(zip(names, flat_params, strict=True)), (xb, xg, t, ids)
    )
    return ((out["y_hat"] - y) ** 2).mean()


def test_linear_model_recovers_ols_on_tiny_problem():
    """Full-batch training of the linear network converges to least squares with dummies."""
    rng = np.random.default_rng(0)
    n = 600
    xb = rng.normal(size=(n, 3))
    xg = rng.normal(size=(n, 2))
    t = rng.poisson(2.0, n).astype(float)
    ids = np.column_stack([rng.integers(0, 5, n), rng.integers(0, 4, n)])
    y = (
        (1 + xb @ [0.5, -0.2, 0.1]) * t
        + xg @ [0.3, -0.4]
        + np.array([0.1, -0.5, 0.3, 0.0, 0.2])[ids[:, 0]]
        + rng.normal(0, 0.1, n)
    )
    design = np.column_stack(
        [t, xb * t[:, None], xg, np.eye(5)[ids[:, 0]], np.eye(4)[ids[:, 1]][:, 1:]]
    )
    ols = np.linalg.lstsq(design, y, rcond=None)[0]
    m = FixedEffectsHTE(3, 2, [5, 4]).double()
    opt = torch.optim.LBFGS(
        m.parameters(),
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )
    T = [torch.tensor(a) for a in (xb, xg, t)] + [torch.tensor(ids)]
    Y = torch.tensor(y)

    def closure():
        opt.zero_grad()
        loss = ((m(*T)["y_hat"] - Y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    coefs = m.linear_coefficients(["a", "b", "c"], ["z0", "z1"])
    got = [
        coefs["beta"]["(intercept)"],
        coefs["beta"]["a"],
        coefs["beta"]["b"],
        coefs["beta"]["c"],
        coefs["g"]["z0"],
        coefs["g"]["z1"],
    ]
    np.testing.assert_allclose(got, ols[:6], atol=1e-6)


def test_a_nonlinear_net_with_a_skip_path_holds_a_linear_fit_exactly():
    """The SGD path's warm start: the linear fit in the skip path, the head at zero, so the
    hidden layers add nothing until training moves them."""
    from distributed_hte.kinds.fe_hte.exact import _hold_linear

    torch.manual_seed(0)
    m = FixedEffectsHTE(
        3,
        0,
        [5],
        MLPConfig((8, 4), skip=True),
        beta_mean=[1.0, -2.0, 0.5],
        beta_scale=[2.0, 0.5, 3.0],
    )
    w = np.array([0.5, -1.0, 2.0])
    with torch.no_grad():
        _hold_linear(m.beta_net, w)
        m.beta_net.head.bias.fill_(0.25)
    x = torch.randn(32, 3)
    z = (x - torch.tensor([1.0, -2.0, 0.5])) / torch.tensor([2.0, 0.5, 3.0])
    expected = z @ torch.as_tensor(w, dtype=torch.float32) + 0.25
    torch.testing.assert_close(m.beta(x), expected)
    # and training moves the hidden layers: the head gets a gradient at once
    m.beta(x).sum().backward()
    assert m.beta_net.head.weight.grad.abs().sum() > 0
    assert m.beta_net.skip.weight.grad is not None


def test_skip_path_is_only_built_for_nonlinear_nets():
    lin = FixedEffectsHTE(2, 0, [3], MLPConfig((), skip=True))
    assert lin.beta_net.skip is None and lin.beta_net.is_linear


def _backfit_problem(seed: int = 3):
    """A plugin with skewed, confounded ids (buyer x seller x week) and rows in memory."""
    from distributed_hte.kinds.fe_hte.plugin import FeHtePlugin

    rng = np.random.default_rng(seed)
    n, sizes = 3000, {"buyer": 60, "seller": 12, "week": 5}
    rows = {
        # Skewed group sizes; sparse int64 ids as users have them.
        "buyer": 1000 + 7 * rng.zipf(1.6, n).clip(max=sizes["buyer"]).astype(np.int64),
        "seller": 50 + rng.integers(0, sizes["seller"], n),
        "week": 202401 + rng.integers(0, sizes["week"], n),
        "x0": rng.normal(size=n),
        "z0": rng.normal(size=n),
    }
    rows["t"] = rng.poisson(1.0 + (rows["buyer"] % 3), n).astype(np.float64)
    rows["y"] = (
        (0.5 + 0.3 * rows["x0"]) * rows["t"]
        + 0.2 * rows["z0"]
        + 0.01 * rows["buyer"]
        - 0.1 * rows["seller"]
        + rng.normal(size=n)
    )
    vocab = {c: np.unique(rows[c]) for c in ("buyer", "seller", "week")}
    plugin = FeHtePlugin(
        outcome="y",
        treatment="t",
        beta_features=["x0"],
        g_features=["z0"],
        fixed_effects=["buyer", "seller", "week"],
        vocab=vocab,
        beta_mean=[0.0],
        beta_scale=[1.0],
        g_mean=[0.0],
        g_scale=[1.0],
        beta_net=MLPConfig(hidden=(8,)),
        g_net=MLPConfig(hidden=()),
        backfit_sweeps=400,
        cache_in_memory=True,
    )
    return plugin, rows


def test_backfit_sets_the_exact_fixed_effects_given_the_nets():
    """after_epoch's Gauss-Seidel sweeps reach the least-squares fixed effects of
    y - beta(x) t - g(z) (dummy-variable lstsq), normalised as normalize_ does, and the
    effects are no longer SGD parameters."""
    plugin, rows = _backfit_problem()
    torch.manual_seed(0)
    model = plugin.build_model().double()
    assert not any(p.requires_grad for p in model.fixed_effects.parameters())
    assert not model.intercept.requires_grad
    assert all(g["lr_scale"] == 1.0 for g in plugin.param_groups(model))

    out = plugin.after_epoch(model, rows, lambda a: a)
    assert out["backfit_last_sweep_change"] < 1e-9

    b = plugin.to_tensors(rows, torch.device("cpu"))
    with torch.no_grad():
        nets = (model.beta(b["x_beta"].double()) * b["t"] + model.g(b["x_g"].double())).numpy()
    ids = b["ids"].numpy()
    dummies = [np.ones((len(nets), 1))] + [
        np.eye(len(plugin.vocab[c]))[ids[:, f]][:, 1:] for f, c in enumerate(plugin.fixed_effects)
    ]
    design = np.hstack(dummies)
    coef, *_ = np.linalg.lstsq(design, rows["y"] - nets, rcond=None)
    with torch.no_grad():
        ours = model.fixed_effect_sum(b["ids"]).numpy()
    np.testing.assert_allclose(ours, design @ coef, atol=1e-8)
    for emb in model.fixed_effects:
        assert abs(float(emb.weight.mean())) < 1e-10  # every id seen: zero mean

    # Off without rows in memory: SGD keeps the effects.
    plugin.cache_in_memory = False
    assert plugin.after_epoch(model, rows, lambda a: a) == {}
    assert plugin.build_model().fixed_effects[0].weight.requires_grad
