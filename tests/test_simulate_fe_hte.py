"""The fe_hte simulator: deterministic, chunk-parallel, with truth that matches the data."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pytest

from distributed_hte.simulate.fe_hte import (
    TRUE_INTERCEPT,
    FeHteSimConfig,
    chunk_sizes,
    make_world,
    read_truth,
    simulate_chunk,
)

CFG = FeHteSimConfig(n_rows=5_000, n_users=300, n_vendors=50, n_periods=10, seed=3)


def test_chunks_are_deterministic_and_distinct():
    world = make_world(CFG)
    a, b = simulate_chunk(world, CFG, 0, 1000), simulate_chunk(make_world(CFG), CFG, 0, 1000)
    assert a.equals(b)
    assert not a.equals(simulate_chunk(world, CFG, 1, 1000))


def test_chunk_sizes_cover_all_rows():
    assert chunk_sizes(2_500_000, 1_000_000) == [1_000_000, 1_000_000, 500_000]
    assert sum(chunk_sizes(7, 3)) == 7


@pytest.mark.parametrize("form", ["linear", "nonlinear"])
def test_outcome_is_the_stated_model(form):
    cfg = FeHteSimConfig(**{**CFG.__dict__, "beta": form, "g": form, "noise_sd": 0.0})
    world = make_world(cfg)
    t = simulate_chunk(world, cfg, 0, 2000).to_pandas()
    fe = (
        t.user_id.map(dict(zip(world.user_ids, world.user_fe, strict=True)))
        + t.vendor_id.map(dict(zip(world.vendor_ids, world.vendor_fe, strict=True)))
        + t.period.map(dict(zip(world.period_ids, world.period_fe, strict=True)))
    )
    np.testing.assert_allclose(
        t.revenue, t.beta_true * t.clicks + t.g_true + fe + TRUE_INTERCEPT, atol=1e-9
    )
    # User features are constant within a user (they are user-level, as the design says).
    assert t.groupby("user_id")["u0"].nunique().max() == 1


def test_truth_is_zero_mean_per_family():
    w = make_world(CFG)
    for fe in (w.user_fe, w.vendor_fe, w.period_fe):
        assert abs(fe.mean()) < 1e-12


def test_simulate_writes_sharded_parquet_and_truth(ray_session, tmp_path):
    from distributed_hte.simulate.fe_hte import simulate_fe_hte

    cfg = FeHteSimConfig(
        n_rows=25_000, n_users=500, n_vendors=40, n_periods=5, chunk_rows=10_000, seed=1
    )
    out = simulate_fe_hte(cfg, tmp_path / "sim", progress=False)
    files = sorted((out / "data").glob("*.parquet"))
    assert len(files) == 3
    assert pads.dataset(out / "data").count_rows() == 25_000
    meta = json.loads((out / "simulation.json").read_text())
    assert meta["config"]["n_rows"] == 25_000
    truth = read_truth(out / "truth", "user_id")
    assert len(truth) == 500
    # Same seed, same chunking: identical bytes of data, whatever the parallelism.
    again = simulate_fe_hte(cfg, tmp_path / "sim2", progress=False)
    assert pads.dataset(again / "data").to_table().equals(pads.dataset(out / "data").to_table())
    assert not list(tmp_path.glob(".sim*tmp*")), "temporary folders must not be left behind"
    with pytest.raises(FileExistsError):
        simulate_fe_hte(cfg, out, progress=False)


def test_a_spec_simulate_section_is_generated_once_and_then_reused(ray_session, tmp_path):
    from distributed_hte.errors import SpecError
    from distributed_hte.kinds import get_kind
    from distributed_hte.spec import validate_spec

    raw = {
        "name": "s",
        "kind": "fe_hte",
        "simulate": {"n_rows": 3000, "n_users": 50, "n_vendors": 10, "n_periods": 3},
        "outputs": {"dir": str(tmp_path)},
    }
    kind = get_kind("fe_hte")
    first = kind.simulate(validate_spec(raw), progress=False)
    stamp = (first / "part-00000.parquet").stat().st_mtime_ns
    again = kind.simulate(validate_spec(raw), progress=False)
    assert again == first
    assert (first / "part-00000.parquet").stat().st_mtime_ns == stamp
    # A different simulate section gets its own folder (content hash) ...
    other = kind.simulate(
        validate_spec({**raw, "simulate": {**raw["simulate"], "seed": 1}}), progress=False
    )
    assert other != first
    # ... and an explicit out folder holding another simulation is an error, not an overwrite.
    clash = {**raw, "simulate": {**raw["simulate"], "seed": 2, "out": str(first.parent)}}
    with pytest.raises(SpecError, match="different simulation"):
        kind.simulate(validate_spec(clash), progress=False)
