"""interference end to end on a real local Ray: one small run (simulate → validate →
reshape → Ray Train DDP cross-fitting → estimation tasks → artefacts), predict, and the
data errors a user gets (exit code 2, one paragraph, nothing written)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch

from distributed_hte.errors import DataError, SpecError, UserError
from distributed_hte.runner import run_job
from distributed_hte.spec import load_spec, validate_spec

REPO = Path(__file__).resolve().parents[1]
ESTIMATE_KEYS = {"DB", "HT_DIM", "HA_DIM", "PDL", "IPW", "AIPW", "plug_in", "diagnostics"}
DB_Z_MAX = 4.0  # |DB − true GTE| / SE on one small run


def _spec(tmp: Path, **over) -> dict:
    spec = {
        "name": "itf",
        "kind": "interference",
        "simulate": {
            "n_queries": 2500,
            "n_items": 400,
            "set_size": 4,
            "set_size_min": 2,
            "truth_queries": 100_000,
            "seed": 1,
            "out": str(tmp / "sim"),
        },
        "data": {"item_subgroup": "c_bin"},
        "model": {
            "choice_net": {"hidden": [16, 16]},
            "response_net": {"hidden": [16, 16]},
            "pdl_net": {"hidden": [32]},
        },
        "estimate": {"folds": 3, "policy_q": [0.0, 0.5, 1.0]},
        "train": {"epochs": 4, "batch_size": 256, "lr": 0.03, "log_every_s": 60},
        "scaling": {"num_workers": 2},
        "outputs": {"dir": str(tmp / "runs")},
    }
    for key, value in over.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


@pytest.fixture(scope="module")
def itf_run(ray_session, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("itf")
    # The CLI logs at INFO; pytest leaves the root logger at WARNING.
    logger = logging.getLogger("distributed_hte")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        return run_job(validate_spec(_spec(tmp)))
    finally:
        logger.setLevel(level)


def test_run_writes_estimates_with_the_issue_keys(itf_run):
    assert (itf_run / "COMPLETE").exists()
    est = json.loads((itf_run / "estimates.json").read_text())
    assert set(est) == ESTIMATE_KEYS
    for name in ESTIMATE_KEYS - {"diagnostics"}:
        e = est[name]
        assert e["ci_low"] < e["estimate"] < e["ci_high"], name
        assert e["se"] > 0, name
    db = est["DB"]
    assert set(db["policy_values"]) == {"0", "0.5", "1"}
    assert set(db["subgroups"]) == {"0", "1"}
    # Linearity: V_1 − V_0 is the GTE; the subgroup effects add up to it.
    v = db["policy_values"]
    assert v["1"]["estimate"] - v["0"]["estimate"] == pytest.approx(db["estimate"], abs=1e-9)
    assert sum(g["estimate"] for g in db["subgroups"].values()) == pytest.approx(
        db["estimate"], abs=1e-9
    )
    diag = est["diagnostics"]
    assert diag["hessian"] == "exact" and diag["max_set_size"] == 4
    assert diag["exposure"]["treated_share"] > diag["exposure"]["p_treat"]
    assert set(diag["viewer_features"]) == {"v"}


def test_db_covers_the_true_gte_and_dim_does_not(itf_run):
    est = json.loads((itf_run / "estimates.json").read_text())
    meta = json.loads((itf_run.parents[1].parent / "sim" / "simulation.json").read_text())
    truth = meta["truth"]["gte"]["value"]
    z = abs(est["DB"]["estimate"] - truth) / est["DB"]["se"]
    assert z < DB_Z_MAX, (est["DB"], truth)
    assert est["HT_DIM"]["ci_low"] > truth, "HT-DIM is biased upwards by interference"
    metrics = json.loads((itf_run / "metrics.json").read_text())
    assert metrics["truth"]["gte"] == pytest.approx(truth)
    assert metrics["recovery"]["tau_corr"] > 0.8 and metrics["recovery"]["mu_corr"] > 0.9
    assert metrics["training"]["num_workers"] == 2


def test_artefacts_influence_values_and_log_table(itf_run):
    infl = pads.dataset(itf_run / "influence").to_table().to_pandas()
    assert len(infl) == 2500 and infl["query"].is_unique
    assert set(infl["fold"]) == {0, 1, 2}
    est = json.loads((itf_run / "estimates.json").read_text())
    assert infl["psi:gte"].mean() == pytest.approx(est["DB"]["estimate"], rel=1e-9)
    log = (itf_run / "run.log").read_text()
    assert "global treatment effect" in log and "HT_DIM" in log
    assert (itf_run / "plots" / "estimates.png").exists()
    assert (itf_run / "model" / "bundle.json").exists()


def test_predict_scores_every_row(itf_run, tmp_path):
    from distributed_hte.kinds import get_kind

    spec = load_spec_dict(itf_run)
    data = Path(spec["data"]["path"])
    out = tmp_path / "pred"
    info = get_kind("interference").predict(itf_run, str(data), out)
    pred = pads.dataset(out).to_table().to_pandas()
    src = pads.dataset(data).count_rows()
    assert info["rows"] == len(pred) == src
    for col in ("p_control", "p_treatment", "p_observed"):
        sums = pred.groupby("query_id")[col].sum()
        np.testing.assert_allclose(sums, 1.0, atol=1e-9)
    truth = pads.dataset(data).to_table(columns=["query_id", "item_id", "tau_true"]).to_pandas()
    both = pred.merge(truth, on=["query_id", "item_id"])
    assert len(both) == src
    assert np.corrcoef(both["tau_hat"], both["tau_true"])[0, 1] > 0.8
    with pytest.raises(UserError, match="already exists"):
        get_kind("interference").predict(itf_run, str(data), out)


def load_spec_dict(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "spec.yaml").read_text())


# ----------------------------------------------------------------------------- bad data


def _long_frame(n_queries: int = 60, k: int = 3, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for q in range(n_queries):
        items = rng.choice(40, size=k, replace=False)
        exposed = rng.integers(k)
        v = rng.normal()
        for j, item in enumerate(items):
            rows.append(
                {
                    "query_id": q,
                    "item_id": int(item),
                    "treated": int(item % 2),
                    "exposed": int(j == exposed),
                    "outcome": float(rng.normal()) if j == exposed else np.nan,
                    "v": v,
                    "c_bin": int(item % 3 == 0),
                    "c_cont": float(item) / 40,
                }
            )
    return pd.DataFrame(rows)


def _bad_spec(folder: Path, tmp: Path) -> dict:
    return {
        "name": "bad",
        "kind": "interference",
        "data": {"path": str(folder), "p_treat": 0.5},
        "outputs": {"dir": str(tmp / "runs")},
    }


def _bad_cases(df: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, tuple[str, ...]]]:
    two = df.copy()
    two.loc[(two.query_id == 5), "exposed"] = 1
    varying = df.copy()
    first = varying.index[varying.item_id == varying.item_id.iloc[0]][0]
    varying.loc[first, "treated"] = 1 - varying.loc[first, "treated"]
    nan = df.copy()
    nan.loc[4, "c_cont"] = np.nan
    y_nan = df.copy()
    y_nan.loc[y_nan.index[y_nan.exposed == 1][2], "outcome"] = np.nan
    return {
        "two exposures": (two, ("queries do not have exactly one exposed item", "query 5")),
        "treated varies": (varying, ("varies within 1 of", "data.treated")),
        "null feature": (nan, ("'c_cont'", "null")),
        "NaN feature": (nan, ("'c_cont'", "NaN")),
        "NaN outcome": (y_nan, ("exposed row", "data.outcome")),
    }


def _write_keeping_nan(df: pd.DataFrame, folder: Path) -> Path:
    """Parquet with real NaN values (pandas would store a NaN float as null)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    table = pa.table({c: pa.array(df[c].to_numpy()) for c in df.columns})
    pq.write_table(table, folder / "part-0.parquet")
    return folder


@pytest.mark.parametrize(
    "case", ["two exposures", "treated varies", "null feature", "NaN feature", "NaN outcome"]
)
def test_bad_data_is_a_user_error_and_writes_nothing(case, ray_session, small_parquet, tmp_path):
    df, fragments = _bad_cases(_long_frame())[case]
    if case == "NaN feature":
        folder = _write_keeping_nan(df, tmp_path / "nan")
    else:
        folder = small_parquet(df)
    with pytest.raises(DataError) as err:
        run_job(validate_spec(_bad_spec(folder, tmp_path)))
    assert err.value.exit_code == 2
    for f in fragments:
        assert f in str(err.value), (f, str(err.value))
    assert not (tmp_path / "runs").exists(), "bad data writes no run directory"


def _dhte(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run(
        [sys.executable, "-m", "distributed_hte.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=env,
    )


def test_cli_errors_exit_2_before_ray_starts(small_parquet, tmp_path):
    """Errors found from the spec or the parquet metadata: no Ray, one line, exit 2."""
    df = _long_frame()
    good = small_parquet(df, "good")
    missing = small_parquet(df.drop(columns=["c_cont"]), "missing")
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(_bad_spec(missing, tmp_path)))
    for args, fragments in [
        ((str(spec),), ("no column 'c_cont'", "data.item_features")),
        ((str(spec), f"data.path={good}", "data.p_treat=1.0"), ("data.p_treat", "less than 1")),
        ((str(spec), f"data.path={good}", "data.p_treat=0"), ("data.p_treat", "greater than 0")),
    ]:
        res = _dhte("run", *args)
        assert res.returncode == 2, res.stderr[-2000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "Traceback" not in res.stderr
        for f in fragments:
            assert f in last, (f, last)
    assert not (tmp_path / "runs").exists()


def test_spec_needs_p_treat_without_a_simulator():
    with pytest.raises(SpecError, match="data.p_treat is required"):
        validate_spec({"name": "x", "kind": "interference", "data": {"path": "/d"}})


def test_shipped_quickstart_spec_is_small():
    spec = load_spec(REPO / "jobs" / "interference_quickstart.yaml")
    assert spec.simulate is not None and spec.simulate.n_queries <= 10_000


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_gpu
def test_cross_fitting_trains_on_gpu_with_amp(ray_session, tmp_path):
    spec = _spec(
        tmp_path,
        train={"amp": True, "epochs": 2},
        scaling={"use_gpu": True, "num_workers": min(torch.cuda.device_count(), 2)},
    )
    run = run_job(validate_spec(spec))
    est = json.loads((run / "estimates.json").read_text())
    assert set(est) == ESTIMATE_KEYS and est["DB"]["se"] > 0


@pytest.mark.gpu
@needs_gpu
def test_study_replication_runs_on_gpu():
    from distributed_hte.models.interference import NetConfig
    from distributed_hte.studies import interference_coverage as study

    cfg = study.ReplicationConfig(
        set_size=3,
        n_queries=400,
        n_items=100,
        fit=study.FitConfig(NetConfig((8,)), NetConfig((8,)), NetConfig((8,)), steps=20),
    )
    row = study.run_replication(cfg, rep=0, device="cuda")
    assert np.isfinite(row["DB_est"]) and row["DB_se"] > 0
