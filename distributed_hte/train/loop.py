"""The one per-worker training loop every neural kind uses.

A kind plugs in a :class:`TrainPlugin`: build the model, turn a numpy batch into
tensors, the loss on a batch, and additive evaluation sums. The loop does the rest:
seeded shuffled shard iteration (``shuffle.py``, ``ingest.py``), device placement and
DDP through Ray Train, AMP on GPU, LR schedule, all-reduced metrics, checkpoints on the
``train.checkpoint_every`` schedule and at the last epoch (with the best weights so far),
resume from the last checkpoint (the epochs after it run again), early stopping
that respects the schedule (``schedule.py``), a stop on divergence or a non-finite loss,
a convergence verdict in the last epoch's metrics (``convergence.py``), and progress
lines (epoch, rows/s, ETA).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from distributed_hte.runtime import configure_worker_logging
from distributed_hte.train.convergence import assess_convergence, divergence, gradient_snr
from distributed_hte.train.schedule import (
    Anneal,
    early_stopping_action,
    lr_factor,
    scheduled_factor,
    start_anneal,
)
from distributed_hte.train.shuffle import cached_batches, concat_batches, epoch_seed

__all__ = ["TrainPlugin", "lr_factor", "make_optimizer", "train_loop_per_worker"]

log = logging.getLogger("distributed_hte.train")

CHECKPOINT_FILE = "state.pt"
BEST_MODEL_FILE = "best_model.pt"


class TrainPlugin(Protocol):
    """What a model kind gives the generic loop. Must be picklable."""

    columns: list[str]

    def build_model(self) -> nn.Module: ...

    def to_tensors(
        self, batch: dict[str, np.ndarray], device: torch.device
    ) -> dict[str, torch.Tensor]: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss over the batch (a scalar)."""
        ...

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Additive statistics over the batch (summed over batches and workers)."""
        ...

    def eval_metrics(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        """Metrics from summed statistics, keys prefixed with ``prefix`` (train_/val_)."""
        ...

    # Optional: ``after_epoch(model, rows, all_reduce) -> dict`` runs on every rank after
    # each epoch's steps, with the worker's cached rows (None while they are not cached):
    # an exact step the kind takes between epochs; its metrics join the epoch's record.

    # Optional: ``cache_in_memory = True`` keeps a worker's shard rows in its memory
    # after the first epoch (small data: later epochs skip the Ray Data pipeline start-up).


class _RowCache:
    """A worker's shard rows, kept after the first epoch when the plugin asks for it."""

    def __init__(self) -> None:
        self.batches: list[dict[str, np.ndarray]] = []
        self.rows: dict[str, np.ndarray] | None = None


def _epoch_batches(
    shard,
    cache: _RowCache | None,
    batch_size: int,
    drop_last: bool,
    seed: int | None,
    shuffle_buffer_rows: int,
    **iter_kwargs,
):
    """Batches of one epoch: streamed from the shard, or replayed from ``cache``.

    ``seed`` None keeps the stored order. Streaming, a seeded local shuffle buffer of
    ``shuffle_buffer_rows`` mixes rows across blocks; replaying, every row is permuted.
    The batch count is the same on every rank (equal shards), as DDP needs.
    """
    if cache is not None and cache.rows is not None:
        yield from cached_batches(cache.rows, batch_size, drop_last, seed)
        return
    if seed is not None and shuffle_buffer_rows > 0:
        iter_kwargs.update(local_shuffle_buffer_size=shuffle_buffer_rows, local_shuffle_seed=seed)
    for batch in shard.iter_batches(batch_size=batch_size, drop_last=drop_last, **iter_kwargs):
        if cache is not None:
            # Own copies: no pinned object-store buffers are held across epochs.
            batch = {k: np.array(v) for k, v in batch.items()}
            cache.batches.append(batch)
        yield batch
    if cache is not None:
        # One array per column: later epochs permute rows, not only batches.
        cache.rows, cache.batches = concat_batches(cache.batches), []


class _GradientMoments:
    """Per-epoch sums of the step gradients, per parameter tensor, kept on the device (no
    sync per step).

    After DDP's all-reduce every rank holds the same averaged gradient, so the sums agree
    across ranks without communication. Memory: one float64 copy of the parameters.
    Per tensor, because one pooled ratio lets the large, noisy tensors (embeddings that
    oscillate across a steep valley) drown a small layer that is still drifting.
    """

    def __init__(
        self, named: list[tuple[str, nn.Parameter]], device: torch.device, skip_non_finite: bool
    ) -> None:
        self.names = [n.removeprefix("module.") for n, _ in named]
        self.params = [p for _, p in named]
        self.totals = [
            torch.zeros(p.shape, dtype=torch.float64, device=device) for p in self.params
        ]
        self.sq = torch.zeros(len(self.params), dtype=torch.float64, device=device)
        # AMP skips overflow steps, and so must the moments; checking needs a sync per step,
        # so only AMP pays it (without AMP a non-finite gradient stops the run anyway).
        self.skip_non_finite = skip_non_finite
        self.steps = 0

    def add(self) -> None:
        grads = [
            None if p.grad is None else (p.grad.to_dense() if p.grad.is_sparse else p.grad)
            for p in self.params
        ]
        if self.skip_non_finite and not all(
            bool(torch.isfinite(g).all()) for g in grads if g is not None
        ):
            return
        for i, g in enumerate(grads):
            if g is not None:
                g = g.double()
                self.totals[i] += g
                self.sq[i] += g.pow(2).sum()
        self.steps += 1

    def snr(self) -> tuple[float | None, str]:
        """The largest per-tensor :func:`~distributed_hte.train.convergence.gradient_snr`
        of the epoch's steps, and that tensor's name."""
        if self.steps < 2:
            return None, ""
        best: tuple[float | None, str] = (None, "")
        for name, total, sq in zip(self.names, self.totals, self.sq.tolist(), strict=True):
            value = gradient_snr(total.cpu().numpy().ravel(), sq, self.steps)
            if value is not None and (best[0] is None or value > best[0]):
                best = (value, name)
        return best


def _all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    keys = sorted(sums)
    totals = _all_reduce_array(np.array([sums[k] for k in keys], dtype=np.float64), device)
    return dict(zip(keys, totals.tolist(), strict=True))


def _all_reduce_array(values: np.ndarray, device: torch.device) -> np.ndarray:
    """``values`` ``(k,)`` summed over the DDP ranks, as float64 (itself with one worker)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return np.asarray(values, dtype=np.float64)
    t = torch.as_tensor(np.asarray(values, dtype=np.float64), device=device)
    torch.distributed.all_reduce(t)
    return t.cpu().numpy()


def _add(into: dict[str, float], part: dict[str, float]) -> None:
    for k, v in part.items():
        into[k] = into.get(k, 0.0) + float(v)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def make_optimizer(
    model: nn.Module, train: dict[str, Any], plugin: Any = None
) -> torch.optim.Optimizer:
    """Optimizer from the spec's ``train`` section.

    A plugin may split parameters into groups with an ``lr_scale`` (a multiple of the
    scheduled LR); without one, every parameter has scale 1.
    """
    if plugin is not None and hasattr(plugin, "param_groups"):
        params: Any = plugin.param_groups(model)
    else:
        params = [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]
    if train["optimizer"] == "sgd":
        return torch.optim.SGD(
            params, lr=train["lr"], momentum=0.9, weight_decay=train["weight_decay"]
        )
    cls = torch.optim.AdamW if train["optimizer"] == "adamw" else torch.optim.Adam
    return cls(params, lr=train["lr"], weight_decay=train["weight_decay"])


def _checkpoint_due(every: int | str, epochs_since: int, seconds_since: float) -> bool:
    """``every``: N epochs (int) or ``"Ns"`` seconds (see ``TrainSpec.checkpoint_every``)."""
    if isinstance(every, str):
        return seconds_since >= float(every.rstrip("s"))
    return epochs_since >= every


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["lr_scale"] * lr


def _mean_over_ranks(value: torch.Tensor, device: torch.device) -> float:
    """Mean of a scalar over the DDP ranks (the value itself with one worker)."""
    total = _all_reduce_sums({"v": float(value), "n": 1.0}, device)
    return total["v"] / total["n"]


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker function. ``config``: plugin, train (TrainSpec dict), rows."""
    import ray.train
    import ray.train.torch

    plugin: TrainPlugin = config["plugin"]
    train = config["train"]
    rows_per_worker = max(int(config["train_rows"]), 1)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    configure_worker_logging(log)
    torch.manual_seed(train["seed"])
    device = ray.train.torch.get_device()
    use_amp = bool(train["amp"]) and device.type == "cuda"

    model = plugin.build_model().to(device)
    optimizer = make_optimizer(model, train, plugin)
    steps_per_epoch = math.ceil(rows_per_worker / train["batch_size"])
    total_steps = steps_per_epoch * train["epochs"]
    state: dict[str, Any] = {
        "epoch": 0,
        "step": 0,
        "best_val": float("inf"),
        "bad_epochs": 0,
        "best_epoch": -1,
        "history": [],
        "initial_loss": None,
        "anneal": None,  # (start_step, steps, start_factor) once a plateau started one
    }
    best_state: dict[str, torch.Tensor] | None = None

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("init_state"):
        # A warm start (a champion's weights mapped onto this model); a resume never uses it.
        model.load_state_dict(
            torch.load(io.BytesIO(config["init_state"]), map_location=device, weights_only=True)
        )
        if rank == 0:
            log.info("warm start: initial weights from the run's init/state.pt")
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = torch.load(
                os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=False
            )
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            state = {"initial_loss": None, "anneal": None, **saved["state"]}
            best_state = torch.load(
                os.path.join(d, BEST_MODEL_FILE), map_location="cpu", weights_only=False
            )
        if rank == 0:
            log.info("resumed from checkpoint after epoch %d", state["epoch"])

    model = ray.train.torch.prepare_model(model)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if "val" in config["datasets"] else None
    patience = train["early_stopping_patience"]
    first_epoch = state["epoch"]
    # A trailing batch of one row breaks BatchNorm; every rank has the same row count
    # (equal split), so dropping the remainder keeps DDP steps in lockstep.
    drop_last = rows_per_worker >= 2 * train["batch_size"]
    cache_train = _RowCache() if getattr(plugin, "cache_in_memory", False) else None
    cache_val = _RowCache() if cache_train is not None else None
    last_log = time.perf_counter()
    run_started = time.perf_counter()
    # rank 0 alone decides; the other ranks report no checkpoint anyway
    last_checkpoint = {"epoch": first_epoch, "time": run_started}
    rows_done_run = 0
    anneal = Anneal(*state["anneal"]) if state["anneal"] else None

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for epoch in range(state["epoch"], train["epochs"]):
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        grads = _GradientMoments(trainable, device, skip_non_finite=use_amp)
        rows = 0
        t_first: float | None = None
        factor = scheduled_factor(state["step"], total_steps, train["lr_schedule"], anneal)
        for batch in _epoch_batches(
            train_shard,
            cache_train,
            train["batch_size"],
            drop_last,
            epoch_seed(train["seed"], epoch, rank) if train["shuffle"] else None,
            train["shuffle_buffer_rows"],
            batch_format="numpy",
            prefetch_batches=2,
        ):
            if t_first is None:
                t_first = time.perf_counter()
            tensors = plugin.to_tensors(batch, device)
            factor = scheduled_factor(state["step"], total_steps, train["lr_schedule"], anneal)
            _set_lr(optimizer, train["lr"] * factor)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                loss = plugin.loss(model, tensors)
            if state["initial_loss"] is None:
                # The untrained model's loss: the yardstick for divergence (no extra pass).
                state["initial_loss"] = _mean_over_ranks(loss.detach().double(), device)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if use_amp:
                scaler.unscale_(optimizer)  # true gradients for the moments; step() knows
            grads.add()
            scaler.step(optimizer)
            scaler.update()
            n = len(next(iter(batch.values())))
            rows += n
            state["step"] += 1
            # Accumulate on the device: a float() per step would sync a GPU every batch.
            loss_sum = loss_sum + loss.detach().double() * n
            now = time.perf_counter()
            if rank == 0 and now - last_log >= train["log_every_s"]:
                last_log = now
                rate = rows / max(now - (t_first or t0), 1e-9)
                eta_epoch = max(rows_per_worker - rows, 0) / max(rate, 1e-9)
                log.info(
                    "[train] epoch %d/%d  %5.1f%%  %.0f rows/s/worker  loss %.5g  epoch ETA %.0fs",
                    epoch + 1,
                    train["epochs"],
                    100.0 * rows / rows_per_worker,
                    rate,
                    float(loss.detach()),
                    eta_epoch,
                )
        train_seconds = time.perf_counter() - t0
        rows_done_run += rows

        metrics = {
            "epoch": epoch + 1,
            "rows_per_s_per_worker": rows / max(train_seconds, 1e-9),
            # Wait for the first batch of the epoch: Ray Data pipeline start-up.
            "first_batch_seconds": (t_first or t0) - t0,
            # Rate once data flows: what large datasets see, where start-up amortises.
            "steady_rows_per_s_per_worker": rows
            / max(train_seconds - ((t_first or t0) - t0), 1e-9),
            # The LR of the epoch's last step (base LR x schedule factor).
            "lr_factor": factor,
            "lr": train["lr"] * factor,
            "initial_loss": state["initial_loss"],
        }
        # Mean gradient against its step-to-step noise: the convergence verdict's test.
        metrics["grad_snr"], metrics["grad_snr_param"] = grads.snr()
        if hasattr(plugin, "after_epoch"):
            # A kind's exact step between epochs (fe_hte: backfit the fixed effects), on
            # the rows this worker keeps in memory; before validation, so it is judged.
            metrics.update(
                plugin.after_epoch(
                    _unwrap(model),
                    cache_train.rows if cache_train is not None else None,
                    lambda a: _all_reduce_array(a, device),
                )
            )
        train_totals = _all_reduce_sums({"loss_sum": float(loss_sum), "n": float(rows)}, device)
        metrics["train_loss"] = train_totals["loss_sum"] / max(train_totals["n"], 1)
        metrics["rows_per_s"] = train_totals["n"] / max(train_seconds, 1e-9)
        if val_shard is not None:
            model.eval()
            val_sums: dict[str, float] = {}
            with torch.no_grad():
                for batch in _epoch_batches(
                    val_shard,
                    cache_val,
                    max(train["batch_size"], 8192),
                    False,
                    None,
                    0,
                    batch_format="numpy",
                ):
                    _add(
                        val_sums, plugin.eval_sums(_unwrap(model), plugin.to_tensors(batch, device))
                    )
            metrics.update(plugin.eval_metrics(_all_reduce_sums(val_sums, device), "val_"))
        monitored = metrics.get("val_loss", metrics["train_loss"])
        improved = monitored < state["best_val"]
        if improved:
            state.update(best_val=monitored, bad_epochs=0, best_epoch=epoch + 1)
            best_state = {
                k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()
            }
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1

        # Every rank computes the same decisions from all-reduced numbers: no extra sync.
        blown = divergence([*state["history"], metrics])
        action = early_stopping_action(
            state["bad_epochs"], patience, train["lr_schedule"], factor, anneal is not None
        )
        if action == "anneal":
            anneal = start_anneal(
                state["step"], total_steps, steps_per_epoch, int(patience or 1), factor
            )
            state.update(anneal=(anneal.start_step, anneal.steps, anneal.start_factor))
            state["bad_epochs"] = 0
            if rank == 0:
                log.info(
                    "[train] plateau at epoch %d with the LR at %.0f%%: decaying it to the "
                    "floor over the next %d epochs before early stopping may end the run",
                    epoch + 1,
                    100 * factor,
                    math.ceil(anneal.steps / steps_per_epoch),
                )
        stopped_reason = blown or ("early_stopping" if action == "stop" else None)
        stop = stopped_reason is not None
        metrics.update(
            best_epoch=state["best_epoch"],
            best_val_loss=state["best_val"],
            early_stopped=action == "stop",
            stopped_reason=stopped_reason or "",
            resumed_from_epoch=first_epoch,
        )
        metrics["epoch_seconds"] = time.perf_counter() - t0
        if stop or epoch + 1 == train["epochs"]:
            verdict = assess_convergence(
                [*state["history"], metrics],
                epochs=train["epochs"],
                schedule=train["lr_schedule"],
                lr=train["lr"],
                tol=train["convergence_tol"],
            )
            metrics.update(verdict.as_metrics())
        state["history"].append(dict(metrics))

        if rank == 0:
            elapsed = time.perf_counter() - run_started
            epochs_left = train["epochs"] - (epoch + 1)
            log.info(
                "[train] epoch %d/%d done  train_loss %.5g  %s  lr %.3g  %.0f rows/s  ETA %.0fs%s",
                epoch + 1,
                train["epochs"],
                metrics["train_loss"],
                f"val_loss {metrics['val_loss']:.5g}" if "val_loss" in metrics else "",
                metrics["lr"],
                metrics["rows_per_s"],
                elapsed / (epoch + 1 - first_epoch) * epochs_left,
                f"  (stopped: {stopped_reason})" if stop else "",
            )
        last = stop or epoch + 1 == train["epochs"]
        checkpoint_now = last or _checkpoint_due(
            train.get("checkpoint_every", 1),
            epoch + 1 - last_checkpoint["epoch"],
            time.perf_counter() - last_checkpoint["time"],
        )
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and checkpoint_now:
                last_checkpoint.update(epoch=epoch + 1, time=time.perf_counter())
                torch.save(
                    {
                        "model": _unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "state": state,
                    },
                    os.path.join(tmp, CHECKPOINT_FILE),
                )
                torch.save(best_state, os.path.join(tmp, BEST_MODEL_FILE))
                with open(os.path.join(tmp, "metrics.json"), "w") as f:
                    json.dump(metrics, f)
                with open(os.path.join(tmp, "history.json"), "w") as f:
                    json.dump(state["history"], f)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if stop:
            break
    return {"state": state, "rows_trained": rows_done_run, "world_size": world}
