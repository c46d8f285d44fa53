"""The seed's 500k-row targets (slow: `pytest -m slow`; results in benchmarks/RESULTS.md).

| case | beta corr | user / vendor / time FE corr | Y R² |
| linear beta | >= 0.999 | >= 0.995 each | >= 0.98 |
| nonlinear beta | >= 0.99 | >= 0.99 each | >= 0.98 |
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distributed_hte.runner import run_job
from distributed_hte.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
TARGETS = {
    "fe_hte_500k_linear.yaml": (0.999, 0.995, 0.98),
    "fe_hte_500k_nonlinear.yaml": (0.99, 0.99, 0.98),
}


@pytest.mark.slow
@pytest.mark.parametrize("job", sorted(TARGETS))
def test_seed_targets_at_500k_rows(job, ray_session, tmp_path):
    beta_min, fe_min, r2_min = TARGETS[job]
    run = run_job(load_spec(REPO / "jobs" / job, [f"outputs.dir={tmp_path}"]))
    m = json.loads((run / "metrics.json").read_text())
    assert m["truth"]["beta_corr"] >= beta_min, m["truth"]
    assert m["val"]["r2"] >= r2_min, m["val"]
    for col in ("user_id", "vendor_id", "period"):
        assert m["fixed_effects"][col]["corr_with_truth"] >= fe_min, (col, m["fixed_effects"][col])
