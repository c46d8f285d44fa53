"""fe_hte end to end on a real local Ray: recovery, pyfixest, predict, export, 1 vs 2 workers, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest

from distributed_hte.runner import run_job
from distributed_hte.spec import validate_spec

# Tolerances, named once. The recovery data is 150k rows (2k users, 400 vendors, 20 periods).
BETA_CORR_MIN = 0.995
FE_CORR_MIN = 0.98
R2_MIN = 0.97
PYFIXEST_ATOL = 0.01  # the 0.002 target is for 500k rows: benchmarks/bench_pyfixest.py
WORKERS_ATOL = 0.01


def _spec(data: Path, tmp: Path, workers: int = 2, **train):
    return validate_spec(
        {
            "name": "e2e",
            "kind": "fe_hte",
            "data": {"path": str(data / "data")},
            "model": {"beta_net": {"hidden": []}, "g_net": {"hidden": []}, "solver": "sgd"},
            "train": {"epochs": 8, "batch_size": 1024, "lr": 0.02, "log_every_s": 60, **train},
            "scaling": {"num_workers": workers},
            "outputs": {"dir": str(tmp)},
        }
    )


@pytest.fixture(scope="module")
def linear_run(sim_linear, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    return run_job(_spec(sim_linear, out))


def test_recovers_beta_fixed_effects_and_outcome(linear_run):
    m = json.loads((linear_run / "metrics.json").read_text())
    assert (linear_run / "COMPLETE").exists()
    assert m["truth"]["beta_corr"] >= BETA_CORR_MIN, m["truth"]
    assert m["val"]["r2"] >= R2_MIN and m["train"]["r2"] >= R2_MIN
    for col in ("user_id", "vendor_id", "period"):
        assert m["fixed_effects"][col]["corr_with_truth"] >= FE_CORR_MIN, (
            col,
            m["fixed_effects"][col],
        )
    assert m["training"]["num_workers"] == 2
    assert (linear_run / "plots" / "training_curve.png").exists()
    assert (linear_run / "plots" / "beta_recovery.png").exists()


def test_fixed_effect_export_is_zero_mean_and_matches_truth(linear_run, sim_linear):
    for col in ("user_id", "vendor_id", "period"):
        fe = pd.read_parquet(linear_run / "fixed_effects" / f"{col}.parquet")
        assert list(fe.columns) == ["id", "estimate", "n_rows"]
        truth = pd.read_parquet(sim_linear / "truth" / f"{col}.parquet")
        assert set(fe["id"]) == set(truth["id"])
        assert abs(fe["estimate"].mean()) < 1e-6
        merged = fe.merge(truth, on="id")
        assert np.corrcoef(merged.estimate, merged.effect)[0, 1] >= FE_CORR_MIN
    assert pads.dataset(sim_linear / "data").count_rows() == fe_rows(linear_run)


def fe_rows(run: Path) -> int:
    return int(pd.read_parquet(run / "fixed_effects" / "period.parquet")["n_rows"].sum())


def test_linear_coefficients_agree_with_pyfixest(linear_run, sim_linear):
    pf = pytest.importorskip("pyfixest")
    df = pads.dataset(sim_linear / "data").to_table().to_pandas()
    fit = pf.feols(
        "revenue ~ clicks + clicks:u0 + clicks:u1 + clicks:v0 + clicks:v1 + clicks:x0 + z0 + z1 + z2 | user_id + vendor_id + period",
        data=df,
    )
    ref = fit.coef()
    ours = json.loads((linear_run / "coefficients.json").read_text())
    pairs = {"(intercept)": "clicks", **{f: f"clicks:{f}" for f in ["u0", "u1", "v0", "v1", "x0"]}}
    for ours_name, ref_name in pairs.items():
        assert ours["beta"][ours_name] == pytest.approx(ref[ref_name], abs=PYFIXEST_ATOL), ours_name
    for z in ["z0", "z1", "z2"]:
        assert ours["g"][z] == pytest.approx(ref[z], abs=PYFIXEST_ATOL), z


def test_predict_round_trip(linear_run, sim_linear, tmp_path):
    from distributed_hte.kinds import get_kind

    out = tmp_path / "pred"
    info = get_kind("fe_hte").predict(linear_run, str(sim_linear / "data"), out)
    pred = pads.dataset(out).to_table().to_pandas()
    assert info["rows"] == len(pred) == 150_000
    assert {"beta_hat", "g_hat", "y_hat", "user_id", "vendor_id", "period"} <= set(pred.columns)
    assert not pred["fe_unseen"].any()
    # Predictions reproduce the model: y_hat correlates with the outcome as training R² says.
    src = (
        pads.dataset(sim_linear / "data")
        .to_table(columns=["user_id", "vendor_id", "period", "beta_true"])
        .to_pandas()
    )
    assert np.corrcoef(np.sort(pred.beta_hat), np.sort(src.beta_true))[0, 1] > 0.99
    with pytest.raises(Exception, match="already exists"):
        get_kind("fe_hte").predict(linear_run, str(sim_linear / "data"), out)


def test_one_and_two_workers_agree(linear_run, sim_linear, tmp_path):
    one = run_job(_spec(sim_linear, tmp_path, workers=1))
    c1 = json.loads((one / "coefficients.json").read_text())
    c2 = json.loads((linear_run / "coefficients.json").read_text())
    for part in ("beta", "g"):
        for k, v in c2[part].items():
            assert c1[part][k] == pytest.approx(v, abs=WORKERS_ATOL), (part, k)
    m1 = json.loads((one / "metrics.json").read_text())
    assert m1["training"]["num_workers"] == 1
    assert m1["truth"]["beta_corr"] >= BETA_CORR_MIN


def test_restart_resumes_from_the_last_checkpoint(sim_linear, tmp_path):
    run_dir = tmp_path / "resume"
    first = run_job(
        _spec(sim_linear, tmp_path, epochs=2, early_stopping_patience=None), run_dir=str(run_dir)
    )
    # Pretend the process died after epoch 2 of 3: the run is not complete.
    (first / "COMPLETE").unlink()
    second = run_job(
        _spec(sim_linear, tmp_path, epochs=3, early_stopping_patience=None), run_dir=str(run_dir)
    )
    assert second == first
    history = pd.read_parquet(second / "history.parquet")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["resumed_from_epoch"].tolist() == [0, 0, 2], "only the missing epoch is trained"
    assert json.loads((second / "metrics.json").read_text())["training"]["resumed_from_epoch"] == 2
    status = json.loads((second / "status.json").read_text())
    assert status["state"] == "complete" and status["resumed"] is True
