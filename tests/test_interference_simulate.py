"""The section 6.2 simulator: its structure, determinism and the Monte Carlo truth. No Ray."""

from __future__ import annotations

import numpy as np
import pytest

from distributed_hte.simulate import interference as sim


@pytest.fixture(scope="module")
def pool():
    return sim.make_pool(300, 0.5, seed=4)


def test_sets_are_drawn_without_replacement_and_items_repeat(pool):
    q = sim.simulate_queries(pool, 5_000, 6, 3, "continuous", 1.0, np.random.default_rng(0))
    assert q.items.shape == (5_000, 6)
    sizes = q.mask.sum(axis=1)
    assert sizes.min() == 3 and sizes.max() == 6
    assert (q.mask[:, :3]).all(), "real items come first"
    for row in q.items[:500]:
        assert len(set(row)) == len(row)
    counts = np.bincount(q.items[q.mask], minlength=300)
    assert counts.min() > 10, "items appear in many queries and share their assignment"
    np.testing.assert_array_equal(q.w, pool.treated[q.items])
    assert (q.e < sizes).all()


def test_exposure_follows_the_mnl_probabilities(pool):
    rng = np.random.default_rng(1)
    q = sim.simulate_queries(pool, 200_000, 3, 3, "continuous", 1.0, rng)
    u = q.b + q.w * q.tau
    p = np.exp(u - u.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    expected = p[:, 0].mean()
    observed = (q.e == 0).mean()
    assert abs(observed - expected) < 4 * np.sqrt(expected * (1 - expected) / len(q.e))
    # The response does not depend on the treatment, only on viewer and item.
    resid = q.y - q.mu[np.arange(len(q.e)), q.e]
    we = q.w[np.arange(len(q.e)), q.e]
    assert abs(resid[we == 1].mean() - resid[we == 0].mean()) < 0.02


def test_the_design_has_interference(pool):
    """Treated items win more than p of exposures and reach other viewers."""
    q = sim.simulate_queries(pool, 100_000, 5, 5, "continuous", 1.0, np.random.default_rng(2))
    we = q.w[np.arange(len(q.e)), q.e]
    share_items = pool.treated.mean()
    assert we.mean() > share_items + 0.05
    assert q.v[we == 1].mean() - q.v[we == 0].mean() > 0.05, "viewer-selection bias"


def test_truth_is_deterministic_and_precise(pool):
    cfg = sim.InterferenceSimConfig(n_items=300, set_size=3, truth_queries=200_000, seed=4)
    a = sim.true_effects(pool, cfg)
    b = sim.true_effects(pool, cfg)
    assert a == b
    gte = a["gte"]
    assert gte["mc_se"] < 0.002 and gte["value"] > 0.05
    assert a["group=0"]["value"] + a["group=1"]["value"] == pytest.approx(gte["value"], abs=1e-9)
    assert a["V_q=1"]["value"] - a["V_q=0"]["value"] == pytest.approx(gte["value"], abs=0.02)


def test_long_table_has_one_exposure_per_query(pool):
    q = sim.simulate_queries(pool, 1_000, 4, 2, "binary", 1.0, np.random.default_rng(3))
    ids = np.arange(1_000, dtype=np.int64) * 7 + 11
    df = sim.queries_to_table(pool, q, ids).to_pandas()
    assert len(df) == int(q.mask.sum())
    assert (df.groupby("query_id")["exposed"].sum() == 1).all()
    assert (df.groupby("item_id")["treated"].nunique() == 1).all()
    assert df.loc[df.exposed == 1, "outcome"].isin([0.0, 1.0]).all()
    assert df.loc[df.exposed == 0, "outcome"].isna().all()
    assert (df.groupby("query_id")["v"].nunique() == 1).all()
