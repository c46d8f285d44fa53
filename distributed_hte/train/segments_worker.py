"""Ray Train worker of the distributed group-lasso solve (kind ``segments``).

Every worker holds the same coefficients and its own shard of people. A data pass sums
loss, gradient and per-creative Hessians over the shard; one all-reduce makes the sums
global, and every rank then runs the identical, data-free Newton model solve and line
search, so the replicas never diverge (checked at the end, reported as
``replica_max_abs_diff``). The shard is kept in worker memory when it fits
``cache_gb``; otherwise it streams from Ray Data on every pass, which keeps memory flat
in the number of people.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distributed_hte.estimators.crossfit import assign_folds
from distributed_hte.models.segments import (
    CreativeBlock,
    DataPass,
    Layout,
    Params,
    PassStats,
    SolveInfo,
    fit_path,
    penalty,
)

log = logging.getLogger("distributed_hte.train")

RESULT_FILE = "solution.pt"
BLOCK_ROWS = 32_768


@dataclass
class SegmentsEncoder:
    """Turns a numpy batch into solver inputs (picklable; built from the data profile).

    Creatives are keyed by (segment index, creative index) so that creative ids may be
    unique globally or only within a segment; ``pair_keys`` is the sorted key of every
    creative, and its position is the creative's index in the solver.
    """

    segment: str
    creative: str
    label: str
    features: list[str]
    segment_vocab: np.ndarray  # (m,)
    creative_vocab: np.ndarray  # (V,) distinct creative ids
    pair_keys: np.ndarray  # (C,) int64, sorted: segment index × V + creative index
    mean: np.ndarray  # (p,)
    scale: np.ndarray  # (p,)
    n_folds: int
    fold_key: list[str]

    def layout(self) -> Layout:
        seg = torch.as_tensor(self.pair_keys // len(self.creative_vocab), dtype=torch.int64)
        return Layout(seg, len(self.segment_vocab), len(self.features))

    def creative_index(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``(n,)`` creative index and ``(n,)`` mask of rows whose creative is known."""
        seg = _lookup(self.segment_vocab, np.asarray(batch[self.segment]))
        cre = _lookup(self.creative_vocab, np.asarray(batch[self.creative]))
        key = seg * len(self.creative_vocab) + cre
        idx = _lookup(self.pair_keys, key)
        known = (seg >= 0) & (cre >= 0) & (idx >= 0)
        return np.where(known, idx, 0), known

    def features_matrix(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """``(n, p)`` float32 standardised covariates."""
        x = np.column_stack([np.asarray(batch[c], dtype=np.float64) for c in self.features])
        return ((x - self.mean) / self.scale).astype(np.float32)

    def encode(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """``creative (n,)``, ``x (n, p)``, ``y (n,)``, ``fold (n,)`` of a training batch."""
        idx, _ = self.creative_index(batch)
        x = self.features_matrix(batch)
        y = np.asarray(batch[self.label], dtype=np.float64)
        fold = assign_folds(batch, self.fold_key, self.n_folds)
        return idx, x, y, fold


def _lookup(vocab: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Position of each value in sorted ``vocab``, −1 where absent."""
    pos = np.minimum(np.searchsorted(vocab, values), len(vocab) - 1)
    return np.where(vocab[pos] == values, pos, -1).astype(np.int64)


def group_blocks(
    idx: np.ndarray, x: np.ndarray, y: np.ndarray, fold: np.ndarray, max_rows: int = BLOCK_ROWS
) -> Iterator[CreativeBlock]:
    """Split one encoded batch into blocks of rows that saw the same creative."""
    order = np.argsort(idx, kind="stable")
    idx, x, y, fold = idx[order], x[order], y[order], fold[order]
    bounds = np.flatnonzero(np.diff(idx)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(idx)], strict=True):
        for a in range(lo, hi, max_rows):
            b = min(a + max_rows, hi)
            yield (
                int(idx[a]),
                torch.from_numpy(x[a:b]),
                torch.from_numpy(y[a:b]),
                torch.from_numpy(fold[a:b]),
            )


def cache_blocks(
    batches: Iterable[dict[str, np.ndarray]], enc: SegmentsEncoder
) -> list[CreativeBlock]:
    """Read a shard once into per-creative blocks held in memory."""
    parts = [enc.encode(b) for b in batches]
    if not parts:
        return []
    idx, x, y, fold = (np.concatenate([p[i] for p in parts]) for i in range(4))
    return list(group_blocks(idx, x, y, fold))


def _reduce_fn(device: torch.device):
    """Sum a list of tensors over ranks in place, one all-reduce per dtype."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None

    def reduce(tensors: list[torch.Tensor]) -> None:
        # A fixed order on every rank: a set of dtypes iterates in hash (address) order,
        # which differs between processes and pairs mismatched collectives.
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in group]).to(device)
            dist.all_reduce(flat)
            off = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[off : off + n].view_as(t).to(t.device))
                off += n

    return reduce


def _replica_difference(params: Params) -> float:
    """Largest |θ_rank − θ_rank0| over all coefficients and ranks (0 on one worker)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    mine = params.flat().clone()
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    diff = (mine - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def step_metrics(
    info: SolveInfo, stats: PassStats, params: Params, n_folds: int, path_index: int, layout: Layout
) -> dict[str, Any]:
    """Metrics of one λ on the path: CV held-out log loss (pooled and per fold), refit fit."""
    out: dict[str, Any] = {
        "path_step": path_index + 1,
        "lam": info.lam,
        "alpha": info.alpha,
        "newton_iterations": info.newton_iterations,
        "data_passes": info.data_passes,
        "kkt_max": max(info.kkt),
        "converged": all(info.converged),
        "solve_seconds": info.seconds,
    }
    refit = params.c.shape[0] - 1
    assert stats.heldout_loss is not None and stats.heldout_n is not None
    if n_folds > 1:
        held = stats.heldout_loss[:n_folds]
        held_n = stats.heldout_n[:n_folds].clamp_min(1.0)
        per_fold = (held / held_n).tolist()
        out["cv_log_loss"] = float(held.sum() / held_n.sum())
        out["cv_log_loss_se"] = float(np.std(per_fold, ddof=1) / np.sqrt(n_folds))
        out["val_loss"] = out["cv_log_loss"]
        for f, v in enumerate(per_fold):
            out[f"fold{f}_log_loss"] = v
    out["train_log_loss"] = float(stats.loss[refit] / stats.n[refit].clamp_min(1.0))
    out["objective"] = info.objective[refit]
    out["penalty"] = float(penalty(params, info.lam, info.alpha, layout)[refit])
    out["nonzero_gamma"] = int((params.gamma[refit] != 0).sum())
    out["nonzero_delta"] = int((params.delta[refit].norm(dim=-1) > 0).sum())
    return out


def segments_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: ``config`` holds encoder, model (dict), cache_gb, log_every_s."""
    import ray.train
    import ray.train.torch

    from distributed_hte.runtime import configure_worker_logging

    enc: SegmentsEncoder = config["encoder"]
    model = config["model"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    configure_worker_logging(log)

    layout = enc.layout().to(device)
    shard = ray.train.get_dataset_shard("train")
    p = len(enc.features)
    shard_bytes = config["rows_per_worker"] * (p * 4 + 24)
    t0 = time.perf_counter()

    def stream() -> Iterator[CreativeBlock]:
        for batch in shard.iter_batches(
            batch_size=65_536, batch_format="numpy", prefetch_batches=2
        ):
            yield from group_blocks(*enc.encode(batch))

    cached = shard_bytes <= config["cache_gb"] * 1e9
    if cached:
        blocks = cache_blocks(shard.iter_batches(batch_size=65_536, batch_format="numpy"), enc)
        if device.type != "cpu":
            blocks = [(k, x.to(device), y.to(device), f.to(device)) for k, x, y, f in blocks]
        source = lambda: iter(blocks)  # noqa: E731
        if rank == 0:
            log.info(
                "[solve] shard cached in worker memory (%.2f GB) in %.1fs",
                shard_bytes / 1e9,
                time.perf_counter() - t0,
            )
    else:
        source = stream
        if rank == 0:
            log.info(
                "[solve] shard of %.2f GB streams from Ray Data on every pass", shard_bytes / 1e9
            )

    data = DataPass(source, layout, enc.n_folds, _reduce_fn(device))
    n_problems = enc.n_folds + 1 if enc.n_folds > 1 else 1
    path: list[dict[str, Any]] = []
    started = time.perf_counter()
    last_log = [started]

    def on_iteration(rec: dict) -> None:
        now = time.perf_counter()
        if rank == 0 and now - last_log[0] >= config["log_every_s"]:
            last_log[0] = now
            log.info(
                "[solve] λ=%.4g  Newton it %d  KKT %.2e  %d passes  %.0fs",
                rec["lam"],
                rec["iteration"],
                rec["kkt_max"],
                data.passes,
                now - started,
            )

    state: dict[str, Any] = {}
    refit_path: list[dict[str, Any]] = []

    def on_step(params: Params, info: SolveInfo, stats: PassStats) -> None:
        metrics = step_metrics(info, stats, params, enc.n_folds, len(path), layout)
        metrics["passes_total"] = data.passes
        metrics["seconds"] = time.perf_counter() - started
        path.append(metrics)
        # The refit (last problem) at every λ: the driver may select a λ on the path by CV.
        refit_path.append(
            {
                "c": params.c[-1].cpu().clone(),
                "gamma": params.gamma[-1].cpu().clone(),
                "delta": params.delta[-1].cpu().clone(),
                "info": dict(info.__dict__, history=None),
            }
        )
        if rank == 0:
            log.info(
                "[solve] path %d/%d  λ=%.4g  %s  KKT %.1e  nonzero γ %d  δ %d  (%d Newton its)",
                len(path),
                len(state["lams"]),
                info.lam,
                f"CV log loss {metrics['cv_log_loss']:.5f}" if "cv_log_loss" in metrics else "",
                metrics["kkt_max"],
                metrics["nonzero_gamma"],
                metrics["nonzero_delta"],
                info.newton_iterations,
            )
        final = info.lam == model["lam"]
        if not final:
            ray.train.report(metrics)
            return
        metrics["replica_max_abs_diff"] = _replica_difference(params)
        metrics["cached_in_worker_memory"] = cached
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                torch.save(
                    {
                        "c": params.c.cpu(),
                        "gamma": params.gamma.cpu(),
                        "delta": params.delta.cpu(),
                        "info": info.__dict__,
                        "path": path,
                        "refit_path": refit_path,
                        "lam_max": state.get("lam_max"),
                        "metrics": metrics,
                    },
                    os.path.join(tmp, RESULT_FILE),
                )
                with open(os.path.join(tmp, "metrics.json"), "w") as f:
                    json.dump(metrics, f)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)

    def on_path(lams: list[float], lam_max: float) -> None:
        state["lams"], state["lam_max"] = lams, lam_max
        if rank == 0:
            log.info("[solve] λ_max %.4g; path of %d λ down to %.4g", lam_max, len(lams), lams[-1])

    fit_path(
        data,
        n_problems,
        model["lam"],
        model["alpha"],
        tol=model["tol"],
        max_iter=model["max_iter"],
        path_steps=model["path_steps"],
        on_step=on_step,
        on_iteration=on_iteration,
        on_path=on_path,
    )


def exact_split_config():
    """A Ray Train ``DataConfig`` whose shards drop no rows.

    Ray's default splits with ``streaming_split(equal=True)``, which may drop rows to
    give every worker the same count: harmless for SGD, wrong for an exact objective
    (1 and 2 workers would solve different problems). Every pass here is a lockstep
    barrier anyway, so unequal shards cost nothing.
    """
    from ray.train import DataConfig

    class ExactSplit(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(
                    ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
                ):
                    output[i][name] = split
            return output

    return ExactSplit()
