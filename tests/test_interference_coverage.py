"""The coverage study: one replication, the table's arithmetic, the target checks, and
(slow tier) the shipped study with its targets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from distributed_hte.kinds.interference_coverage import CoverageTargets, check_targets
from distributed_hte.models.interference import NetConfig
from distributed_hte.studies import interference_coverage as study

REPO = Path(__file__).resolve().parents[1]


def test_one_small_replication_returns_every_estimator():
    cfg = study.ReplicationConfig(
        set_size=3,
        n_queries=400,
        n_items=100,
        fit=study.FitConfig(NetConfig((8,)), NetConfig((8,)), NetConfig((8,)), steps=20, lr=0.02),
    )
    row = study.run_replication(cfg, rep=0)
    for name in study.ESTIMATORS + study.REFERENCE:
        assert math.isfinite(row[f"{name}_est"]) and row[f"{name}_se"] > 0, name
    assert row["ridge_queries"] == 0
    again = study.run_replication(cfg, rep=0)
    assert again["DB_est"] == row["DB_est"], "a replication is deterministic in its index"
    other = study.run_replication(cfg, rep=1)
    assert other["DB_est"] != row["DB_est"]


def _fake_replications(bias: dict[str, float], sd: float, se: float, r: int = 200):
    rng = np.random.default_rng(0)
    rows = []
    for k in (3, 8):
        for rep in range(r):
            row = {"set_size": k, "rep": rep}
            for name in study.ESTIMATORS:
                row[f"{name}_est"] = 1.0 + bias.get(name, 0.0) + sd * rng.standard_normal()
                row[f"{name}_se"] = se
            rows.append(row)
    return pd.DataFrame(rows)


def test_summary_arithmetic_and_target_checks():
    reps = _fake_replications({"HT_DIM": 0.5, "HA_DIM": 0.1}, sd=0.02, se=0.02)
    table = study.summarise(reps, {3: 1.0, 8: 1.0})
    db = table[(table.set_size == 3) & (table.estimator == "DB")].iloc[0]
    est = reps[reps.set_size == 3]["DB_est"]
    assert db.bias == pytest.approx(est.mean() - 1.0)
    assert db.mc_sd == pytest.approx(est.std(ddof=1))
    assert db.bias_se == pytest.approx(est.std(ddof=1) / math.sqrt(200))
    assert db.coverage == pytest.approx(((est - 1.0).abs() <= 1.959964 * 0.02).mean())
    checks = check_targets(table, CoverageTargets())
    assert checks["all_met"], checks
    # An understated SE or a biased DB fails the targets.
    bad = check_targets(
        study.summarise(_fake_replications({"DB": 0.01}, sd=0.02, se=0.01), {3: 1.0, 8: 1.0}),
        CoverageTargets(),
    )
    assert not bad["all_met"]
    assert not bad["K=3"]["DB_se_ratio"]["met"] and not bad["K=3"]["DB_abs_bias_over_se"]["met"]
    assert not bad["K=8"]["HT_DIM_abs_bias_over_se"]["met"], "unbiased DIM is not 'clearly biased'"


@pytest.mark.slow
def test_shipped_coverage_study_meets_the_targets(ray_session, tmp_path):
    """The full study (about 20 minutes on 2 cores): every target at K = 3 and K = 8."""
    from distributed_hte.runner import run_job
    from distributed_hte.spec import load_spec

    run = run_job(
        load_spec(REPO / "jobs" / "interference_coverage.yaml", [f"outputs.dir={tmp_path}"])
    )
    result = json.loads((run / "coverage.json").read_text())
    assert result["targets"]["all_met"], result["targets"]
