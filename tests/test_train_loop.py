"""The generic training loop: shuffling, reproducibility, schedule-aware early stopping and
the convergence verdict. Pure functions first (milliseconds), then the real loop on a real
local Ray with the tiny fe_hte data (1 and 2 workers)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from distributed_hte.errors import ConvergenceError, UserError
from distributed_hte.spec import JobSpec, TrainSpec
from distributed_hte.train.convergence import (
    DIVERGED_VS_INITIAL,
    assess_convergence,
    check_convergence,
    divergence,
)
from distributed_hte.train.schedule import (
    DECAYED_FACTOR,
    FINAL_FACTOR,
    early_stopping_action,
    lr_factor,
    scheduled_factor,
    start_anneal,
)
from distributed_hte.train.shuffle import cached_batches, epoch_seed

# Same spec, data and seed on CPU: the weights agree to this (float64 sums, one thread).
REPRO_ATOL = 1e-6


# ----------------------------------------------------------------------- verdict (pure)


def _history(
    val: list[float],
    *,
    factor_end: float = FINAL_FACTOR,
    initial: float = 10.0,
    grad_snr: float | None = None,
):
    """Epoch records as the loop reports them; train_loss tracks val_loss."""
    n = len(val)
    return [
        {
            "epoch": i + 1,
            "train_loss": v,
            "val_loss": v,
            "initial_loss": initial,
            "lr_factor": factor_end if i == n - 1 else 0.5,
            "stopped_reason": "",
            "grad_snr": grad_snr,
        }
        for i, v in enumerate(val)
    ]


def _assess(history, epochs=None, schedule="cosine", lr=0.01):
    return assess_convergence(
        history, epochs=epochs or len(history), schedule=schedule, lr=lr, tol=1e-3
    )


def test_verdict_converged_when_the_loss_has_flattened():
    v = _assess(_history([5.0, 2.0, 1.2, 1.0, 1.0, 0.9999, 0.9999]))
    assert v.converged and v.reason == "converged"
    assert v.best_epoch == 6 and v.best_loss == pytest.approx(0.9999)
    assert v.as_metrics()["converged"] is True
    assert v.as_metrics()["convergence_reason"] == "converged"


def test_verdict_converged_after_early_stopping_on_a_rising_val_loss():
    # Overfitting at the end: the best weights (epoch 4) are kept, nothing still falls.
    v = _assess(_history([3.0, 1.5, 1.1, 1.0, 1.01, 1.02, 1.03]), epochs=10)
    assert v.reason == "converged", v


def test_verdict_still_improving_names_the_rate_and_what_to_try():
    v = _assess(_history([5.0, 3.0, 2.0, 1.5, 1.2]))
    assert not v.converged and v.reason == "still_improving"
    # Best before the last 3 epochs 3.0, best in them 1.2: (3.0 - 1.2) / 3.0 / 3.
    assert v.rel_improvement_per_epoch == pytest.approx(0.2)
    assert "train.epochs" in v.suggestion


def test_verdict_a_falling_loss_with_a_steady_mean_gradient_is_still_improving():
    v = _assess(_history([5.0, 3.0, 2.0, 1.5, 1.2], grad_snr=7000.0))
    assert not v.converged and v.reason == "still_improving"
    assert v.grad_snr == pytest.approx(7000.0)
    assert "moving downhill" in v.message
    h = _history([5.0, 3.0, 2.0, 1.5, 1.2], grad_snr=7000.0)
    h[-1]["grad_snr_param"] = "beta_net.head.bias"
    assert "gradient of beta_net.head.bias was 7e+03x" in _assess(h).message


def test_verdict_the_annealing_drop_alone_is_not_still_improving():
    """Cosine's last epochs: the loss falls 0.6 %/epoch because the LR shrinks SGD's noise,
    while the mean gradient is within noise (snr 0.8, the quickstart's last epoch)."""
    losses = [0.30, 0.29, 0.28, 0.27, 0.262, 0.257, 0.2537, 0.2525, 0.2522]
    v = _assess(_history(losses, grad_snr=0.8))
    assert v.rel_improvement_per_epoch > 1e-3
    assert v.converged and v.reason == "converged", v
    assert "within noise" in v.message and "0.8" in v.message
    # The same loss curve with a steady downhill gradient is not converged.
    assert _assess(_history(losses, grad_snr=50.0)).reason == "still_improving"


def test_gradient_snr_tells_noise_from_a_steady_direction():
    """About 1 for zero-mean step gradients, about 1 + n |mu|^2 / tr(Sigma) with a drift."""
    from distributed_hte.train.convergence import GRAD_SNR_MOVING, gradient_snr

    rng = np.random.default_rng(0)

    def snr(g):
        return gradient_snr(g.sum(axis=0), float((g * g).sum()), len(g))

    noise = rng.normal(size=(400, 300))
    assert snr(noise) == pytest.approx(1.0, abs=0.3)
    drift = noise + 0.2  # |mu|^2 = 300 * 0.04 = 12 against tr(Sigma) = 300, n = 400
    assert snr(drift) == pytest.approx(1 + 400 * 12 / 300, rel=0.1)
    assert snr(drift) > GRAD_SNR_MOVING > snr(noise)
    assert gradient_snr(np.ones(3), 3.0, 1) is None  # one step: no noise estimate
    assert gradient_snr(np.ones(3) * 4, 12.0, 4) is None  # identical steps: no noise


def test_verdict_stopped_before_the_schedule_decayed():
    h = _history([3.0, 2.0, 1.9, 1.9, 1.9, 1.9], factor_end=0.6)
    v = _assess(h, epochs=20)
    assert not v.converged and v.reason == "stopped_before_decay"
    assert "6 of 20" in v.message
    # A constant schedule never decays: stopping early there is plain early stopping.
    assert _assess(h, epochs=20, schedule="constant").reason == "converged"


def test_verdict_diverged_when_the_loss_grows_far_above_its_best():
    v = _assess(_history([2.0, 1.0, 1.5, 2.5, 4.0]), epochs=10, lr=0.5)
    assert not v.converged and v.reason == "diverged"
    assert "train.lr=0.5" in v.message and "lower train.lr (e.g. to 0.05)" in v.suggestion


def test_verdict_diverged_when_training_made_the_loss_worse_than_untrained():
    h = _history([50.0 * DIVERGED_VS_INITIAL], initial=50.0 / 49)
    assert divergence(h) == "diverged"
    assert _assess(h, epochs=5).reason == "diverged"


def test_verdict_worse_than_start_when_the_run_never_gets_back_to_its_start():
    """A warm start knocked into a poor region by a high LR, where the loss then settles
    (the warehouse data at lr 0.05: val loss 1.63 from a 0.3 start, flat at the end)."""
    h = _history([2.5, 1.9, 1.7, 1.64, 1.631, 1.6305], initial=0.3, grad_snr=0.9)
    v = _assess(h, lr=0.05)
    assert not v.converged and v.reason == "worse_than_start", v
    assert "5.4x the starting model's loss" in v.message and "lower train.lr" in v.suggestion
    # Back near its start: not worse (a warm start first kicked up by Adam, then back).
    h = _history([0.45, 0.36, 0.31, 0.30, 0.30], initial=0.3, grad_snr=0.9)
    assert _assess(h, lr=0.05).converged


def test_verdict_non_finite_loss():
    h = _history([2.0, 1.0, math.nan], factor_end=0.5)
    assert divergence(h) == "non_finite"
    v = _assess(h, epochs=10, lr=3.0)
    assert not v.converged and v.reason == "non_finite"
    assert "epoch 3" in v.message and v.best_epoch == 2
    assert "lower train.lr (e.g. to 0.3)" in v.suggestion
    assert _assess(_history([math.inf])).reason == "non_finite"


def test_verdict_needs_two_epochs_to_judge():
    v = _assess(_history([1.0]))
    assert not v.converged and v.reason == "too_few_epochs"


def test_verdict_uses_train_loss_without_a_validation_set():
    h = [
        {"epoch": i + 1, "train_loss": x, "initial_loss": 9.0, "lr_factor": 0.01}
        for i, x in enumerate([4.0, 2.0, 1.0, 0.5])
    ]
    v = _assess(h)
    assert v.monitored == "train_loss" and v.reason == "still_improving"


def test_check_convergence_raises_only_when_required():
    bad = _assess(_history([5.0, 3.0, 2.0, 1.5, 1.2]))
    good = _assess(_history([5.0, 2.0, 1.0, 1.0, 1.0, 1.0]))
    lax = JobSpec(name="x", kind="fe_hte")
    strict = JobSpec(name="x", kind="fe_hte", train=TrainSpec(require_convergence=True))
    check_convergence(lax, bad)
    check_convergence(strict, good)
    with pytest.raises(ConvergenceError, match="still_improving") as err:
        check_convergence(strict, bad)
    assert isinstance(err.value, UserError) and err.value.exit_code == 3


# ------------------------------------------------------------------ stopping rule (pure)


def _simulate_stopping(val: list[float], epochs: int, patience: int, schedule="cosine"):
    """Drive the loop's stopping logic over a fixed val-loss curve; return (epochs run,
    LR factor of the last step, epoch the anneal started or None)."""
    steps_per_epoch, total = 10, 10 * epochs
    best, bad, step, anneal, anneal_epoch = math.inf, 0, 0, None, None
    for epoch in range(epochs):
        step += steps_per_epoch
        factor = scheduled_factor(step - 1, total, schedule, anneal)
        if val[epoch] < best:
            best, bad = val[epoch], 0
        else:
            bad += 1
        action = early_stopping_action(bad, patience, schedule, factor, anneal is not None)
        if action == "anneal":
            anneal = start_anneal(step, total, steps_per_epoch, patience, factor)
            anneal_epoch, bad = epoch + 1, 0
        if action == "stop":
            return epoch + 1, factor, anneal_epoch
    return epochs, factor, anneal_epoch


def test_plateau_at_a_high_lr_anneals_before_stopping():
    # The case: the val loss stops improving after epoch 2 of 20.
    val = [3.0, 2.0] + [2.5] * 18
    run, factor, anneal_epoch = _simulate_stopping(val, epochs=20, patience=3)
    assert anneal_epoch == 5, "patience ran out at epoch 5 with the LR near its peak"
    assert run == 8, "three compressed-decay epochs, then the stop"
    assert factor <= DECAYED_FACTOR


def test_plateau_after_the_decay_stops_right_away():
    # Best at epoch 16; patience runs out at epoch 19, when the cosine is below 5%.
    val = [float(20 - i) for i in range(16)] + [5.5] * 4
    run, factor, anneal_epoch = _simulate_stopping(val, epochs=20, patience=3)
    assert anneal_epoch is None and run == 19 and factor <= DECAYED_FACTOR


def test_constant_schedule_is_plain_patience():
    val = [3.0, 2.0] + [2.5] * 18
    run, factor, anneal_epoch = _simulate_stopping(val, epochs=20, patience=3, schedule="constant")
    assert (run, factor, anneal_epoch) == (5, 1.0, None)


def test_the_compressed_decay_never_raises_the_lr_and_reaches_the_floor():
    total = 1000
    anneal = start_anneal(200, total, 50, 3, lr_factor(200, total, "cosine"))
    factors = [scheduled_factor(s, total, "cosine", anneal) for s in range(total)]
    assert all(f <= lr_factor(s, total, "cosine") + 1e-12 for s, f in enumerate(factors))
    assert factors[200] == pytest.approx(lr_factor(200, total, "cosine"))
    assert factors[350] == pytest.approx(FINAL_FACTOR) and factors[-1] == pytest.approx(
        FINAL_FACTOR
    )
    assert np.all(np.diff(factors[200:]) <= 1e-12)


def test_no_patience_never_stops():
    assert early_stopping_action(100, None, "cosine", 0.9, False) == "continue"


# -------------------------------------------------------------- cache-path shuffle (pure)


def test_cached_rows_are_permuted_per_epoch_not_only_batches():
    rows = {"id": np.arange(100), "x": np.arange(100) * 2.0}
    e0 = list(cached_batches(rows, 16, drop_last=True, seed=epoch_seed(0, 0, 0)))
    e1 = list(cached_batches(rows, 16, drop_last=True, seed=epoch_seed(0, 1, 0)))
    again = list(cached_batches(rows, 16, drop_last=True, seed=epoch_seed(0, 0, 0)))
    assert len(e0) == len(e1) == 6 and all(len(b["id"]) == 16 for b in e0)
    assert all(np.array_equal(a["id"], b["id"]) for a, b in zip(e0, again, strict=True))
    # Rows, not batches: the first batch of epoch 0 is no batch of the stored order.
    stored = [set(range(i, i + 16)) for i in range(0, 96, 16)]
    assert set(e0[0]["id"]) not in stored
    assert not np.array_equal(
        np.concatenate([b["id"] for b in e0]), np.concatenate([b["id"] for b in e1])
    )
    # Columns stay aligned.
    assert all(np.array_equal(b["x"], b["id"] * 2.0) for b in e0)
    # No seed: stored order, last partial batch kept without drop_last.
    plain = list(cached_batches(rows, 16, drop_last=False, seed=None))
    assert np.array_equal(np.concatenate([b["id"] for b in plain]), rows["id"])


def test_epoch_seeds_differ_by_epoch_and_rank():
    seeds = {epoch_seed(7, e, r) for e in range(5) for r in range(3)}
    assert len(seeds) == 15 and epoch_seed(7, 2, 1) == epoch_seed(7, 2, 1)


# --------------------------------------------------------------------- real Ray, real loop


def _spec(data: Path, tmp: Path, workers: int = 1, **train):
    from distributed_hte.spec import validate_spec

    return validate_spec(
        {
            "name": "loop",
            "kind": "fe_hte",
            "data": {"path": str(data / "data")},
            "model": {"beta_net": {"hidden": []}, "g_net": {"hidden": []}},
            "train": {
                "epochs": 3,
                "batch_size": 1024,
                "lr": 0.02,
                "log_every_s": 60,
                "shuffle_buffer_rows": 4096,
                **train,
            },
            "scaling": {"num_workers": workers},
            "outputs": {"dir": str(tmp)},
        }
    )


@pytest.fixture(scope="module")
def tiny_prepared(sim_tiny):
    """fe_hte plugin inputs (profile, vocabularies) for the tiny data, built once."""
    from distributed_hte.kinds.fe_hte import FeHteKind

    kind = FeHteKind()
    return kind, kind.prepare(_spec(sim_tiny, sim_tiny))


@pytest.fixture()
def driver_data_context():
    """Restore the driver's Ray Data context after a test that configures it for a fit."""
    from ray.data import DataContext

    before = DataContext.get_current().execution_options.preserve_order
    yield
    DataContext.get_current().execution_options.preserve_order = before


def _fit(spec, tiny_prepared, run_dir: Path, materialize: bool = False, row_cache: bool = False):
    """The real loop through trainer.fit on datasets built the way a kind builds them."""
    import ray

    from distributed_hte.data.split import split_datasets
    from distributed_hte.train.ingest import configure_ray_data, file_shuffle
    from distributed_hte.train.trainer import fit

    kind, prepared = tiny_prepared
    plugin = kind.make_plugin(spec, prepared)
    if row_cache:
        plugin.cache_in_memory = True
    configure_ray_data(spec.train)
    ds = ray.data.read_parquet(
        spec.data.path, columns=plugin.columns, shuffle=file_shuffle(spec.train)
    )
    datasets = split_datasets(ds, kind.split_key(spec), spec.train.val_fraction)
    if materialize:
        datasets = {k: v.materialize() for k, v in datasets.items()}
    rows = int(prepared.n_rows * (1 - spec.train.val_fraction))
    return fit(spec, plugin, datasets, rows, run_dir)


def _weights(result):
    import torch

    return torch.load(result.best_model_path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize(
    ("workers", "cached"),
    [(1, True), (2, False)],
    ids=["1-worker-cached-rows", "2-workers-streaming"],
)
def test_same_spec_data_and_seed_give_the_same_fit(
    sim_tiny, tiny_prepared, tmp_path, workers, cached, driver_data_context
):
    """Two runs, same everything: same loss history and weights. Streaming with 2 workers
    is the hard case (the split hands out blocks dynamically); the cached case covers a
    materialised dataset's block order and the in-memory row cache. Two epochs, so the
    second epoch's fresh order is part of what must repeat."""
    # No validation set: it would double the per-epoch pipeline start-ups.
    spec = _spec(sim_tiny, tmp_path, workers, epochs=2, val_fraction=0.0)
    runs = [_fit(spec, tiny_prepared, tmp_path / f"run{i}", cached, cached) for i in range(2)]
    losses = [[h["train_loss"] for h in r.history] for r in runs]
    assert losses[0] == pytest.approx(losses[1], rel=0, abs=REPRO_ATOL), losses
    a, b = (_weights(r) for r in runs)
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=0, atol=REPRO_ATOL, err_msg=k)
    assert runs[0].final_metrics["convergence_reason"] == runs[0].verdict.reason
    # The verdict's gradient test is measured every epoch, and repeats with the run.
    snrs = [[h["grad_snr"] for h in r.history] for r in runs]
    assert all(x is not None and x >= 0 for x in snrs[0]), snrs
    assert snrs[0] == pytest.approx(snrs[1], rel=1e-6)
    assert all(h["grad_snr_param"] for h in runs[0].history)


def test_shuffle_changes_the_batch_order_on_a_real_shard(ray_session):
    """The loop's own epoch iterator over a real streaming split (one per epoch, as in
    training): seeded epochs differ from each other and from the stored order, hold the
    same rows, and replay exactly; no seed keeps the stored order."""
    import ray

    from distributed_hte.train.loop import _epoch_batches

    ds = ray.data.range(8000, override_num_blocks=4).materialize()
    shard = ds.streaming_split(1, equal=True)[0]

    def ids(seed):
        batches = _epoch_batches(shard, None, 500, True, seed, 2000, batch_format="numpy")
        return np.concatenate([b["id"] for b in batches])

    stored, e0, e1, e0_again = (
        ids(None),
        ids(epoch_seed(0, 0, 0)),
        ids(epoch_seed(0, 1, 0)),
        ids(epoch_seed(0, 0, 0)),
    )
    # No seed: each block's rows in stored order (4 blocks, in completion order).
    assert np.count_nonzero(np.diff(stored) != 1) <= 3
    np.testing.assert_array_equal(np.sort(stored), np.arange(8000))
    assert np.count_nonzero(np.diff(e0) != 1) > 1000, "rows mixed across the buffer"
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(np.sort(e0), np.arange(8000))
    np.testing.assert_array_equal(e0, e0_again)


def test_lr_10_diverges_stops_and_says_so(
    sim_tiny, tiny_prepared, tmp_path, caplog, driver_data_context
):
    spec = _spec(sim_tiny, tmp_path, lr=10.0, epochs=6, early_stopping_patience=None)
    with caplog.at_level("WARNING", logger="distributed_hte.train"):
        result = _fit(spec, tiny_prepared, tmp_path / "run")
    v = result.verdict
    assert not result.converged and result.convergence_reason in ("diverged", "non_finite"), v
    assert len(result.history) < 6, "a diverging run stops instead of using every epoch"
    assert "train.lr=10" in v.message and "lower train.lr" in v.suggestion
    assert result.final_metrics["converged"] is False
    assert "not converged" in caplog.text
    from distributed_hte.train.trainer import training_summary

    summary = training_summary(result, 1.0, 1)
    assert summary["converged"] is False and summary["convergence_reason"] == v.reason
    assert summary["lr"] == 10.0 and summary["epochs_run"] == len(result.history)
    check_convergence(spec, v)
    strict = spec.model_copy(
        update={"train": spec.train.model_copy(update={"require_convergence": True})}
    )
    with pytest.raises(ConvergenceError):
        check_convergence(strict, v)


@pytest.mark.parametrize(
    ("value", "parsed"), [(1, 1), ("3", 3), ("60s", "60s"), (" 2.5S ", "2.5s")]
)
def test_checkpoint_every_takes_epochs_or_seconds(value, parsed):
    assert TrainSpec(checkpoint_every=value).checkpoint_every == parsed


@pytest.mark.parametrize("value", [0, "0s", "-5s", "often", "60m"])
def test_checkpoint_every_refuses_what_is_neither(value):
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainSpec(checkpoint_every=value)


def test_checkpoint_schedule_counts_epochs_or_seconds_since_the_last():
    from distributed_hte.train.loop import _checkpoint_due

    assert _checkpoint_due(1, 1, 0.0) and not _checkpoint_due(3, 2, 1e6)
    assert _checkpoint_due(3, 3, 0.0)
    assert _checkpoint_due("60s", 1, 60.0) and not _checkpoint_due("60s", 50, 59.9)
