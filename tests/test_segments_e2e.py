"""Kind ``segments`` end to end on a real local Ray: solve, CV, artefacts, predict, Tune, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from test_cli import _assert_user_error, dhte

from distributed_hte.errors import DataError
from distributed_hte.kinds import get_kind
from distributed_hte.runner import run_job
from distributed_hte.spec import validate_spec

FEATURES = [f"x{i}" for i in range(8)]


@pytest.fixture(scope="session")
def segments_data(ray_session, tmp_path_factory) -> Path:
    """30k people, 8 features, segments of 2/3/3 creatives, one off-message creative."""
    from distributed_hte.simulate.segments import SegmentsSimConfig, simulate_segments

    out = tmp_path_factory.mktemp("sim") / "segments"
    cfg = SegmentsSimConfig(
        n_people=30_000,
        n_features=8,
        creatives_per_segment=(2, 3, 3),
        active_features=2,
        off_message=1,
        off_message_norm=1.5,
        seed=4,
        chunk_rows=10_000,
    )
    simulate_segments(cfg, out, progress=False)
    return out / "data"


def _spec(data_path: Path, out: Path, **sections):
    raw = {
        "name": "seg_test",
        "kind": "segments",
        "data": {"path": str(data_path), "features": FEATURES},
        "model": {"lam": 0.004, "alpha": 0.1, "path_steps": 6},
        "cv": {"folds": 3, "select": "one_se"},
        "scaling": {"num_workers": 2},
        "outputs": {"dir": str(out)},
    }
    raw.update(sections)
    return validate_spec(raw)


@pytest.fixture(scope="session")
def two_worker_run(segments_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return run_job(_spec(segments_data, out))


def test_run_writes_segments_cv_path_and_recovers_truth(two_worker_run):
    seg = json.loads((two_worker_run / "segments.json").read_text())
    assert set(seg["segments"]) == {"seg_a", "seg_b", "seg_c"}
    for s in seg["segments"].values():
        assert set(s["gamma"]) == set(FEATURES)
        assert set(s["selected_features"]) == {f for f, v in s["gamma"].items() if v != 0}
        for c in s["creatives"]:
            assert c["matches_segment"] == (c["delta_norm"] == 0.0)
    assert seg["convergence"]["converged"] and seg["convergence"]["kkt_residual"] <= 1e-8
    assert seg["selection"]["rule"] == "one_se"
    path = pd.read_parquet(two_worker_run / "cv_path.parquet")
    assert len(path) == 6 and path["selected"].sum() == 1
    assert path["lam"].is_monotonic_decreasing
    assert (path["kkt_max"] <= 1e-8).all()
    for plot in ("cv_path.png", "segments.png"):
        assert (two_worker_run / "plots" / plot).stat().st_size > 1000
    metrics = json.loads((two_worker_run / "metrics.json").read_text())
    truth = metrics["truth"]
    # Small data (30k people, 8 creatives): looser than the 200k targets in the README.
    assert truth["assignment_accuracy"] >= 0.93
    assert truth["delta_zero_pattern_accuracy"] >= 7 / 8
    assert truth["gamma_support_recall"] == 1.0
    assert metrics["solver"]["replica_max_abs_diff"] == 0.0


def _assert_same_solution(a_run: Path, b_run: Path) -> None:
    a = json.loads((a_run / "segments.json").read_text())
    b = json.loads((b_run / "segments.json").read_text())
    assert a["lam"] == b["lam"]
    assert b["objective"] == pytest.approx(a["objective"], rel=1e-9)
    for name, seg in a["segments"].items():
        np.testing.assert_allclose(
            list(seg["gamma"].values()), list(b["segments"][name]["gamma"].values()), atol=1e-7
        )
        assert [c["matches_segment"] for c in seg["creatives"]] == [
            c["matches_segment"] for c in b["segments"][name]["creatives"]
        ]
    pa_ = pd.read_parquet(a_run / "cv_path.parquet")["cv_log_loss"]
    pb = pd.read_parquet(b_run / "cv_path.parquet")["cv_log_loss"]
    np.testing.assert_allclose(pa_, pb, rtol=1e-9)


def test_one_worker_gives_the_same_solution(two_worker_run, segments_data, tmp_path):
    one = run_job(_spec(segments_data, tmp_path, scaling={"num_workers": 1}))
    _assert_same_solution(two_worker_run, one)


@pytest.mark.slow
def test_streaming_worker_gives_the_same_solution(two_worker_run, segments_data, tmp_path):
    """1 worker streaming every pass from Ray Data (memory flat in N) = cached shards.

    Slow (about 4 minutes here): each of some 50 passes restarts a Ray Data read.
    """
    data = {"path": str(segments_data), "features": FEATURES, "cache_gb": 0}
    one = run_job(_spec(segments_data, tmp_path, scaling={"num_workers": 1}, data=data))
    assert not json.loads((one / "metrics.json").read_text())["solver"]["cached_in_worker_memory"]
    _assert_same_solution(two_worker_run, one)


def test_predict_assigns_every_person_a_segment(two_worker_run, segments_data, tmp_path):
    out = tmp_path / "pred"
    res = get_kind("segments").predict(two_worker_run, str(segments_data), out)
    df = pads.dataset(str(out), format="parquet").to_table().to_pandas()
    assert res["rows"] == len(df) == 30_000
    scores = df[["score_seg_a", "score_seg_b", "score_seg_c"]].to_numpy()
    best = np.array(["seg_a", "seg_b", "seg_c"])[scores.argmax(axis=1)]
    assert (df["segment_assigned"].to_numpy() == best).all()
    assert {"segment", "creative", "y"} <= set(df.columns)  # non-feature columns pass through
    assert df["segment_assigned"].nunique() == 3


def test_tune_sweep_over_lambda_and_alpha(segments_data, tmp_path):
    spec = _spec(
        segments_data,
        tmp_path,
        cv={"folds": 2},
        model={"lam": 0.01, "alpha": 0.1, "path_steps": 3},
        scaling={"num_workers": 1},
        tune={
            "params": {"model.lam": {"grid": [0.002, 0.02]}, "model.alpha": {"grid": [0.1]}},
            "metric": "cv_log_loss",
            "mode": "min",
            "max_concurrent_trials": 2,
        },
    )
    run = run_job(spec)
    cv = pd.read_csv(run / "cv_table.csv")
    assert sorted(cv["lam"]) == [0.002, 0.02]
    assert cv["cv_log_loss"].notna().all()
    best = json.loads((run / "best_config.json").read_text())
    assert best["value"] == pytest.approx(cv["cv_log_loss"].min())
    seg = json.loads((run / "segments.json").read_text())  # the best trial's refit, promoted
    assert seg["lam"] == best["config"]["model.lam"]
    summary = json.loads((run / "tune_summary.json").read_text())
    assert summary["completed"] == 2 and "overhead_seconds" in summary
    assert (run / "plots" / "cv_curve.png").exists()


def _people(n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(1)
    df = pd.DataFrame({c: rng.normal(size=n) for c in FEATURES})
    df["segment"] = np.where(np.arange(n) % 2 == 0, "a", "b")
    df["creative"] = np.where(df["segment"] == "a", 1, 2) * 10 + rng.integers(0, 2, n)
    df["y"] = rng.integers(0, 2, n)
    return df


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("label_not_binary", "must hold only 0 and 1"),
        ("label_fraction", "that are not all 0 or 1"),
        ("creative_in_two_segments", "appear in more than one segment"),
        ("single_label_creative", "single label value"),
        ("nan_feature", "null value|NaN"),
        ("constant_feature", "constant"),
    ],
)
def test_bad_data_is_a_clear_error(case, fragment, ray_session, small_parquet, tmp_path):
    df = _people()
    if case == "label_not_binary":
        df.loc[3, "y"] = 2
    elif case == "label_fraction":
        df["y"] = df["y"].astype(float)
        df.loc[3, "y"] = 0.5
    elif case == "creative_in_two_segments":
        df.loc[0, "creative"] = 20  # creative 20 belongs to segment b
    elif case == "single_label_creative":
        df.loc[df["creative"] == 10, "y"] = 0
    elif case == "nan_feature":
        df.loc[5, "x3"] = np.nan
    elif case == "constant_feature":
        df["x2"] = 1.0
    spec = _spec(small_parquet(df), tmp_path / "runs")
    with pytest.raises(DataError, match=fragment):
        get_kind("segments").prepare(spec)
    assert not (tmp_path / "runs").exists()


def test_creative_scope_segment_allows_reused_ids(ray_session, small_parquet, tmp_path):
    df = _people()
    df["creative"] = df["creative"] % 10  # ids 0/1 in both segments
    data = small_parquet(df)
    with pytest.raises(DataError, match="creative_scope: segment"):
        get_kind("segments").prepare(_spec(data, tmp_path))
    spec = _spec(
        data, tmp_path, data={"path": str(data), "features": FEATURES, "creative_scope": "segment"}
    )
    prepared = get_kind("segments").prepare(spec)
    assert len(prepared.creatives) == 4


def test_cli_exits_2_on_a_creative_in_two_segments(small_parquet, tmp_path):
    df = _people()
    df.loc[0, "creative"] = 20
    data = small_parquet(df)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: bad\nkind: segments\ndata: {{path: {data}, features: {FEATURES}}}\n"
        f"outputs: {{dir: {tmp_path / 'runs'}}}\n"
    )
    res = dhte("run", str(spec))
    _assert_user_error(res, "creative", "more than one segment")
    assert not (tmp_path / "runs" / "bad").exists()
