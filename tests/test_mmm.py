"""Kind ``mmm``: the maths against NumPy re-derivations, the data contract, the optimiser,
and a small end-to-end recovery on real Ray and real parquet (one shared fitted run).

The full recovery targets of issue 11 (200 regions × 104 weeks × 6 channels, media
shares of 20/40/60 %) are the ``slow`` test at the bottom; their figures are recorded in
``benchmarks/README.md``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from distributed_hte.errors import DataError, SpecError, UserError
from distributed_hte.estimators.mmm import Response, fit_metrics, optimise_budget
from distributed_hte.kinds import get_kind
from distributed_hte.kinds.mmm.data import Columns, read_panel
from distributed_hte.models.mmm import (
    DeepMMM,
    MmmConfig,
    apply_adstock,
    geometric_weights,
    hill,
    weibull_weights,
)
from distributed_hte.runner import run_job
from distributed_hte.simulate.mmm import MmmSimConfig, geometric_adstock, hill_np, simulate_mmm
from distributed_hte.spec import validate_spec

# Tolerances of the small default-tier recovery (40 regions, 3 channels, short training):
# the targets (3 pp, 15 %) are for 200 regions and live in the slow test.
SMALL_SHARE_PP = 8.0
SMALL_ROI_REL = 0.35
SUM_REL = 1e-6
# 1 vs 2 workers: the same global batch and steps, different shuffles (measured on the
# small panel: ROI 0.1-0.3 % apart, shares 0.05 pp).
WORKERS_ROI_REL = 0.03
WORKERS_SHARE_PP = 1.0
WORKERS_RMSE_REL = 0.02
REPLICAS = 2
OPT_NOISE_REL = 0.02
CHANNELS3 = ["tv", "search", "social"]


# ----------------------------------------------------------------------------- maths


def _np_adstock(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Loop re-derivation: a[b, t, c] = Σ_l w[c, l] x[b, t − l, c]."""
    b, t, c = x.shape
    out = np.zeros_like(x)
    for i in range(t):
        for lag in range(w.shape[1]):
            if i - lag >= 0:
                out[:, i, :] += w[:, lag] * x[:, i - lag, :]
    return out


def test_geometric_adstock_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.gamma(1.0, 1.0, (3, 30, 4))
    theta = np.array([0.1, 0.5, 0.8, 0.95])
    w = geometric_weights(torch.tensor(theta, dtype=torch.float64), 13).numpy()
    expect_w = theta[:, None] ** np.arange(13)
    np.testing.assert_allclose(w, expect_w / expect_w.sum(1, keepdims=True), rtol=1e-12)
    got = apply_adstock(torch.tensor(x), torch.tensor(w)).numpy()
    np.testing.assert_allclose(got, _np_adstock(x, w), rtol=1e-10, atol=1e-12)
    # The simulator's own adstock is the same function.
    for c in range(4):
        np.testing.assert_allclose(geometric_adstock(x[:, :, c], theta[c]), got[:, :, c], 1e-10)
    # Weights sum to one: a constant activity has a steady state equal to itself.
    const = apply_adstock(torch.ones(1, 40, 4, dtype=torch.float64), torch.tensor(w))
    np.testing.assert_allclose(const[0, 20:].numpy(), 1.0, rtol=1e-12)


def test_weibull_adstock_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.gamma(1.0, 1.0, (2, 25, 2))
    k, lam = np.array([0.8, 2.5]), np.array([1.5, 4.0])
    w = weibull_weights(torch.tensor(k), torch.tensor(lam), 10).numpy()
    lags = np.arange(1, 11)
    pdf = (k[:, None] / lam[:, None]) * (lags / lam[:, None]) ** (k[:, None] - 1)
    pdf = pdf * np.exp(-((lags / lam[:, None]) ** k[:, None]))
    np.testing.assert_allclose(w, pdf / pdf.sum(1, keepdims=True), rtol=1e-10)
    got = apply_adstock(torch.tensor(x), torch.tensor(w)).numpy()
    np.testing.assert_allclose(got, _np_adstock(x, w), rtol=1e-10, atol=1e-12)


def test_hill_matches_numpy_and_is_zero_at_zero():
    a = np.array([[0.0, 0.1, 0.5, 1.0, 3.0, 50.0]]).T.repeat(2, 1)
    k, s = np.array([0.7, 1.3]), np.array([1.0, 2.5])
    got = hill(torch.tensor(a), torch.tensor(k), torch.tensor(s)).numpy()
    expect = np.where(a > 0, a**s / (a**s + k**s), 0.0)
    np.testing.assert_allclose(got, expect, rtol=1e-12)
    np.testing.assert_allclose(hill_np(a, k, s), expect, rtol=1e-12)
    assert np.all(got[0] == 0.0)
    # Finite gradients at zero activity (the log is taken of a safe value).
    at = torch.tensor(a, requires_grad=False)
    kt = torch.tensor(k, requires_grad=True)
    hill(at, kt, torch.tensor(s)).sum().backward()
    assert torch.isfinite(kt.grad).all()


def _random_model(seed: int = 0) -> tuple[DeepMMM, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    cfg = MmmConfig(n_regions=5, channels=["a", "b", "c"], controls=["p"], fit_weeks=30)
    model = DeepMMM(cfg).double()
    with torch.no_grad():  # move every parameter off its initial value
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "region": torch.arange(5),
        "week": torch.arange(36, dtype=torch.float64).repeat(5, 1),
        "media": torch.rand(5, 36, 3, generator=g, dtype=torch.float64) * 2,
        "controls": torch.randn(5, 36, 1, generator=g, dtype=torch.float64),
    }
    return model, inputs


def test_components_add_up_to_the_prediction():
    model, x = _random_model()
    out = model(x["region"], x["week"], x["media"], x["controls"])
    total = (
        out["baseline"]
        + out["trend"]
        + out["seasonality"]
        + out["controls"].sum(-1)
        + out["media"].sum(-1)
    )
    np.testing.assert_allclose(total.detach().numpy(), out["pred"].detach().numpy(), rtol=1e-12)
    assert out["delta"].abs().max() > 0, "the GRU's time variation is live in this check"


def test_zeroing_a_channel_removes_exactly_its_component():
    model, x = _random_model(1)
    out = model(x["region"], x["week"], x["media"], x["controls"])
    for c in range(3):
        m = x["media"].clone()
        m[:, :, c] = 0
        cf = model(x["region"], x["week"], m, x["controls"])
        diff = (out["pred"] - cf["pred"]).detach().numpy()
        np.testing.assert_allclose(diff, out["media"][:, :, c].detach().numpy(), atol=1e-12)


# ----------------------------------------------------------------------------- data contract


def _frame(n_regions: int = 4, n_weeks: int = 20, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    weeks = pd.date_range("2024-01-01", periods=n_weeks, freq="7D")
    for r in range(n_regions):
        for t, w in enumerate(weeks):
            rows.append(
                {
                    "region": 100 + r,
                    "week": w,
                    "sales": 100.0 + rng.normal(0, 5) + t,
                    "tv": float(rng.gamma(2.0, 10.0)),
                    "search": float(rng.gamma(2.0, 5.0)),
                    "price": float(rng.normal()),
                }
            )
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed)


def _cols(**kw) -> Columns:
    base = dict(
        region="region",
        week="week",
        kpi="sales",
        media=["tv", "search"],
        spend={"tv": "tv", "search": "search"},
        controls=["price"],
        holdout_weeks=4,
    )
    return Columns(**{**base, **kw})


def _bad_case(name: str, df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    if name == "negative media":
        df.loc[df.index[3], "tv"] = -1.0
    elif name == "region with no KPI":
        df.loc[df["region"] == 101, "sales"] = np.nan
    elif name == "always-zero channel":
        df["search"] = 0.0
    elif name == "unparseable week":
        df["week"] = df["week"].dt.strftime("%Y-%m-%d")
        df.loc[df.index[0], "week"] = "week 7 of 2024"
    elif name == "weeks not weekly":
        df.loc[df.index[0], "week"] = df.loc[df.index[0], "week"] + pd.Timedelta(days=2)
    elif name == "missing column":
        df = df.drop(columns=["price"])
    elif name == "missing KPI column":
        df = df.drop(columns=["sales"])
    elif name == "NaN in media":
        df.loc[df.index[5], "search"] = np.nan
    elif name == "NaN in KPI":
        df.loc[df.index[5], "sales"] = np.nan
    elif name == "duplicate region-week":
        df = pd.concat([df, df.iloc[:1]])
    return df


BAD = {
    "negative media": "negative value",
    "region with no KPI": "have no KPI",
    "always-zero channel": "zero on every row",
    "unparseable week": "does not parse",
    "weeks not weekly": "not on a weekly grid",
    "missing column": "no column 'price' (named by data.controls)",
    "missing KPI column": "no column(s) ['sales'] (named by data.kpi)",
    "NaN in media": "null",  # pandas writes NaN as a parquet null: the metadata check finds it
    "NaN in KPI": "null, NaN or infinite",
    "duplicate region-week": "more than one row",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_is_a_clear_error_and_writes_nothing(case, ray_session, small_parquet, tmp_path):
    data = small_parquet(_bad_case(case, _frame()))
    raw = {
        "name": "bad",
        "kind": "mmm",
        "data": {
            "path": str(data),
            "kpi": "sales",
            "media": ["tv", "search"],
            "spend": {"tv": "tv", "search": "search"},
            "controls": ["price"],
            "holdout_weeks": 4,
        },
        "outputs": {"dir": str(tmp_path / "runs")},
    }
    with pytest.raises(DataError, match=re.escape(BAD[case])) as err:
        run_job(validate_spec(raw))
    assert err.value.exit_code == 2
    assert not (tmp_path / "runs").exists(), "nothing is written for bad data"


def test_week_as_integer_period_and_string_dates_give_the_same_panel(small_parquet):
    df = _frame()
    a = read_panel(str(small_parquet(df, "dates")), _cols())
    ints = df.assign(week=((df["week"] - df["week"].min()).dt.days // 7 + 202401))
    b = read_panel(str(small_parquet(ints, "ints")), _cols())
    strs = df.assign(week=df["week"].dt.strftime("%Y-%m-%d"), region="r" + df["region"].astype(str))
    c = read_panel(str(small_parquet(strs, "strs")), _cols())
    for p in (b, c):
        np.testing.assert_array_equal(a.kpi, p.kpi)
        np.testing.assert_array_equal(a.media, p.media)
        np.testing.assert_array_equal(a.holdout, p.holdout)
    assert b.week_labels[0] == 202401 and a.week_labels[0] == "2024-01-01"
    assert c.regions[0] == "r100"


def test_ragged_panel_masks_missing_weeks_and_interpolates_gaps(small_parquet, caplog):
    df = _frame(n_regions=3, n_weeks=20)
    weeks = sorted(df["week"].unique())
    late = (df["region"] == 101) & (df["week"] < weeks[5])  # region 101 starts in week 5
    gap = (df["region"] == 102) & df["week"].isin(weeks[8:10])  # region 102 misses weeks 8-9
    full = df.copy()
    with caplog.at_level(logging.INFO):
        p = read_panel(str(small_parquet(df[~late & ~gap])), _cols())
    assert "ragged panel" in caplog.text and "1 of 3 regions start late" in caplog.text
    assert p.ragged["gap_weeks_interpolated"] == 2 and p.ragged["late_start_regions"] == 1
    assert not p.observed[1, :5].any() and p.observed[1, 5:].all()
    assert not p.observed[2, 8:10].any()
    # No media before a region exists; a gap's media is interpolated from its neighbours.
    assert np.all(p.media[1, :5] == 0)
    r102 = full[full["region"] == 102].sort_values("week")["tv"].to_numpy()
    np.testing.assert_allclose(p.media[2, 8, 0], r102[7] + (r102[10] - r102[7]) / 3)
    # The holdout is the last 4 observed weeks of each region; masked weeks never count.
    assert p.holdout.sum(1).tolist() == [4, 4, 4]
    assert not (p.fit & ~p.observed).any()


def test_ragged_simulation_is_read_with_its_masks(ray_session, tmp_path):
    out = simulate_mmm(
        MmmSimConfig(n_regions=30, n_weeks=60, n_channels=2, ragged=True, seed=3), tmp_path / "s"
    )
    p = read_panel(
        str(out / "data"),
        _cols(kpi="kpi", media=["tv", "search"], spend={}, controls=["price", "promo"]),
    )
    assert p.ragged["late_start_regions"] > 0 and p.ragged["gaps"] > 0
    assert int(p.observed.sum()) == len(pd.read_parquet(out / "data"))


# ----------------------------------------------------------------------------- optimiser


def _response(r: int = 3, c: int = 3) -> Response:
    rng = np.random.default_rng(2)
    return Response(
        kpi_scale=rng.uniform(500, 2000, r),
        beta=rng.uniform(0.05, 0.3, (r, c)),
        media_scale=rng.uniform(50, 200, (r, c)),
        hill_k=rng.uniform(0.5, 1.5, c),
        hill_slope=rng.uniform(1.0, 2.5, c),
        cost=rng.uniform(0.5, 5.0, c),
        split=rng.dirichlet(np.ones(r), c).T,
    )


@pytest.mark.parametrize("by_region", [False, True])
def test_optimiser_meets_every_constraint_and_beats_the_current_mix(by_region):
    resp = _response()
    budget, weeks = 50_000.0, 13
    bounds = np.array([[5_000.0, 20_000.0], [0.0, math.inf], [10_000.0, 30_000.0]])
    mix = np.array([0.6, 0.3, 0.1])  # violates the bounds: it is projected first
    res = optimise_budget(resp, budget, weeks, bounds, mix, by_region=by_region)
    totals = res.allocation.sum(0) if by_region else res.allocation
    assert res.allocation.shape == ((3, 3) if by_region else (3,))
    assert abs(totals.sum() - budget) <= 1e-6 * budget
    assert np.all(totals >= bounds[:, 0] - 1e-6) and np.all(totals <= bounds[:, 1] + 1e-6)
    assert np.all(res.allocation >= 0)
    cur = res.current_allocation
    assert abs(cur.sum() - budget) <= 1e-6 * budget and np.all(cur >= bounds[:, 0] - 1e-6)
    assert res.kpi >= res.current_kpi
    # No feasible point does better (a random search over the feasible set).
    rng = np.random.default_rng(0)
    for _ in range(300):
        z = rng.dirichlet(np.ones(3)) * budget
        z = np.clip(z, bounds[:, 0], bounds[:, 1])
        if abs(z.sum() - budget) > 1e-6 * budget:
            continue
        assert resp.period_kpi(z, weeks) <= res.kpi * (1 + 1e-6)


def test_optimiser_refuses_infeasible_bounds():
    with pytest.raises(UserError, match="no allocation meets the bounds"):
        optimise_budget(
            _response(), 1_000.0, 4, np.array([[0, 100.0], [0, 100.0], [0, 100.0]]), np.ones(3) / 3
        )


def test_fit_metrics_against_direct_formulas():
    rng = np.random.default_rng(3)
    y = rng.uniform(50, 150, (4, 10))
    p = y + rng.normal(0, 5, y.shape)
    m = np.ones_like(y, dtype=bool)
    m[0, :3] = False
    got = fit_metrics(y, p, m)
    e = (y - p)[m]
    assert math.isclose(got["rmse"], math.sqrt(np.mean(e**2)))
    assert math.isclose(got["mape"], np.mean(np.abs(e / y[m])))
    assert math.isclose(got["r2"], 1 - (e @ e) / np.sum((y[m] - y[m].mean()) ** 2))
    within = sum(np.sum((y[r][m[r]] - y[r][m[r]].mean()) ** 2) for r in range(4))
    assert math.isclose(got["r2_within_region"], 1 - (e @ e) / within)


def test_embedded_ray_has_room_for_two_replicas_beside_ray_data():
    from distributed_hte.runner import ray_target_for
    from distributed_hte.runtime import DATA_CPUS

    base = {"name": "u", "kind": "mmm", "simulate": {}, "scaling": {"num_workers": 1}}
    assert ray_target_for(validate_spec(base)).num_cpus >= 1 + DATA_CPUS
    with_u = validate_spec({**base, "uncertainty": {"replicas": 5}})
    assert ray_target_for(with_u).num_cpus >= 2 + DATA_CPUS


def test_spec_rejects_what_it_cannot_use():
    base = {"name": "x", "kind": "mmm", "data": {"path": "/tmp/x", "media": ["tv"]}}
    with pytest.raises(SpecError, match="spend column for every channel"):
        validate_spec({**base, "optimize": {"budget": 10}})
    with pytest.raises(SpecError, match="val_fraction"):
        validate_spec({**base, "train": {"val_fraction": 0.1}})
    with pytest.raises(SpecError, match="not in data.media"):
        validate_spec({**base, "data": {**base["data"], "spend": {"radio": "r"}}})


# ----------------------------------------------------------------------------- end to end


def _small_raw(tmp: Path) -> dict:
    """40 regions × 70 weeks × 3 channels, 2 workers, 2 bootstrap replicas (one round)."""
    return {
        "name": "mmm-small",
        "kind": "mmm",
        "simulate": {
            "n_regions": 40,
            "n_weeks": 70,
            "n_channels": 3,
            "seed": 4,
            "out": str(tmp / "sim"),
        },  # fmt: skip
        # One step per pass (40 regions per step, 20 per worker): 300 steps.
        "train": {
            "epochs": 12,
            "region_passes": 25,
            "batch_size": 40,
            "lr": 0.03,
            "log_every_s": 60,
        },  # fmt: skip
        "optimize": {"budget": 200_000, "weeks": 13, "bounds": {"tv": [20_000, 90_000]}},
        "uncertainty": {"replicas": REPLICAS, "level": 0.9, "seed": 3},
        "scaling": {"num_workers": 2},
        "outputs": {"dir": str(tmp / "runs")},
    }


@pytest.fixture(scope="module")
def small_run(ray_session, tmp_path_factory):
    """One fitted run shared by the end-to-end checks: 40 regions × 70 weeks × 3 channels."""
    tmp = tmp_path_factory.mktemp("mmm")
    run = run_job(validate_spec(_small_raw(tmp)))
    return run, tmp


def test_run_writes_every_artefact(small_run):
    run, _ = small_run
    for name in get_kind("mmm").artefacts + ["metrics.json", "budget.json"]:
        assert (run / name).exists(), name
    for plot in ("fit_vs_actual", "holdout_scatter", "contributions_over_time", "response_curves"):
        assert (run / "plots" / f"{plot}.png").exists()
    curves = pd.read_parquet(run / "response_curves.parquet")
    assert set(curves["level"]) >= {"national", "dma_0000"}
    assert {"slope", "saturation_spend"} <= set(curves.columns)
    nat = curves[curves["level"] == "national"]
    for _, g in nat.groupby("channel"):
        assert np.all(np.diff(g["weekly_kpi"].to_numpy()) >= -1e-9), "response rises with spend"


def test_small_recovery_beats_naive_forecasts_and_finds_the_shares(small_run):
    run, _ = small_run
    m = json.loads((run / "metrics.json").read_text())
    h = m["holdout"]
    assert h["rmse"] < h["naive_region_mean"]["rmse"]
    assert h["rmse"] < h["naive_last_8_weeks"]["rmse"]
    assert h["rmse"] < 1.5 * h["true_model"]["rmse"]
    t = m["truth"]
    assert t["max_abs_share_error_pp"] < SMALL_SHARE_PP, t["channels"]
    assert t["max_abs_roi_rel_error"] < SMALL_ROI_REL, t["channels"]
    assert abs(m["media_share"] - t["media_share"]) < 0.08
    ch = pd.read_csv(run / "channels.csv")
    assert list(ch["channel"]) == CHANNELS3
    assert math.isclose(ch["share"].sum(), 1.0, rel_tol=1e-9)
    np.testing.assert_allclose(ch["roi"], ch["contribution"] / ch["spend"], rtol=1e-9)


def test_decomposition_adds_up_to_the_prediction(small_run):
    run, tmp = small_run
    kind = get_kind("mmm")
    info = kind.predict(run, str(tmp / "sim" / "data"), tmp / "pred")
    pred = pd.read_parquet(tmp / "pred")
    assert info["rows"] == len(pred) == 40 * 70
    parts = ["baseline", "trend", "seasonality", "price", "promo", *CHANNELS3]
    total = pred[parts].sum(axis=1).to_numpy()
    np.testing.assert_allclose(total, pred["prediction"].to_numpy(), rtol=SUM_REL)
    long = pd.read_parquet(run / "contributions.parquet")
    assert set(long["component"]) == set(parts)
    wide = long.pivot_table(index=["region", "week"], columns="component", values="value")
    merged = pred.set_index(["region", "week"]).loc[wide.index]
    np.testing.assert_allclose(
        wide[parts].sum(axis=1).to_numpy(), merged["prediction"].to_numpy(), rtol=SUM_REL
    )
    # The channel table's contribution is the fit-week sum of the channel's component.
    ch = pd.read_csv(run / "channels.csv").set_index("channel")
    fit = merged[~merged["holdout"].to_numpy()]
    for c in CHANNELS3:
        assert math.isclose(ch.loc[c, "contribution"], fit[c].sum(), rel_tol=1e-6)


def test_predict_a_plan_of_history_weeks_gives_the_in_sample_fit(small_run, tmp_path):
    run, tmp = small_run
    kind = get_kind("mmm")
    data = pd.read_parquet(tmp / "sim" / "data")
    full = tmp_path / "full"
    kind.predict(run, str(tmp / "sim" / "data"), full)
    last = sorted(data["week"].unique())[-10:]
    plan = data[data["week"].isin(last)].drop(columns=["kpi"])
    folder = tmp_path / "plan"
    folder.mkdir()
    plan.to_parquet(folder / "part-0.parquet", index=False)
    info = kind.predict(run, str(folder), tmp_path / "pred")
    got = pd.read_parquet(tmp_path / "pred").set_index(["region", "week"]).sort_index()
    assert info["rows"] == len(got) == 40 * 10
    assert not got["future"].any()
    want = pd.read_parquet(full).set_index(["region", "week"]).loc[got.index]
    for col in ["prediction", "baseline", "trend", "seasonality", "price", *CHANNELS3]:
        np.testing.assert_allclose(got[col], want[col], rtol=1e-9, atol=1e-9, err_msg=col)
    assert got["holdout"].equals(want["holdout"])


def test_predict_future_weeks_without_media_shows_decaying_carry_over(small_run, tmp_path):
    run, tmp = small_run
    data = pd.read_parquet(tmp / "sim" / "data")
    last_week = pd.Timestamp(max(data["week"]))
    tail = data[data["week"] == max(data["week"])]
    weeks = [str((last_week + pd.Timedelta(weeks=i)).date()) for i in range(1, 17)]
    plan = pd.concat([tail.assign(week=w) for w in weeks], ignore_index=True)
    plan[CHANNELS3] = 0.0
    folder = tmp_path / "plan"
    folder.mkdir()
    plan.drop(columns=["kpi"]).to_parquet(folder / "part-0.parquet", index=False)
    get_kind("mmm").predict(run, str(folder), tmp_path / "pred")
    got = pd.read_parquet(tmp_path / "pred")
    assert got["future"].all() and sorted(got["week"].unique()) == weeks
    by_week = got.groupby("week")[CHANNELS3].sum().loc[weeks]
    max_lag = json.loads((run / "model" / "bundle.json").read_text())["config"]["plugin"]
    max_lag = max_lag["model"]["max_lag"]
    for c in CHANNELS3:
        v = by_week[c].to_numpy()
        assert v[0] > 0, f"{c}: carry-over from the history into the first plan week"
        assert np.all(np.diff(v[: max_lag - 1]) <= 0.02 * v[0]), (c, v)
        assert v[max_lag - 2] < 0.2 * v[0], (c, v)
        assert np.all(v[max_lag - 1 :] == 0.0), f"{c}: no carry-over beyond max_lag weeks"
    parts = ["baseline", "trend", "seasonality", "price", "promo", *CHANNELS3]
    np.testing.assert_allclose(got[parts].sum(axis=1), got["prediction"], rtol=SUM_REL)


def test_predict_refuses_a_plan_it_cannot_carry_on(small_run, tmp_path):
    run, tmp = small_run
    data = pd.read_parquet(tmp / "sim" / "data")
    weeks = sorted(data["week"].unique())
    kind = get_kind("mmm")
    gap = data[data["week"].isin(weeks[-5:]) & (data["week"] != weeks[-3])]
    late = data[data["week"] == weeks[-1]].assign(
        week=str((pd.Timestamp(weeks[-1]) + pd.Timedelta(weeks=3)).date())
    )
    for name, frame, msg in (
        ("gap", gap, "exactly one row for every week"),
        ("late", late, "starts within the history or the week after it"),
        ("neg", data.assign(tv=-1.0), "negative activity"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        frame.to_parquet(folder / "part-0.parquet", index=False)
        with pytest.raises(DataError, match=msg):
            kind.predict(run, str(folder), tmp_path / f"out-{name}")
        assert not (tmp_path / f"out-{name}").exists()


def test_warm_start_keeps_the_source_scalers_and_weights(small_run, tmp_path):
    """A refresh on fewer weeks and a subset of regions: the known regions keep the
    source's scalers and baselines, every other weight is the source's."""
    from distributed_hte.kinds.mmm import MmmKind
    from distributed_hte.kinds.toolkit import load_bundle

    run, tmp = small_run
    data = pd.read_parquet(tmp / "sim" / "data")
    weeks = sorted(data["week"].unique())[:60]
    regions = sorted(data["region"].unique())[5:25]
    folder = tmp_path / "refresh"
    folder.mkdir()
    sub = data[data["week"].isin(weeks) & data["region"].isin(regions)]
    sub.to_parquet(folder / "part-0.parquet", index=False)
    spec = validate_spec(
        {
            "name": "refresh",
            "kind": "mmm",
            "data": {
                "path": str(folder),
                "media": CHANNELS3,
                "spend": {c: f"{c}_spend" for c in CHANNELS3},
                "controls": ["price", "promo"],
            },
            "outputs": {"dir": str(tmp_path)},
        }
    )
    kind = MmmKind()
    assert "scalers" in kind.warm_start
    prepared = kind.prepare(spec)
    fresh = prepared.scalers.kpi_scale.copy()
    source = load_bundle(run, "mmm")
    state = kind.warm_start_state(spec, prepared, source)
    with np.load(source.path("scalers")) as z:
        old_kpi, old_media, old_mean = z["kpi_scale"], z["media_scale"], z["control_mean"]
    at = [source.config["regions"].index(r) for r in prepared.panel.regions]
    np.testing.assert_array_equal(prepared.scalers.kpi_scale, old_kpi[at])
    np.testing.assert_array_equal(prepared.scalers.media_scale, old_media[at])
    np.testing.assert_array_equal(prepared.scalers.control_mean, old_mean)
    assert not np.allclose(fresh, old_kpi[at]), "the refresh's own scalers differ"
    src = source.state_dict()
    torch.testing.assert_close(state["baseline.weight"], src["baseline.weight"][at])
    for k, v in src.items():
        if k != "baseline.weight":
            torch.testing.assert_close(state[k], v)
    # A different first week, or other channels, cannot warm start.
    late = tmp_path / "late"
    late.mkdir()
    data[data["week"].isin(weeks[2:])].to_parquet(late / "part-0.parquet", index=False)
    spec_late = validate_spec(
        {**spec.to_dict(), "data": {**spec.to_dict()["data"], "path": str(late)}}
    )
    with pytest.raises(DataError, match="start at"):
        kind.warm_start_state(spec_late, kind.prepare(spec_late), source)


def test_budget_meets_its_constraints(small_run):
    run, _ = small_run
    b = json.loads((run / "budget.json").read_text())
    alloc = b["allocation"]
    assert b["constraints_met"]
    assert math.isclose(sum(alloc.values()), 200_000, rel_tol=1e-6)
    assert 20_000 - 1e-3 <= alloc["tv"] <= 90_000 + 1e-3
    assert all(v >= 0 for v in alloc.values())
    assert b["predicted_kpi"] >= b["current_kpi"]
    assert b["truth"]["true_kpi_of_allocation"] >= b["truth"]["true_kpi_of_current"] * 0.99


def test_evaluate_uses_the_bundles_scalers(small_run):
    from distributed_hte.kinds.toolkit import load_bundle

    run, tmp = small_run
    scores = get_kind("mmm").evaluate(load_bundle(run, "mmm"), str(tmp / "sim" / "data"))
    m = json.loads((run / "metrics.json").read_text())
    assert math.isclose(scores["holdout_rmse"], m["holdout"]["rmse"], rel_tol=1e-9)
    assert math.isclose(scores["train_r2"], m["train"]["r2"], rel_tol=1e-9)
    assert scores["r2"] == scores["holdout_r2"], "unprefixed figures are the holdout's"


def test_one_and_two_workers_give_the_same_fit(small_run, tmp_path):
    """The same spec on 1 worker: ``train.batch_size`` is the global batch, so the steps,
    batches and LR schedule are those of the 2-worker fit; only the shuffles differ."""
    run2, tmp = small_run
    raw = _small_raw(tmp)
    raw.update(name="mmm-small-1w", scaling={"num_workers": 1}, uncertainty=None)
    raw["outputs"] = {"dir": str(tmp_path)}
    run1 = run_job(validate_spec(raw))
    m1, m2 = (json.loads((r / "metrics.json").read_text()) for r in (run1, run2))
    assert m1["training"]["num_workers"] == 1 and m2["training"]["num_workers"] == 2
    assert m1["training"]["epochs_run"] == m2["training"]["epochs_run"]
    c1, c2 = (pd.read_csv(r / "channels.csv").set_index("channel") for r in (run1, run2))
    np.testing.assert_allclose(c1["roi"], c2["roi"], rtol=WORKERS_ROI_REL)
    assert np.abs(c1["share"] - c2["share"]).max() * 100 < WORKERS_SHARE_PP
    assert math.isclose(m1["holdout"]["rmse"], m2["holdout"]["rmse"], rel_tol=WORKERS_RMSE_REL)


def test_intervals_bracket_the_estimate_and_are_reproducible(small_run):
    from distributed_hte.kinds.mmm.replicas import bootstrap_regions

    run, _ = small_run
    ch = pd.read_csv(run / "channels.csv")
    assert ch.equals(pd.read_parquet(run / "channels.parquet").astype(ch.dtypes.to_dict()))
    reps = pd.read_parquet(run / "replicas.parquet")
    assert sorted(reps["replica"].unique()) == list(range(REPLICAS))
    for stat in ("roi", "share", "contribution"):
        low, high, est = ch[f"{stat}_low"], ch[f"{stat}_high"], ch[stat]
        assert np.all(low <= high), stat
        assert np.all(high > low), f"{stat}: the replicas differ"
        # Sensible: the point estimate lies within the interval widened by its own width
        # and by the fit's optimisation noise (a percentile interval of a few replicas
        # need not contain it; 1 vs 2 workers move ROIs by up to 0.3 %), and the interval
        # is narrow next to the estimate.
        width = high - low
        slack = width + OPT_NOISE_REL * est.abs()
        assert np.all((est >= low - slack) & (est <= high + slack)), (stat, ch)
        assert np.all(width < 0.5 * est.abs()), (stat, ch)
    # Each interval is the 5-95 % range of the replicas' values.
    wide = reps.pivot(index="replica", columns="channel", values="roi")
    for row in ch.itertuples():
        v = wide[row.channel].to_numpy()
        assert math.isclose(row.roi_low, np.quantile(v, 0.05), rel_tol=1e-9)
        assert math.isclose(row.roi_high, np.quantile(v, 0.95), rel_tol=1e-9)
    # The resampling is a function of the seed (the fit of a given sample is reproducible:
    # train.reproducible; test_a_replica_fitted_again_is_the_same_fit, slow, checks it).
    np.testing.assert_array_equal(bootstrap_regions(40, 3, 1), bootstrap_regions(40, 3, 1))
    assert not np.array_equal(bootstrap_regions(40, 3, 1), bootstrap_regions(40, 4, 1))
    assert not np.array_equal(bootstrap_regions(40, 3, 0), bootstrap_regions(40, 3, 1))


@pytest.mark.slow
def test_a_replica_fitted_again_is_the_same_fit(small_run, tmp_path):
    from distributed_hte.kinds.mmm import MmmKind
    from distributed_hte.kinds.mmm.plugin import MmmPlugin
    from distributed_hte.kinds.mmm.replicas import (
        _fit_one,
        bootstrap_regions,
        replica_rows,
        replica_spec,
    )

    run, _ = small_run
    spec = validate_spec(yaml.safe_load((run / "spec.yaml").read_text()))
    kind = MmmKind()
    prepared = kind.prepare(spec)
    plugin = MmmPlugin(kind.model_config(spec, prepared))
    rows = replica_rows(prepared, bootstrap_regions(40, 3, 1))
    again = Path(_fit_one(replica_spec(spec, 1), plugin, rows, str(tmp_path / "r1")))
    state = torch.load(again, weights_only=True)
    first = torch.load(run / "replicas" / "r001" / "model" / "best_model.pt", weights_only=True)
    for k, v in first.items():
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- slow: targets


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.2, 0.4, 0.6])
def test_recovery_targets_200_regions(share, ray_session, tmp_path):
    """Issue 11's targets on 200 regions × 104 weeks × 6 channels (figures in benchmarks/)."""
    raw = {
        "name": f"mmm-recovery-{int(share * 100)}",
        "kind": "mmm",
        "simulate": {
            "n_regions": 200,
            "n_weeks": 104,
            "n_channels": 6,
            "media_share": share,
            "seed": 0,
            "out": str(tmp_path / "sim"),
        },  # fmt: skip
        "optimize": {"budget": 2_000_000, "weeks": 13},
        "scaling": {"num_workers": 2},
        "outputs": {"dir": str(tmp_path / "runs")},
    }
    run = run_job(validate_spec(raw))
    m = json.loads((Path(run) / "metrics.json").read_text())
    out = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / f"mmm_recovery_{int(share * 100)}.json").write_text(json.dumps(m, indent=1))
    h, t = m["holdout"], m["truth"]
    assert h["rmse"] <= 1.10 * h["true_model"]["rmse"]
    assert h["rmse"] < min(h["naive_region_mean"]["rmse"], h["naive_last_8_weeks"]["rmse"])
    assert t["max_abs_share_error_pp"] <= 3.0
    assert t["max_abs_roi_rel_error"] <= 0.15
    assert t["roi_rank_correct"]
    assert abs(m["media_share"] - share) < 0.05
    assert m["budget"]["constraints_met"] and m["budget"]["share_of_true_gain"] >= 0.8


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="percentile intervals of region-bootstrap replicas covered 6 of 12 channel x "
    "seed pairs (4 seeds, benchmarks/README.md): they show sampling spread, not the fit's "
    "bias; a bias-corrected interval is still to build (issue 11)",
)
def test_interval_coverage_study(tmp_path):
    """Issue 11: over ≥ 10 seeds the 90 % ROI intervals cover the truth for 80-98 % of
    channel × seed pairs (benchmarks/bench_mmm_coverage.py at its default size; the
    recorded result is in benchmarks/README.md)."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "coverage.json"
    subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "bench_mmm_coverage.py"), "--seeds", "10",
         "--out", str(out)],
        check=True, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    summary = json.loads(out.read_text())["summary"]
    assert summary["seeds_done"] == 10
    assert 0.80 <= summary["coverage"] <= 0.98, summary
