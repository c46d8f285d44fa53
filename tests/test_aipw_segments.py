"""Kind ``aipw_segments``: the maths against references, and runs on a real Ray.

Tolerances (named here, as pyfixest's tests do):

* ``SKLEARN_COEF_TOL``: our Newton logistic/ridge fit vs sklearn at tight tolerance.
* ``DOUBLEML_TOL``: our global and segment estimates vs DoubleML ``DoubleMLIRM`` fitted
  with our nuisance predictions and ``gate()`` (the issue's 1e-8).
* ``DOUBLEML_OWN_SE``: vs DoubleML fitting its own logistic nuisances on our folds,
  in units of our SE (the issue's 0.1).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distributed_hte.data.schema import open_dataset
from distributed_hte.estimators import aipw as est
from distributed_hte.estimators.crossfit import (
    assign_stratified_folds,
    hash_unit,
    stratified_cuts,
    unit_histogram,
)
from distributed_hte.kinds.aipw_segments import fit_encoders
from distributed_hte.kinds.aipw_segments.plugin import Design, SegmentRule, fold_stats_block

SKLEARN_COEF_TOL = 1e-6
DOUBLEML_TOL = 1e-8
DOUBLEML_OWN_SE = 0.1
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- pure maths


def _newton(x, y, C, link, tol=1e-12):
    beta = np.zeros(x.shape[1] + 1)
    for _ in range(100):
        s = est.glm_sums(x, y, beta, link)
        step, _ = est.penalised_newton_step(s, beta, C)
        beta = beta + step
        if np.max(np.abs(step)) < tol:
            break
    return beta


@pytest.mark.parametrize("C", [0.05, 1.0])
def test_newton_logistic_equals_sklearn(C):
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 6))
    x[:, 5] = (rng.random(3000) < 0.1).astype(float)  # a sparse dummy
    p = 1 / (1 + np.exp(-(x @ np.array([0.5, -1, 0.2, 0, 0.3, 1.0]) - 2)))
    y = (rng.random(3000) < p).astype(float)
    ours = _newton(x, y, C, "logit")
    ref = LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(ours[:-1], ref.coef_[0], atol=SKLEARN_COEF_TOL)
    np.testing.assert_allclose(ours[-1], ref.intercept_[0], atol=SKLEARN_COEF_TOL)


def test_newton_identity_link_equals_sklearn_ridge():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 4))
    y = x @ np.array([1.0, -2.0, 0.0, 0.5]) + 3 + rng.normal(size=500)
    ours = _newton(x, y, 0.2, "identity")
    ref = Ridge(alpha=1 / 0.2).fit(x, y)
    np.testing.assert_allclose(ours[:-1], ref.coef_, atol=SKLEARN_COEF_TOL)
    np.testing.assert_allclose(ours[-1], ref.intercept_, atol=SKLEARN_COEF_TOL)


def _design(numeric, categorical, folds=3) -> Design:
    return Design(
        key="id", treatment="t", outcome="y", numeric=numeric, categorical=categorical,
        n_folds=folds, fold_salt=0, fold_cuts=None, fold_column="fold", encoders=[],
        outcome_model="pooled", link="logit",
    )  # fmt: skip


def test_fold_preprocessing_equals_the_notebook_sklearn_pipeline():
    """Fold k's design from streamed sums = sklearn's ColumnTransformer fitted on the other folds."""
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    rng = np.random.default_rng(2)
    n = 3001
    df = pd.DataFrame(
        {
            "id": np.arange(n),
            "t": (rng.random(n) < 0.2).astype(int),
            "y": (rng.random(n) < 0.1).astype(int),
            # the median (7) does not depend on whether a fold's count is even
            "a": rng.choice([3.0, 7.0, 9.0, 30.0], n, p=[0.2, 0.5, 0.2, 0.1]),
            "b": rng.integers(-5, 500, n).astype(float),
            "cat": rng.choice(["x", "y", "z", "rare1", "rare2"], n, p=[0.5, 0.3, 0.18, 0.01, 0.01]),
            "fold": rng.integers(0, 3, n),
        }
    )
    df.loc[rng.random(n) < 0.1, "a"] = np.nan
    df["cat"] = df["cat"].astype(object)
    df.loc[rng.random(n) < 0.05, "cat"] = np.nan  # sklearn's imputer takes NaN, not None
    design = _design(["a", "b"], ["cat"])
    batch = {c: df[c].to_numpy() for c in df}
    lo = np.array([np.nanmin(df.a), df.b.min()])
    hi = np.array([np.nanmax(df.a), df.b.max()])
    halves = [
        {k: v[: n // 2] for k, v in batch.items()},
        {k: v[n // 2 :] for k, v in batch.items()},
    ]
    from distributed_hte.kinds.aipw_segments.plugin import merge_pickled

    # two blocks' pickled summaries, merged as the kind merges a pass's rows
    rows = [{"stats": fold_stats_block(h, design, lo, hi)["stats"][0]} for h in halves]
    stats = merge_pickled(rows, "stats")
    encoders = fit_encoders(stats, lo, hi, min_frequency=50, n_folds=3)
    design.encoders = encoders
    blk = design.raw(batch)
    for k in range(3):
        train = df[df.fold != k]
        pipe = ColumnTransformer(
            [
                ("num", Pipeline([("imp", SimpleImputer(strategy="median")), ("sc", StandardScaler())]), ["a", "b"]),
                ("cat", Pipeline([
                    ("imp", SimpleImputer(strategy="most_frequent")),
                    ("oh", OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=50, sparse_output=False)),
                ]), ["cat"]),
            ]
        ).fit(train[["a", "b", "cat"]])  # fmt: skip
        ref = pipe.transform(df[["a", "b", "cat"]])
        ours = encoders[k].propensity_design(blk.num, blk.cats)
        np.testing.assert_allclose(ours, ref, atol=1e-10)


def test_joint_critical_value_is_the_multiplier_bootstrap_quantile():
    rng = np.random.default_rng(3)
    for g in (1, 4, 12):
        draws = np.abs(rng.standard_normal((200_000, g))).max(axis=1)
        assert est.joint_critical_value(g, 0.95) == pytest.approx(
            np.quantile(draws, 0.95), abs=0.02
        )
    assert est.joint_critical_value(1, 0.95) == pytest.approx(1.959964, abs=1e-6)


def test_the_events_filter_uses_the_expected_count_of_the_rarer_outcome_in_each_arm():
    """Three segments of 2,000 rows (200 treated): few expected treated clicks (Σ μ̂1 = 10),
    enough (40), and treated outcomes that are nearly all clicks (Σ μ̂1 = 195: the rarer
    value is the non-click, 5 expected). Only the second passes min_treated_events=25."""
    from distributed_hte.kinds.aipw_segments.plugin import STATS
    from distributed_hte.kinds.aipw_segments.report import segment_tables

    S = {name: i for i, name in enumerate(STATS)}
    rng = np.random.default_rng(3)
    sums = np.zeros((4, len(STATS)))  # 3 segments + the "outside" row
    for j, ev_t in enumerate([10.0, 40.0, 195.0]):
        psi = rng.normal(0.02, 0.5, 2000)
        sums[j, S["n"]], sums[j, S["n_t"]] = 2000, 200
        sums[j, S["sy_t"]], sums[j, S["sy_c"]] = ev_t, 90
        sums[j, S["spsi"]], sums[j, S["spsi2"]] = psi.sum(), (psi**2).sum()
        sums[j, S["spsi3"]] = (psi**3).sum()
        sums[j, S["ev_t"]], sums[j, S["ev_c"]] = ev_t, 90.0
    rule = SegmentRule(
        "x", "values", ("few", "enough", "mostly clicks"), levels=("a", "b", "c"),
        min_rows=100, min_treated=50, min_control=500, min_treated_events=25,
        min_control_events=25,
    )  # fmt: skip
    table, filtered, per = segment_tables([rule], {"x": sums}, 0.95)
    assert table.segment.tolist() == ["enough"]
    assert table.expected_treated_events.tolist() == [40.0]
    assert per["x"]["segments"] == 1 and per["x"]["filtered_out"] == 2
    why = filtered.set_index("segment").reason
    assert why["few"] == "expected treated events 10.0 < 25"
    assert why["mostly clicks"] == "expected treated events 5.0 < 25"
    # the control arm has its own limit; 0 turns both off (continuous outcomes)
    table, filtered, _ = segment_tables(
        [replace(rule, min_treated_events=0, min_control_events=100)], {"x": sums}, 0.95
    )
    assert table.empty and filtered.reason.str.contains("expected control events 90.0 < 100").all()
    table, _, _ = segment_tables(
        [replace(rule, min_treated_events=0, min_control_events=0)], {"x": sums}, 0.95
    )
    assert len(table) == 3
    # a continuous outcome: score_block leaves the expected events NaN, which filter nothing
    sums[:, S["ev_t"]] = sums[:, S["ev_c"]] = np.nan
    table, filtered, _ = segment_tables([rule], {"x": sums}, 0.95)
    assert len(table) == 3 and filtered.empty and table.expected_treated_events.isna().all()


def test_skewness_from_sums_and_the_skew_corrected_joint_band():
    rng = np.random.default_rng(4)
    x = rng.exponential(size=5_000) ** 2  # strongly right-skewed, as ψ with rare events
    n, s, ss, s3 = len(x), x.sum(), (x**2).sum(), (x**3).sum()
    gamma = est.skewness(np.array([n]), np.array([s]), np.array([ss]), np.array([s3]))[0]
    assert gamma == pytest.approx(np.mean((x - x.mean()) ** 3) / x.std(ddof=1) ** 3, rel=1e-9)
    theta, se = np.array([x.mean()]), np.array([x.std(ddof=1) / np.sqrt(n)])
    lo, hi = est.skew_corrected_band(theta, se, np.array([n]), np.array([gamma]), 2.5)
    # Hall's g at the band's ends is ∓crit: the band inverts the transformation.
    c, shift = gamma / (3 * np.sqrt(n)), gamma / (6 * np.sqrt(n))
    for end, target in ((lo, 2.5), (hi, -2.5)):
        t = (theta - end) / se
        assert t + c * t**2 + c**2 * t**3 / 3 + shift == pytest.approx(target, abs=1e-9)
    # Right skew: longer above the estimate than below; no skew: θ ± crit·se.
    assert (hi - theta)[0] > (theta - lo)[0]
    lo0, hi0 = est.skew_corrected_band(theta, se, np.array([n]), np.array([0.0]), 2.5)
    np.testing.assert_allclose([lo0[0], hi0[0]], [theta[0] - 2.5 * se[0], theta[0] + 2.5 * se[0]])


def test_adjusted_p_values_equal_statsmodels():
    from statsmodels.stats.multitest import multipletests

    p = np.array([0.001, 0.04, 0.03, 0.2, 0.5, 0.012])
    np.testing.assert_allclose(est.holm(p), multipletests(p, method="holm")[1], atol=1e-12)
    np.testing.assert_allclose(
        est.benjamini_hochberg(p), multipletests(p, method="fdr_bh")[1], atol=1e-12
    )


def test_binned_auc_and_ap_are_close_to_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(4)
    s = rng.beta(1, 12, 50_000)
    y = (rng.random(50_000) < s * 2).astype(int)
    b = np.minimum((s * 2000).astype(int), 1999)
    pos = np.bincount(b[y == 1], minlength=2000)
    neg = np.bincount(b[y == 0], minlength=2000)
    auc, ap = est.binned_auc_ap(pos, neg)
    assert auc == pytest.approx(roc_auc_score(y, s), abs=2e-3)
    assert ap == pytest.approx(average_precision_score(y, s), abs=5e-3)


def test_quantile_cuts_send_ties_to_the_lower_bin():
    x = np.array([0, 0, 0, 0, 1, 2, 3, 4, 5, 22, 22, 22, 30, 40])
    values, counts = np.unique(x, return_counts=True)
    cuts = est.quantile_cuts(values, counts, 4)
    rule = SegmentRule("x", "quantiles", ("a", "b", "c", "d")[: len(cuts) + 1], edges=tuple(cuts))
    codes = rule.codes(x)
    # every cut is an empirical quantile: at least j/q of the rows lie at or below cut j
    for j, c in enumerate(cuts, start=1):
        assert (x <= c).mean() >= j / 4 and (x < c).mean() < j / 4
    assert (codes[x == 22] == codes[np.flatnonzero(x == 22)[0]]).all()
    assert codes.min() == 0 and (np.diff(codes[np.argsort(x, kind="stable")]) >= 0).all()


def test_stratified_folds_balance_each_arm_and_ignore_row_order():
    rng = np.random.default_rng(5)
    n = 60_000
    keys = {"k": rng.permutation(n).astype(np.int64)}
    t = (rng.random(n) < 0.08).astype(np.int64)
    unit = hash_unit(keys, ["k"], 0)
    cuts = stratified_cuts(unit_histogram(unit, t, 2), 3)
    fold = assign_stratified_folds(keys, ["k"], t, cuts, 0)
    for arm in (0, 1):
        shares = np.bincount(fold[t == arm], minlength=3) / (t == arm).sum()
        np.testing.assert_allclose(shares, 1 / 3, atol=2e-3)
    perm = rng.permutation(n)
    again = assign_stratified_folds({"k": keys["k"][perm]}, ["k"], t[perm], cuts, 0)
    np.testing.assert_array_equal(again, fold[perm])


# ----------------------------------------------------------------------------- on Ray


def _user_layout(sim: Path, root: Path) -> Path:
    """The simulated impressions as a warehouse exports them: date partitions, string keys,
    a _SUCCESS marker, a README and a colleague's CSV in the folder."""
    df = pq.read_table(sim / "data").to_pandas()
    df["impression_id"] = "imp-" + df["impression_id"].astype(str)
    df["date"] = np.where(np.arange(len(df)) % 3 == 0, "2026-11-01", "2026-11-02")
    data = root / "export"
    for date, part in df.groupby("date"):
        folder = data / f"date={date}"
        folder.mkdir(parents=True)
        part = part.drop(columns="date")
        half = len(part) // 2
        for i, chunk in enumerate([part.iloc[:half], part.iloc[half:]]):
            pq.write_table(
                pa.Table.from_pandas(chunk, preserve_index=False), folder / f"part-{i}.parquet"
            )
    (data / "_SUCCESS").write_text("")
    (data / "README.txt").write_text("exported by the warehouse")
    (data / "notes.csv").write_text("a,b\n1,2\n")
    shutil.copy(sim / "truth.json", root / "their_truth.json")
    return data


SEGMENTS = [
    {"column": "category"},
    {"column": "history_len", "bins": [-1, 0, 10, 30, 100, float("inf")],
     "labels": ["0", "1-10", "11-30", "31-100", "101+"], "min_rows": 1000},
    {"column": "item_exposures", "quantiles": 4},
]  # fmt: skip


@pytest.fixture(scope="module")
def fitted(ray_session, tmp_path_factory):
    """One run on 40k simulated impressions in a user's layout (by_arm outcome models,
    DoubleML IRM's), truth named by the spec."""
    from distributed_hte.runner import run_job
    from distributed_hte.simulate.aipw_segments import AipwSimConfig, simulate_aipw_segments
    from distributed_hte.spec import validate_spec

    tmp = tmp_path_factory.mktemp("aipw")
    simulate_aipw_segments(
        AipwSimConfig(n_rows=40_000, seed=11, chunk_rows=20_000, truth_rows=20_000),
        tmp / "sim",
        progress=False,
    )
    data = _user_layout(tmp / "sim", tmp)
    raw = {
        "name": "aipw-test",
        "kind": "aipw_segments",
        "data": {
            "path": str(data),
            "numeric_features": ["history_len", "candidate_set_size", "log_item_exposures", "hour"],
            "categorical_features": ["category", "subcategory"],
            "tau_true": "tau_true",
            "truth": str(tmp / "their_truth.json"),
        },
        "segments": SEGMENTS,
        # no events filter: the DoubleML gate() test compares all 8 categories, and the
        # run's quartiles must all be reported (the filter: its own test above)
        "estimate": {
            "min_rows": 500,
            "min_treated": 30,
            "min_control": 300,
            "min_treated_events": 0,
            "min_control_events": 0,
        },
        "nuisance": {"outcome_model": "by_arm", "C": 1.0},
        "scaling": {"num_workers": 2},
        "outputs": {"dir": str(tmp / "runs"), "scores": True},
    }
    run = run_job(validate_spec(raw))
    return run, data, raw


def test_run_writes_the_issue_outputs(fitted):
    run, data, _ = fitted
    effects = json.loads((run / "effects.json").read_text())
    assert set(effects["global"]) >= {
        "estimate",
        "se",
        "ci_lower",
        "ci_upper",
        "rows",
        "treated_rows",
    }
    assert effects["global"]["rows"] == 40_000
    table = pd.read_csv(run / "segment_effects.csv")
    assert list(table.columns[:12]) == [
        "segment_col", "segment", "rows", "treated_rows", "control_rows", "treated_rate",
        "control_rate", "naive_lift", "dr_lift", "standard_error", "ci_lower", "ci_upper",
    ]  # fmt: skip
    assert set(table.segment_col) == {"category", "history_len", "item_exposures"}
    q = table[table.segment_col == "item_exposures"]
    assert q.segment.str.match(r"^Q\d \[\d+, \d+\]$").all() and len(q) == 4
    assert (table.ci_joint_upper - table.ci_joint_lower > table.ci_upper - table.ci_lower).all()
    filtered = pd.read_csv(run / "segments_filtered.csv")
    assert "0" in set(filtered[filtered.segment_col == "history_len"].segment.astype(str))
    assert filtered.reason.str.len().gt(0).all()
    metrics = pd.read_csv(run / "nuisance_metrics.csv")
    assert len(metrics) == 6 and metrics.roc_auc.between(0.55, 1).all()
    for name in ("forest_category.png", "naive_vs_dr.png", "propensity_overlap.png"):
        assert (run / "plots" / name).exists()
    scores = pq.read_table(run / "scores.parquet").to_pandas()
    assert len(scores) == 40_000 and scores.impression_id.str.startswith("imp-").all()
    # predict scores other data with the same models: the same per-row scores here
    from distributed_hte.kinds import get_kind

    info = get_kind("aipw_segments").predict(run, str(data), run.parent / "predicted")
    again = pq.read_table(run.parent / "predicted").to_pandas()
    assert info["rows"] == 40_000
    merged = scores.merge(again, on="impression_id", suffixes=("", "_p"))
    np.testing.assert_allclose(merged.score, merged.score_p, rtol=0, atol=1e-12)


def test_estimates_recover_the_truth(fitted):
    run, _, _ = fitted
    effects = json.loads((run / "effects.json").read_text())
    truth = effects["truth"]
    g = effects["global"]
    assert abs(g["estimate"] - truth["sample_ate"]) < 3.5 * g["se"]
    assert abs(truth["population_ate"] - truth["sample_ate"]) < 0.003
    table = pd.read_csv(run / "segment_effects.csv")
    z = (table.dr_lift - table.true_effect) / table.standard_error
    assert z.abs().max() < 3.5, table[["segment", "dr_lift", "true_effect", "standard_error"]]
    # the naive lift is confounded by popularity: far from the truth, the DR estimate is not
    naive = effects["naive"]
    assert (naive["estimate"] - truth["sample_ate"]) / naive["se"] > 3


def test_equals_doubleml_irm_and_gate_with_our_predictions(fitted):
    import doubleml as dml
    from sklearn.linear_model import LogisticRegression

    run, data, _ = fitted
    scores = pq.read_table(run / "scores.parquet").to_pandas()
    df = (
        open_dataset(str(data))
        .to_table(columns=["impression_id", "is_top_3", "clicked", "category", "hour"])
        .to_pandas()
    )
    df = df.merge(scores, on="impression_id")
    obj = dml.DoubleMLData(df, y_col="clicked", d_cols="is_top_3", x_cols=["hour"])
    irm = dml.DoubleMLIRM(
        obj, LogisticRegression(), LogisticRegression(), n_folds=3, draw_sample_splitting=False
    )
    folds = df["fold"].to_numpy()
    idx = np.arange(len(df))
    irm.set_sample_splitting([[(idx[folds != k], idx[folds == k]) for k in range(3)]])
    col = lambda c: df[c].to_numpy()[:, None]  # noqa: E731
    irm.fit(
        external_predictions={
            "is_top_3": {"ml_g0": col("mu0_hat"), "ml_g1": col("mu1_hat"), "ml_m": col("e_hat")}
        }
    )
    effects = json.loads((run / "effects.json").read_text())["global"]
    n = len(df)
    assert irm.coef[0] == pytest.approx(effects["estimate"], abs=DOUBLEML_TOL)
    # DoubleML divides by n, we (and the notebook) by n - 1
    assert irm.se[0] == pytest.approx(effects["se"] * np.sqrt((n - 1) / n), rel=1e-6)
    gate = irm.gate(groups=df[["category"]].astype(str))
    ci = gate.confint(level=0.95)
    table = pd.read_csv(run / "segment_effects.csv")
    cat = table[table.segment_col == "category"].set_index("segment")
    for name, row in cat.iterrows():
        assert ci.loc[f"Group_{name}", "effect"] == pytest.approx(row.dr_lift, abs=DOUBLEML_TOL)
    se = gate.blp_model[0].bse.rename(lambda s: s.replace("Group_", ""))
    for name, row in cat.iterrows():
        assert se[name] == pytest.approx(
            row.standard_error * np.sqrt((row.rows - 1) / row.rows), rel=1e-6
        )
    # joint band: DoubleML's bootstrap critical value vs our closed form (Monte Carlo
    # error); our band applies it to the skewness-corrected studentized mean.
    np.random.seed(0)
    joint = gate.confint(level=0.95, joint=True, n_rep_boot=20_000)
    half = ((joint["97.5 %"] - joint["2.5 %"]) / 2).rename(lambda s: s.replace("Group_", ""))
    crit = est.joint_critical_value(len(cat), 0.95)
    np.testing.assert_allclose(half[cat.index] / se[cat.index] / crit, 1, atol=0.02)
    lower, upper = est.skew_corrected_band(
        cat.dr_lift.to_numpy(), cat.standard_error.to_numpy(), cat.rows.to_numpy(),
        cat.skewness.to_numpy(), crit,
    )  # fmt: skip
    np.testing.assert_allclose(cat.ci_joint_lower, lower, rtol=1e-12)
    np.testing.assert_allclose(cat.ci_joint_upper, upper, rtol=1e-12)


@pytest.mark.slow  # six sklearn pipeline fits on 40k rows: about 30 s on a loaded machine
def test_close_to_doubleml_with_its_own_logistic_nuisances_on_our_folds(fitted):
    """DoubleML fits sklearn pipelines (the notebook's preprocessing) on our folds; its
    g0/g1 are fitted per arm, as our ``by_arm`` outcome models."""
    import doubleml as dml
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    run, data, raw = fitted
    numeric = raw["data"]["numeric_features"]
    cats = raw["data"]["categorical_features"]
    scores = pq.read_table(run / "scores.parquet").to_pandas()
    df = open_dataset(str(data)).to_table().to_pandas()
    df = df.merge(scores[["impression_id", "fold"]], on="impression_id")
    for c in cats:  # DoubleMLData wants numbers: codes, one-hot encoded by the pipeline
        df[c] = df[c].astype("category").cat.codes
    pre = ColumnTransformer(
        [("num", StandardScaler(), list(range(len(numeric)))),
         ("cat", OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=50), list(range(len(numeric), len(numeric) + len(cats))))]
    )  # fmt: skip
    learner = make_pipeline(pre, LogisticRegression(C=1.0, max_iter=2000, tol=1e-8))
    obj = dml.DoubleMLData(df, y_col="clicked", d_cols="is_top_3", x_cols=numeric + cats)
    irm = dml.DoubleMLIRM(obj, learner, learner, n_folds=3, draw_sample_splitting=False)
    folds = df["fold"].to_numpy()
    idx = np.arange(len(df))
    irm.set_sample_splitting([[(idx[folds != k], idx[folds == k]) for k in range(3)]])
    irm.fit()
    ours = json.loads((run / "effects.json").read_text())["global"]
    assert abs(irm.coef[0] - ours["estimate"]) < DOUBLEML_OWN_SE * ours["se"]


def _bad(
    tmp: Path, df: pd.DataFrame, segments: list | None = None, **data_extra
) -> tuple[Path, Path]:
    folder = tmp / "bad"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    # from numpy arrays: a NaN stays a NaN (pandas would write a null)
    pq.write_table(pa.table({c: pa.array(df[c].to_numpy()) for c in df}), folder / "part-0.parquet")
    spec = {
        "name": "bad",
        "kind": "aipw_segments",
        "data": {"path": str(folder), "key": "id", "treatment": "t", "outcome": "y",
                 "numeric_features": ["x"], "categorical_features": ["c"], **data_extra},
        "segments": segments or [{"column": "x", "bins": [0, 1, 2]}],
        "outputs": {"dir": str(tmp / "runs")},
    }  # fmt: skip
    path = tmp / "bad.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path, tmp / "runs"


def _frame(n=400, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "id": np.arange(n),
            "t": (rng.random(n) < 0.3).astype(int),
            "y": (rng.random(n) < 0.2).astype(int),
            "x": rng.uniform(0.01, 2, n),
            "c": rng.choice(["a", "b"], n),
        }
    )


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing column", "no column 'c'"),
        ("empty", "empty"),
        ("treatment 2", "only 0 and 1"),
        ("outcome NaN", "NaN"),
        ("no treated", "no treated rows"),
        ("outside bins", "outside every bin"),
        ("segment column missing", "no column 'region'"),
        ("duplicate key", r"'id' \(named by data.key\) must identify rows.+13 \(2 rows\)"),
    ],
)
def test_bad_data_exits_2_and_writes_nothing(ray_session, tmp_path, case, match):
    """Metadata problems fail in ``dhte run`` before Ray starts (a subprocess: the CLI shuts
    Ray down on exit, which would take the session's Ray with it); value problems fail in
    the streamed checks of prepare. Either way: exit code 2, no run directory."""
    from distributed_hte.errors import DataError
    from distributed_hte.runner import run_job
    from distributed_hte.spec import load_spec

    df = _frame()
    if case == "missing column":
        df = df.drop(columns="c")
    elif case == "empty":
        df = df.iloc[:0]
    elif case == "treatment 2":
        df.loc[5, "t"] = 2
    elif case == "no treated":
        df["t"] = 0
    elif case == "outcome NaN":
        df["y"] = df["y"].astype(float)
        df.loc[7, "y"] = np.nan
    elif case == "outside bins":
        df.loc[3, "x"] = 2.5
    elif case == "duplicate key":
        df.loc[200, "id"] = 13
    segments = [{"column": "region"}] if case == "segment column missing" else None
    spec, runs = _bad(tmp_path, df, segments=segments)
    if case in ("missing column", "empty"):
        out = subprocess.run(
            [sys.executable, "-m", "distributed_hte.cli", "run", str(spec)],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr[-2000:]
        assert match in out.stderr, out.stderr[-2000:]
    else:
        with pytest.raises(DataError, match=match) as err:
            run_job(load_spec(spec))
        assert err.value.exit_code == 2
    assert not runs.exists()


def test_one_worker_fits_the_models_and_scores_of_two(fitted, tmp_path):
    """The fixture's job (2 Train workers, each holding its shard in memory) fitted again
    with 1 worker (the kind's prepare and its Ray Train fit; the report pass is left out):
    the same coefficients for every fold and role, hence, applied to the data by the
    kind's ``score_rows``, the same folds, ê, μ̂1, μ̂0 and scores as the fixture's
    ``scores.parquet``, row by row (the workers' sums are all-reduced: only the float
    summation order may differ)."""
    from distributed_hte.kinds import get_kind
    from distributed_hte.kinds.aipw_segments import load_model
    from distributed_hte.kinds.aipw_segments.plugin import score_rows
    from distributed_hte.kinds.toolkit import load_bundle
    from distributed_hte.rundir import RunDir
    from distributed_hte.spec import validate_spec

    run, data, raw = fitted
    kind = get_kind("aipw_segments")
    spec = validate_spec({**raw, "scaling": {"num_workers": 1}})
    one = RunDir(tmp_path / "one")
    one.path.mkdir()
    kind.fit(spec, kind.prepare(spec), one)
    bundle = load_bundle(one.path, kind.name, require_complete_run=False)  # fit only
    assert bundle.config["fit"]["num_workers"] == 1
    design, betas = load_model(bundle)
    _, betas_two = load_model(load_bundle(run, kind.name))
    assert set(betas) == set(betas_two) and len(betas) == 9  # 3 folds × (e, μ1, μ0)
    for key, beta in betas.items():
        np.testing.assert_allclose(beta, betas_two[key], rtol=0, atol=1e-10, err_msg=str(key))
    table = open_dataset(str(data)).to_table(columns=design.columns())
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    b = pd.DataFrame(score_rows(batch, design, betas, float(bundle.config["clip"])))
    a = pq.read_table(run / "scores.parquet").to_pandas()
    assert len(a) == len(b) == 40_000
    m = a.merge(b, on="impression_id", suffixes=("", "_one"), validate="one_to_one")
    np.testing.assert_array_equal(m.fold, m.fold_one)
    for c in ("e_hat", "mu1_hat", "mu0_hat", "score"):
        np.testing.assert_allclose(m[c], m[f"{c}_one"], rtol=0, atol=1e-9, err_msg=c)


# ----------------------------------------------------------------------------- slow tier


@pytest.mark.slow  # Ray Data's hash shuffle: tens of seconds even for a few rows
def test_a_repeated_key_is_found_by_the_distributed_check_too(ray_session, tmp_path):
    """Above ``KEY_CHECK_IN_DRIVER_ROWS`` the key check is a Ray Data groupby; the same
    answer as the driver's count (forced here on a small table)."""
    from distributed_hte.errors import DataError
    from distributed_hte.kinds.aipw_segments import KEY_CHECK_IN_DRIVER_ROWS, check_unique_key

    df = _frame(n=3_000)
    folder = tmp_path / "keys"
    folder.mkdir()
    df.iloc[:1500].to_parquet(folder / "part-0.parquet")
    df.iloc[1500:].assign(id=lambda f: f["id"].where(f.index != 2999, 7)).to_parquet(
        folder / "part-1.parquet"
    )
    for n_rows in (len(df), KEY_CHECK_IN_DRIVER_ROWS + 1):
        with pytest.raises(DataError, match=r"e\.g\. 7 \(2 rows\)"):
            check_unique_key(str(folder), "id", n_rows)
    check_unique_key(str(folder / "part-0.parquet"), "id", KEY_CHECK_IN_DRIVER_ROWS + 1)


@pytest.mark.slow  # one Ray Data pass per Newton step
def test_one_streaming_worker_gives_the_scores_of_two(fitted, tmp_path):
    """One worker streaming its shard from Ray Data on every Newton pass (cache_gb 0)
    against two workers holding theirs in memory: the same scores."""
    from distributed_hte.runner import run_job
    from distributed_hte.spec import validate_spec

    run, _, raw = fitted
    one = run_job(
        validate_spec(
            {
                **raw,
                "nuisance": {**raw["nuisance"], "cache_gb": 0},
                "scaling": {"num_workers": 1},
                "outputs": {"dir": str(tmp_path), "scores": True},
            }
        )
    )
    a = pq.read_table(run / "scores.parquet").to_pandas().sort_values("impression_id")
    b = pq.read_table(one / "scores.parquet").to_pandas().sort_values("impression_id")
    np.testing.assert_array_equal(a.fold.to_numpy(), b.fold.to_numpy())
    for c in ("e_hat", "mu1_hat", "mu0_hat", "score"):
        np.testing.assert_allclose(a[c].to_numpy(), b[c].to_numpy(), rtol=0, atol=1e-9)


def test_quickstart_spec_validates():
    out = subprocess.run(
        [sys.executable, "-m", "distributed_hte.cli", "validate", "jobs/aipw_segments_quickstart.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
