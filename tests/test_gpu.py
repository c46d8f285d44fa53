"""GPU path: NCCL DDP, device placement and AMP. Skipped (not faked) without a CUDA device."""

from __future__ import annotations

import json

import pytest
import torch

from distributed_hte.runner import run_job
from distributed_hte.spec import validate_spec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_fe_hte_trains_on_gpu_with_amp(sim_tiny, tmp_path):
    n_gpu = torch.cuda.device_count()
    spec = validate_spec(
        {
            "name": "gpu",
            "kind": "fe_hte",
            "data": {"path": str(sim_tiny / "data")},
            "model": {"beta_net": {"hidden": [32, 16], "batchnorm": True}},
            "train": {"epochs": 3, "batch_size": 1024, "lr": 0.02, "amp": True},
            "scaling": {"num_workers": min(n_gpu, 2), "use_gpu": True},
            "outputs": {"dir": str(tmp_path)},
        }
    )
    run = run_job(spec)
    m = json.loads((run / "metrics.json").read_text())
    assert m["val"]["r2"] > 0.8
    assert m["truth"]["beta_corr"] > 0.9


def test_mmm_trains_on_gpu(ray_session, tmp_path):
    spec = validate_spec(
        {
            "name": "gpu-mmm",
            "kind": "mmm",
            "simulate": {
                "n_regions": 30,
                "n_weeks": 60,
                "n_channels": 3,
                "seed": 2,
                "out": str(tmp_path / "sim"),
            },  # fmt: skip
            "train": {"epochs": 6, "region_passes": 25, "batch_size": 32, "lr": 0.03},
            "scaling": {"num_workers": 1, "use_gpu": True},
            "outputs": {"dir": str(tmp_path / "runs")},
        }
    )
    run = run_job(spec)
    m = json.loads((run / "metrics.json").read_text())
    assert m["holdout"]["rmse"] < m["holdout"]["naive_region_mean"]["rmse"]
    assert m["truth"]["max_abs_share_error_pp"] < 15
