"""Shared fixtures: one real local Ray per test session, small simulated datasets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 4 logical CPUs (2 Train workers + Ray Data on 2 cores)."""
    from distributed_hte.runtime import RayTarget, init_ray, shutdown_ray

    init_ray(RayTarget(address=None, num_cpus=4))
    yield
    shutdown_ray()


def _simulate(tmp_path_factory, name: str, **config) -> Path:
    from distributed_hte.simulate.fe_hte import FeHteSimConfig, simulate_fe_hte

    out = tmp_path_factory.mktemp("sim") / name
    simulate_fe_hte(FeHteSimConfig(**config), out, progress=False)
    return out


@pytest.fixture(scope="session")
def sim_linear(ray_session, tmp_path_factory) -> Path:
    """150k rows of the seed's design with linear beta and g (2k users, 400 vendors, 20 periods)."""
    return _simulate(
        tmp_path_factory,
        "linear",
        n_rows=150_000,
        n_users=2_000,
        n_vendors=400,
        n_periods=20,
        seed=5,
        chunk_rows=50_000,
    )


@pytest.fixture(scope="session")
def sim_tiny(ray_session, tmp_path_factory) -> Path:
    """20k rows (200 users, 40 vendors, 5 periods): for plumbing tests, not statistics."""
    return _simulate(
        tmp_path_factory,
        "tiny",
        n_rows=20_000,
        n_users=200,
        n_vendors=40,
        n_periods=5,
        seed=9,
        chunk_rows=10_000,
    )


@pytest.fixture()
def small_parquet(tmp_path) -> callable:
    """Write a pandas frame as parquet under tmp_path and return the folder."""

    def write(df, name: str = "data") -> Path:
        folder = tmp_path / name
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir()
        df.to_parquet(folder / "part-0.parquet", index=False)
        return folder

    return write
