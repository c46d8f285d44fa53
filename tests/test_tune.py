"""A small Ray Tune sweep end to end: trials table, best config, best artefacts."""

from __future__ import annotations

import json

import pandas as pd

from distributed_hte.runner import run_job
from distributed_hte.spec import validate_spec


def test_grid_sweep_writes_trials_best_config_and_best_artefacts(sim_tiny, tmp_path):
    spec = validate_spec(
        {
            "name": "sweep",
            "kind": "fe_hte",
            "data": {"path": str(sim_tiny / "data")},
            # a random start: from the exact linear fit (the default) lr would not matter
            "model": {
                "beta_net": {"hidden": []},
                "g_net": {"hidden": []},
                "solver": "sgd",
                "init": "random",
            },
            "train": {"epochs": 2, "batch_size": 1024, "lr": 0.02},
            "scaling": {"num_workers": 1},
            "tune": {
                "params": {"train.lr": {"grid": [0.0005, 0.05]}},
                "metric": "val_loss",
                "mode": "min",
                "max_concurrent_trials": 2,
            },
            "outputs": {"dir": str(tmp_path)},
        }
    )
    run = run_job(spec)
    trials = pd.read_parquet(run / "trials.parquet")
    assert len(trials) == 2 and trials["completed"].all()
    assert sorted(trials["config.train.lr"]) == [0.0005, 0.05]
    best = json.loads((run / "best_config.json").read_text())
    # A learning rate 100x too small cannot reach the loss of a reasonable one in 2 epochs.
    assert best["config"] == {"train.lr": 0.05}
    assert best["value"] == trials["val_loss"].min()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tune"]["best_config"] == {"train.lr": 0.05}
    assert metrics["val"]["loss"] == best["value"]
    for name in [
        "coefficients.json",
        "fixed_effects/user_id.parquet",
        "model/bundle.json",
        "tune_summary.json",
    ]:
        assert (run / name).exists(), name
    summary = json.loads((run / "tune_summary.json").read_text())
    assert summary["wall_seconds"] >= summary["sum_trial_seconds"] / summary["concurrent_trials"]
    for trial_dir in trials["trial_dir"]:
        assert (pd.io.common.Path(trial_dir) / "COMPLETE").exists()
