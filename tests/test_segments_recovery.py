"""The issue's recovery targets for ``segments`` on 200k people (slow: about 70 s).

pytest -m slow tests/test_segments_recovery.py
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO

from distributed_hte.runner import run_job
from distributed_hte.spec import load_spec, with_overrides


@pytest.mark.slow
def test_200k_targets(ray_session, tmp_path):
    spec = with_overrides(
        load_spec(REPO / "jobs" / "segments_200k.yaml"), {"outputs.dir": str(tmp_path)}
    )
    run = run_job(spec)
    truth = json.loads((run / "metrics.json").read_text())["truth"]
    assert truth["assignment_accuracy"] >= 0.95
    assert truth["delta_zero_pattern_accuracy"] >= 0.95
    assert truth["gamma_support_f1"] >= 0.90
