"""Exact linear fixed-effects solver: against pyfixest feols, exact special cases, and the
Ray Data driver on warehouse-layout parquet against the in-memory solver."""

from __future__ import annotations

import glob
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from distributed_hte.estimators import fixed_effects as fx
from distributed_hte.simulate.fe_hte_warehouse import WarehouseConfig, write_warehouse
from distributed_hte.train.exact_fe import LinearDesign, SortedIdEncoder

# tolerances (see the task's acceptance criteria)
TOL_COEF_VS_PYFIXEST = 1e-6
TOL_FE_VS_PYFIXEST = 1e-6
TOL_SE_REL_VS_PYFIXEST = 1e-4
TOL_RAY_VS_PURE = 1e-9

FAMILIES = ("buyer", "seller", "week")
DESIGN = LinearDesign("revenue", "clicks", ("u0", "u1", "v0", "v1", "x0"), ("z0", "z1", "z2"))
FORMULA = (
    "revenue ~ clicks + "
    + " + ".join(f"clicks:{b}" for b in DESIGN.beta_features)
    + " + "
    + " + ".join(DESIGN.g_features)
    + " | buyer + seller + week"
)


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    """80k rows, 1500 buyers, 300 sellers, 30 weeks in six files; cluster family: buyer."""
    out = tmp_path_factory.mktemp("exact_fe") / "wh"
    cfg = WarehouseConfig(n_rows=80_000, n_buyers=1_500, n_sellers=300, seed=3, chunk_rows=5_000)
    return write_warehouse(cfg, out)


@pytest.fixture(scope="module")
def frame(warehouse) -> pd.DataFrame:
    files = sorted(glob.glob(str(warehouse / "data" / "*.parquet")))
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


@pytest.fixture(scope="module")
def arrays(frame):
    """(y (n,), X (n, 9), codes (n, 3), encoder) from the whole frame."""
    batch = {c: frame[c].to_numpy() for c in frame.columns}
    y, X = DESIGN(batch)
    enc = SortedIdEncoder(FAMILIES, tuple(np.unique(frame[f].to_numpy()) for f in FAMILIES))
    return y, X, enc(batch), enc


@pytest.fixture(scope="module")
def pure(arrays):
    """The in-memory solver, in 20k-row batches, with pass-2 sums clustered by buyer."""
    y, X, codes, enc = arrays
    st = fx.statistics(y, X, codes, enc.n_ids, batch_rows=20_000)
    sol = fx.solve(st, coef_names=DESIGN.names)
    sc = fx.scores(y, X, codes, sol, cluster=0, n_clusters=enc.n_ids[0], batch_rows=20_000)
    return st, sol, sc


@pytest.fixture(scope="module")
def feols(frame):
    import pyfixest as pf

    return pf.feols(
        FORMULA,
        data=frame,
        vcov="iid",
        fixef_rm="none",  # our solver keeps singletons
        demeaner=pf.MapDemeaner(fixef_tol=1e-12, fixef_maxiter=100_000),
    )


def test_warehouse_layout(warehouse, frame):
    data = warehouse / "data"
    files = sorted(p.name for p in data.glob("*.parquet"))
    assert files == [f"weeks_{w}_{w + 4}.parquet" for w in range(202601, 202631, 5)]
    assert (data / "_SUCCESS").exists() and (data / "README.txt").exists()
    meta = json.loads((warehouse / "simulation.json").read_text())
    assert (meta["kind"], meta["schema_version"], meta["generator"]) == ("fe_hte", 1, "warehouse")
    assert len(frame) == 80_000 and frame["buyer"].min() > 10**9
    assert frame["week"].is_monotonic_increasing and frame["event_time"].is_monotonic_increasing
    sizes = frame.groupby("seller").size()
    assert sizes.max() > 20 * sizes.median()  # skewed (Zipf) sellers
    truth = pq.read_table(warehouse / "truth" / "buyer.parquet").to_pandas()
    assert list(truth.columns) == ["id", "effect"] and len(truth) == 1_500


def _fe_pyfixest(fit, frame) -> list[np.ndarray]:
    """pyfixest's fixed effects per family, ids sorted, zero mean (levels it drops = 0)."""
    fe = fit.fixef(atol=1e-14, btol=1e-14)
    out = []
    for f in FAMILIES:
        d = fe[f"C({f})"]
        est = np.array([d.get(str(i), 0.0) for i in np.unique(frame[f])])
        out.append(est - est.mean())
    return out


def test_coefficients_and_fixed_effects_match_pyfixest(pure, feols, frame):
    _, sol, _ = pure
    ref = feols.coef()[list(DESIGN.names)].to_numpy()
    np.testing.assert_allclose(sol.coef, ref, rtol=0, atol=TOL_COEF_VS_PYFIXEST)
    for ours, theirs in zip(sol.fixed_effects, _fe_pyfixest(feols, frame), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL_FE_VS_PYFIXEST)
    assert sol.n_components == 1 and sol.null_dim == 2  # connected: F − 1 redundant
    # the RSS from the statistics equals the pass-2 sum of squared residuals
    assert sol.rss == pytest.approx(np.sum(feols._u_hat**2), rel=1e-9)


@pytest.mark.parametrize("vcov", ["iid", "hetero", "CRV1"])
def test_standard_errors_match_pyfixest(pure, feols, vcov):
    st, sol, sc = pure
    cluster = 0 if vcov == "CRV1" else None
    fit = feols.vcov({"CRV1": "buyer"} if vcov == "CRV1" else vcov)
    tidy = fit.tidy().loc[list(DESIGN.names)]
    inf = fx.inference(sol, st, vcov, sc, cluster, DESIGN.names)
    np.testing.assert_allclose(inf.se, tidy["Std. Error"], rtol=TOL_SE_REL_VS_PYFIXEST)
    np.testing.assert_allclose(inf.t, tidy["t value"], rtol=TOL_SE_REL_VS_PYFIXEST)
    np.testing.assert_allclose(inf.ci_low, tidy["2.5%"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(inf.ci_high, tidy["97.5%"], rtol=0, atol=1e-6)
    assert (inf.df_k, inf.df_t) == (fit._df_k, fit._df_t)
    if vcov == "CRV1":
        assert inf.nested == (0,) and inf.n_clusters == st.n_ids[0]  # buyers seen


def test_recovers_the_simulated_truth(pure, warehouse, arrays):
    """Linear β and g: coefficients within 4 clustered SEs of the truth; FE track the truth."""
    from distributed_hte.simulate.fe_hte import read_truth

    st, sol, sc = pure
    truth = np.array([1.0, 0.5, -0.3, 0.4, 0.2, 0.3, 0.8, -0.5, 0.3])  # true_beta / true_g
    inf = fx.inference(sol, st, "CRV1", sc, 0, DESIGN.names)
    assert np.all(np.abs(sol.coef - truth) < 4 * inf.se)
    for f, est in zip(FAMILIES, sol.fixed_effects, strict=True):
        true = read_truth(warehouse / "truth", f).reindex(arrays[3].vocab[FAMILIES.index(f)])
        assert np.corrcoef(est, true.to_numpy())[0, 1] > 0.99


def test_cg_path_matches_dense_path(pure):
    st, sol, _ = pure
    cg = fx.solve(st, coef_names=DESIGN.names, dense_max=0)
    assert cg.method == "cg" and sol.method == "dense"
    np.testing.assert_allclose(cg.coef, sol.coef, rtol=0, atol=1e-10)
    for a, b in zip(cg.fixed_effects, sol.fixed_effects, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


def test_one_family_is_the_within_estimator(arrays):
    y, X, codes, enc = arrays
    sol, _ = fx.fit_arrays(y, X, codes[:, :1], enc.n_ids[:1])
    g = codes[:, 0]
    cnt = np.bincount(g)

    def demean(v):
        return v - (np.bincount(g, v) / cnt)[g]

    Xw = np.column_stack([demean(X[:, j]) for j in range(X.shape[1])])
    b = np.linalg.lstsq(Xw, demean(y), rcond=None)[0]
    np.testing.assert_allclose(sol.coef, b, rtol=0, atol=1e-10)
    a = np.bincount(g, y - X @ b) / cnt  # each id's mean residual
    np.testing.assert_allclose(sol.fixed_effects[0] + sol.intercept, a, rtol=0, atol=1e-10)


def test_no_family_is_ols(arrays):
    y, X, _, _ = arrays
    codes = np.zeros((len(y), 0), np.int64)
    sol, inf = fx.fit_arrays(y, X, codes, [], vcov="hetero")
    theta, rss, *_ = np.linalg.lstsq(np.column_stack([np.ones(len(y)), X]), y, rcond=None)
    np.testing.assert_allclose(sol.coef, theta[1:], rtol=0, atol=1e-10)
    assert sol.intercept == pytest.approx(theta[0], abs=1e-10)
    assert sol.rss == pytest.approx(rss[0], rel=1e-9)
    assert inf.df_k == X.shape[1] + 1  # the intercept counts, as in pyfixest


def test_disconnected_id_graph_is_reported():
    rng = np.random.default_rng(0)
    n = 4_000
    # two markets that never trade with each other: buyers 0..49 ↔ sellers 0..9, 50..99 ↔ 10..19
    market = rng.integers(0, 2, n)
    codes = np.column_stack(
        [market * 50 + rng.integers(0, 50, n), market * 10 + rng.integers(0, 10, n)]
    )
    X = rng.normal(size=(n, 2))
    y = X @ [1.0, -2.0] + rng.normal(size=n)
    for dense_max in (fx.DENSE_MAX, 0):
        sol, _ = fx.fit_arrays(y, X, codes, [100, 20], dense_max=dense_max)
        assert sol.n_components == 2
        ref = fx.fit_arrays(y, X, codes, [100, 20])[0]
        np.testing.assert_allclose(sol.coef, ref.coef, atol=1e-9)
    assert ref.null_dim == 2  # one per component: F − 1 = 1 each


def test_regressor_absorbed_by_fixed_effects_is_named(arrays):
    y, X, codes, enc = arrays
    # a buyer attribute (its number of rows) is constant within each buyer id
    buyer_level = np.bincount(codes[:, 0], minlength=enc.n_ids[0])[codes[:, 0]].astype(float)
    Xb = np.column_stack([X, buyer_level])
    with pytest.raises(ValueError, match="buyer_size"):
        fx.fit_arrays(y, Xb, codes, enc.n_ids, coef_names=[*DESIGN.names, "buyer_size"])


def test_encoder_rejects_unknown_ids():
    enc = SortedIdEncoder(("a",), (np.array([3, 7, 11]),))
    assert enc({"a": np.array([11, 3])}).ravel().tolist() == [2, 0]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        enc({"a": np.array([3, 5])})


@pytest.fixture(scope="module")
def ray_data(ray_session, warehouse):
    """The partitioned parquet as a Ray Dataset (the folder also holds _SUCCESS, README.txt)."""
    import ray.data

    return ray.data.read_parquet(
        str(warehouse / "data"), file_extensions=["parquet"]
    ).select_columns([*DESIGN.columns, *FAMILIES, "beta_true", "g_true"])


def test_ray_driver_matches_pure_solver(ray_data, arrays, pure):
    from distributed_hte.train.exact_fe import fit_linear_fe

    _, _, _, enc = arrays
    st, sol, sc = pure
    res = fit_linear_fe(
        ray_data,
        DESIGN,
        enc,
        enc.n_ids,
        families=FAMILIES,
        vcov="CRV1",
        cluster="buyer",
        batch_rows=16_384,
    )
    assert res.statistics.n == 80_000
    np.testing.assert_allclose(res.solution.coef, sol.coef, rtol=0, atol=TOL_RAY_VS_PURE)
    assert res.solution.intercept == pytest.approx(sol.intercept, abs=TOL_RAY_VS_PURE)
    for a, b in zip(res.solution.fixed_effects, sol.fixed_effects, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL_RAY_VS_PURE)
    for vcov, cluster in [("CRV1", 0), ("hetero", None), ("iid", None)]:
        ours = fx.inference(res.solution, res.statistics, vcov, res.scores, cluster)
        ref = fx.inference(sol, st, vcov, sc, cluster)
        np.testing.assert_allclose(ours.se, ref.se, rtol=TOL_RAY_VS_PURE)
    assert res.seconds["pass2"] > 0
    coefs = DESIGN.split(res.solution.coef)
    assert coefs["beta"]["(intercept)"] == res.solution.coef[0] and list(coefs["g"]) == [
        "z0",
        "z1",
        "z2",
    ]


def test_nonlinear_finish_recovers_the_linear_fixed_effects(ray_data, arrays, pure):
    """Given m(x) = X b̂ of the exact fit, the FE of y − m(x) are the exact fit's FE."""
    from distributed_hte.train.exact_fe import LinearOffset, solve_fixed_effects_given

    _, _, _, enc = arrays
    _, sol, _ = pure
    res = solve_fixed_effects_given(
        ray_data, LinearOffset(DESIGN, sol.coef), enc, enc.n_ids, families=FAMILIES
    )
    assert res.solution.coef.shape == (0,)
    assert res.solution.intercept == pytest.approx(sol.intercept, abs=TOL_RAY_VS_PURE)
    for a, b in zip(res.solution.fixed_effects, sol.fixed_effects, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL_RAY_VS_PURE)
