"""What Ray Data tasks and Ray Train workers of kind ``aipw_segments`` run.

Three streaming passes build the fit, one scores:

1. :func:`scan_block` (prepare): value checks, the per-arm histograms of the key's hash
   (stratified fold cuts), categorical levels, segment values / quantile counts.
2. :func:`fold_stats_block` (prepare): per fold, numeric sums and histograms (medians)
   and categorical level counts; the preprocessing of fold k's models is fitted on the
   rows of the other folds (``total − fold k``).
3. :func:`nuisance_worker` (one Ray Train run): Newton passes of every fold's
   propensity and outcome models at once, gradients and Hessians all-reduced.
4. :func:`score_block` (evaluate): out-of-fold ê, μ̂1, μ̂0 with each row's own fold's
   models, clipping, AIPW scores and one row of per-segment sums per batch.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distributed_hte.estimators import aipw as est
from distributed_hte.estimators.crossfit import (
    assign_stratified_folds,
    hash_unit,
    unit_histogram,
)
from distributed_hte.kinds.toolkit import RowFilter

log = logging.getLogger("distributed_hte.aipw_segments")

MEDIAN_BINS = 2048  # histogram bins per numeric column for the training-fold medians
METRIC_BINS = 2000  # score bins of the binned ROC AUC / average precision
OVERLAP_BINS = 50  # propensity histogram bins on [0, 1]
MAX_QUANTILE_VALUES = 200_000  # distinct values a quantile segmentation counts exactly
# Per-segment sums, in this order (one column of a (segments, STATS) array).
STATS = (
    "n", "n_t", "sy_t", "sy_c", "syy_t", "syy_c", "spsi", "spsi2", "n_clip", "se_t", "se_c",
    "s_tau", "n_tau", "spsi3", "ev_t", "ev_c",
)  # fmt: skip
# ev_t, ev_c: expected outcomes Σ t·μ̂1 and Σ (1 − t)·μ̂0 from the out-of-fold outcome
# model (the events filter; see SegmentRule)
_S = {name: i for i, name in enumerate(STATS)}
RESULT_FILE = "nuisance.npz"


# ----------------------------------------------------------------------------- columns


def as_float(col: Any) -> np.ndarray:
    """A numeric (or boolean) column as float64 with NaN for nulls."""
    if isinstance(col, pa.ChunkedArray | pa.Array):
        if pa.types.is_boolean(col.type):
            col = pc.cast(col, pa.int8())
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    arr = np.asarray(col)
    if arr.dtype == object:
        return np.array([np.nan if v is None else float(v) for v in arr])
    return arr.astype(np.float64)


def as_text(col: Any) -> np.ndarray:
    """A categorical column as a unicode array; nulls become ``""`` (mask via ``== ""``)."""
    if isinstance(col, pa.ChunkedArray | pa.Array):
        col = pc.fill_null(pc.cast(col, pa.string()), "")
        return np.asarray(col.to_numpy(zero_copy_only=False)).astype(str)
    arr = np.asarray(col)
    if arr.dtype == object:
        return np.array(["" if v is None or v != v else str(v) for v in arr])
    return arr.astype(str)


# ----------------------------------------------------------------------------- segments


@dataclass(frozen=True)
class SegmentRule:
    """How one column maps rows to segments: ``codes`` gives ``0..L-1``, ``-1`` outside."""

    column: str
    rule: str  # values | bins | quantiles
    labels: tuple[str, ...]
    edges: tuple[float, ...] = ()  # bins: the spec's edges; quantiles: the cuts
    levels: tuple[str, ...] = ()  # values: the distinct values, as text
    min_rows: int = 1000
    min_treated: int = 50
    min_control: int = 500
    # Binary outcomes: the expected count of the rarer outcome value among a segment's
    # treated (control) rows, from the out-of-fold outcome model, min(Σ μ̂, Σ (1 − μ̂)).
    # 0 turns the filter off (continuous outcomes; bundles written before it existed).
    min_treated_events: float = 0.0
    min_control_events: float = 0.0

    def codes(self, col: Any) -> np.ndarray:
        if self.rule == "values":
            v = as_text(col)
            levels = np.asarray(self.levels)
            i = np.searchsorted(levels, v)
            i = np.minimum(i, len(levels) - 1)
            return np.where(levels[i] == v, i, -1).astype(np.int64)
        x = as_float(col)
        e = np.asarray(self.edges)
        if self.rule == "bins":  # (a, b], as pandas.cut
            i = np.searchsorted(e, x, side="left") - 1
            ok = (x > e[0]) & (x <= e[-1])
        else:  # quantiles: x <= cut_1 → 0, ties to the lower bin
            i = np.searchsorted(e, x, side="left")
            ok = ~np.isnan(x)
        return np.where(ok, i, -1).astype(np.int64)


# ----------------------------------------------------------------------------- design


@dataclass
class FoldEncoder:
    """Preprocessing fitted on one fold's training rows (sklearn's notebook pipeline).

    Numeric: median impute then standardise (``mean``/``scale`` of the imputed values,
    ddof 0, scale 1 for a constant). Categorical: most-frequent impute, one-hot of the
    levels seen at least ``min_frequency`` times (sorted), plus one column for the rarer
    levels when there are any; unseen levels go there too (or nowhere when there is none:
    ``handle_unknown="infrequent_if_exist"``).
    """

    median: np.ndarray  # (p,)
    mean: np.ndarray  # (p,)
    scale: np.ndarray  # (p,)
    t_mean: float  # the pooled outcome model's treatment column
    t_scale: float
    levels: list[np.ndarray]  # per categorical column: frequent levels (sorted text)
    infrequent: list[bool]
    fill: list[str]  # most frequent level (null imputation)

    def numeric(self, num: np.ndarray) -> np.ndarray:
        x = np.where(np.isnan(num), self.median[None, :], num)
        return (x - self.mean[None, :]) / self.scale[None, :]

    def onehot(self, cats: list[np.ndarray]) -> np.ndarray:
        parts = []
        for v, levels, infreq, fill in zip(
            cats, self.levels, self.infrequent, self.fill, strict=True
        ):
            v = np.where(v == "", fill, v)
            width = len(levels) + int(infreq)
            out = np.zeros((len(v), width))
            if len(levels):
                i = np.minimum(np.searchsorted(levels, v), len(levels) - 1)
                known = levels[i] == v
                out[np.flatnonzero(known), i[known]] = 1.0
            else:
                known = np.zeros(len(v), dtype=bool)
            if infreq:
                out[~known, -1] = 1.0
            parts.append(out)
        return np.concatenate(parts, axis=1) if parts else np.zeros((0, 0))

    def propensity_design(self, num: np.ndarray, cats: list[np.ndarray]) -> np.ndarray:
        return _hstack(self.numeric(num), self.onehot(cats) if cats else None, len(num))

    def outcome_design(self, num: np.ndarray, cats: list[np.ndarray], t: np.ndarray) -> np.ndarray:
        tz = ((t - self.t_mean) / self.t_scale)[:, None]
        return _hstack(
            np.concatenate([self.numeric(num), tz], axis=1),
            self.onehot(cats) if cats else None,
            len(num),
        )


def _hstack(a: np.ndarray, b: np.ndarray | None, n: int) -> np.ndarray:
    return a if b is None or b.size == 0 and b.shape[1] == 0 else np.concatenate([a, b], axis=1)


@dataclass
class Design:
    """Everything a task needs to turn a batch into folds, designs and segments."""

    key: str
    treatment: str
    outcome: str
    numeric: list[str]
    categorical: list[str]
    n_folds: int
    fold_salt: int
    fold_cuts: np.ndarray | None  # (2, folds-1) per arm; None with a fold column
    fold_column: str | None
    encoders: list[FoldEncoder]
    outcome_model: str  # pooled | by_arm
    link: str  # logit | identity (outcome)
    segments: list[SegmentRule] = field(default_factory=list)

    def roles(self) -> list[str]:
        if self.outcome_model == "pooled":
            return ["propensity", "outcome"]
        return ["propensity", "outcome_treated", "outcome_control"]

    def columns(self) -> list[str]:
        cols = [self.key, self.treatment, self.outcome, *self.numeric, *self.categorical]
        if self.fold_column:
            cols.append(self.fold_column)
        return cols

    def folds(self, batch: dict[str, Any], t: np.ndarray) -> np.ndarray:
        if self.fold_column:
            return as_float(batch[self.fold_column]).astype(np.int64)
        assert self.fold_cuts is not None
        keys = {self.key: _key_array(batch[self.key])}
        return assign_stratified_folds(
            keys, [self.key], t.astype(np.int64), self.fold_cuts, self.fold_salt
        )

    def raw(self, batch: dict[str, Any]) -> RawBlock:
        t = as_float(batch[self.treatment])
        num = (
            np.stack([as_float(batch[c]) for c in self.numeric], axis=1)
            if self.numeric
            else np.zeros((len(t), 0))
        )
        return RawBlock(
            num=num,
            cats=[as_text(batch[c]) for c in self.categorical],
            t=t,
            y=as_float(batch[self.outcome]),
            fold=self.folds(batch, t),
        )

    def model_rows(
        self, role: str, blk: RawBlock, k: int, held_out: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(x, target)`` of model ``role`` of fold k on a block's training rows (fold ≠ k),
        or with ``held_out`` on the rows it never saw (fold = k)."""
        m = blk.fold == k if held_out else blk.fold != k
        if role == "outcome_treated":
            m &= blk.t == 1
        elif role == "outcome_control":
            m &= blk.t == 0
        enc = self.encoders[k]
        num, cats = blk.num[m], [c[m] for c in blk.cats]
        if role == "propensity":
            return enc.propensity_design(num, cats), blk.t[m]
        if role == "outcome":
            return enc.outcome_design(num, cats, blk.t[m]), blk.y[m]
        return enc.propensity_design(num, cats), blk.y[m]

    def width(self, role: str, k: int) -> int:
        """Columns of model ``role`` of fold k (without the intercept)."""
        enc = self.encoders[k]
        cat = sum(len(lv) + int(f) for lv, f in zip(enc.levels, enc.infrequent, strict=True))
        return len(self.numeric) + cat + (1 if role == "outcome" else 0)

    def link_of(self, role: str) -> str:
        return "logit" if role == "propensity" else self.link

    def predict(
        self, betas: dict[tuple[str, int], np.ndarray], blk: RawBlock
    ) -> dict[str, np.ndarray]:
        """Out-of-fold ê, μ̂1, μ̂0 ``(n,)``: every row with its own fold's models."""
        n = len(blk.t)
        e, mu1, mu0 = np.zeros(n), np.zeros(n), np.zeros(n)
        for k in range(self.n_folds):
            m = blk.fold == k
            if not m.any():
                continue
            enc = self.encoders[k]
            num, cats = blk.num[m], [c[m] for c in blk.cats]
            xp = enc.propensity_design(num, cats)
            e[m] = est.predict_glm(xp, betas[("propensity", k)], "logit")
            if self.outcome_model == "pooled":
                ones = np.ones(int(m.sum()))
                b = betas[("outcome", k)]
                mu1[m] = est.predict_glm(enc.outcome_design(num, cats, ones), b, self.link)
                mu0[m] = est.predict_glm(enc.outcome_design(num, cats, 0 * ones), b, self.link)
            else:
                mu1[m] = est.predict_glm(xp, betas[("outcome_treated", k)], self.link)
                mu0[m] = est.predict_glm(xp, betas[("outcome_control", k)], self.link)
        return {"e": e, "mu1": mu1, "mu0": mu0}


@dataclass
class RawBlock:
    num: np.ndarray  # (n, p) float64, NaN = missing
    cats: list[np.ndarray]  # per categorical column (n,) text, "" = missing
    t: np.ndarray
    y: np.ndarray
    fold: np.ndarray

    def nbytes(self) -> int:
        return self.num.nbytes + sum(c.nbytes for c in self.cats) + 3 * self.t.nbytes


def _key_array(col: Any) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray | pa.Array):
        col = col.to_numpy(zero_copy_only=False)
    arr = np.asarray(col)
    # text keys hash as Python objects (pandas' hash_array takes no unicode buffers)
    return arr.astype(object) if arr.dtype.kind in "OU" else arr


# ----------------------------------------------------------------------------- pass 1: scan


def scan_block(
    table: pa.Table,
    key: str,
    treatment: str,
    outcome: str,
    numeric: list[str],
    categorical: list[str],
    fold_column: str | None,
    n_folds: int,
    fold_salt: int,
    segment_values: list[str],
    segment_numeric: list[str],
    bins: dict[str, list[float]],
) -> dict[str, list[bytes]]:
    """One pickled summary of a block: what prepare checks and what the cuts need."""
    n = table.num_rows
    t = as_float(table.column(treatment))
    y = as_float(table.column(outcome))
    out: dict[str, Any] = {"n": n}
    t_ok = (t == 0) | (t == 1)
    out["t_bad"] = int((~t_ok).sum())
    out["t_bad_example"] = float(t[~t_ok][0]) if (~t_ok).any() else None
    out["n_t"] = float(np.sum(t == 1))
    out["y_nan"] = int(np.sum(~np.isfinite(y)))
    fin = y[np.isfinite(y)]
    out["y_nonbinary"] = int(np.sum((fin != 0) & (fin != 1)))
    out["num_nonfinite"] = {c: int(np.isinf(as_float(table.column(c))).sum()) for c in numeric}
    num = {c: as_float(table.column(c)) for c in numeric}
    out["num_nan"] = {c: int(np.isnan(v).sum()) for c in numeric for v in [num[c]]}
    out["num_lo"] = {
        c: float(np.nanmin(v)) if (~np.isnan(v)).any() else np.inf for c, v in num.items()
    }
    out["num_hi"] = {
        c: float(np.nanmax(v)) if (~np.isnan(v)).any() else -np.inf for c, v in num.items()
    }
    if fold_column:
        f = as_float(table.column(fold_column))
        out["fold_bad"] = int(np.sum(~np.isin(f, np.arange(n_folds))))
    else:
        keys = {key: _key_array(table.column(key))}
        unit = hash_unit(keys, [key], fold_salt)
        arm = np.where(t_ok, t, 0).astype(np.int64)
        out["unit_hist"] = unit_histogram(unit, arm, 2)
    out["levels"] = {c: _value_counts(table.column(c)) for c in categorical}
    out["seg_values"] = {c: _value_counts(table.column(c)) for c in segment_values}
    out["seg_numeric"] = {}
    for c in segment_numeric:
        v = as_float(table.column(c))
        info: dict[str, Any] = {"nan": int(np.isnan(v).sum())}
        if c in bins:
            e = np.asarray(bins[c])
            info["outside"] = int(np.sum((v <= e[0]) | (v > e[-1])))
            bad = v[(v <= e[0]) | (v > e[-1])]
            info["example"] = float(bad[0]) if len(bad) else None
        else:
            vals, counts = np.unique(v[~np.isnan(v)], return_counts=True)
            info["values"], info["counts"] = vals, counts
        out["seg_numeric"][c] = info
    return {"summary": [pickle.dumps(out)]}


def _value_counts(col: Any) -> dict[str, int]:
    vals, counts = np.unique(as_text(col), return_counts=True)
    return dict(zip(vals.tolist(), counts.tolist(), strict=True))


# ----------------------------------------------------------------------------- pass 2: fold stats


def fold_stats_block(
    batch: dict[str, Any], design: Design, lo: np.ndarray, hi: np.ndarray
) -> dict[str, list[bytes]]:
    """Per fold: non-missing count, sum, sum of squares and histogram of every numeric
    column; level counts of every categorical column; treatment sums."""
    blk = design.raw(batch)
    K, p = design.n_folds, blk.num.shape[1]
    width = np.where(hi > lo, hi - lo, 1.0)
    out: dict[str, Any] = {
        "n": np.bincount(blk.fold, minlength=K).astype(np.float64),
        "t": np.bincount(blk.fold, weights=blk.t, minlength=K),
        "cnt": np.zeros((K, p)),
        "sum": np.zeros((K, p)),
        "ssq": np.zeros((K, p)),
        "hist": np.zeros((K, p, MEDIAN_BINS)),
        "levels": [dict() for _ in design.categorical],
    }
    for k in range(K):
        m = blk.fold == k
        x = blk.num[m]
        ok = ~np.isnan(x)
        xz = np.where(ok, x, 0.0)
        out["cnt"][k] = ok.sum(axis=0)
        out["sum"][k] = xz.sum(axis=0)
        out["ssq"][k] = (xz * xz).sum(axis=0)
        for j in range(p):
            v = x[ok[:, j], j]
            b = np.clip(((v - lo[j]) / width[j] * MEDIAN_BINS).astype(np.int64), 0, MEDIAN_BINS - 1)
            out["hist"][k, j] = np.bincount(b, minlength=MEDIAN_BINS)
        for i, c in enumerate(blk.cats):
            vals, counts = np.unique(c[m], return_counts=True)
            for v, cnt in zip(vals.tolist(), counts.tolist(), strict=True):
                out["levels"][i].setdefault(v, np.zeros(K))[k] += cnt
    return {"stats": [pickle.dumps(out)]}


# ----------------------------------------------------------------------------- pass 3: Newton


def nuisance_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: Newton passes of all folds' nuisance models at once.

    Every pass computes, on this worker's shard, the loss, gradient and Hessian of each
    (role, fold) model on its training rows, all-reduces them, and takes the penalised
    Newton step on every rank (the same numbers everywhere, so replicas stay equal).
    Rank 0 reports the coefficients as a checkpoint.
    """
    import ray.train
    import torch

    design: Design = config["design"]
    C, tol, max_iter = config["C"], config["tol"], config["max_iter"]
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(1)
    shard = ray.train.get_dataset_shard("train")
    t0 = time.perf_counter()

    def stream():
        for b in shard.iter_batches(batch_size=65_536, batch_format="numpy", prefetch_batches=2):
            yield design.raw(b)

    cached = config["shard_bytes"] <= config["cache_gb"] * 1e9
    if cached:
        blocks = list(stream())
        source = lambda: iter(blocks)  # noqa: E731
    else:
        source = stream
    roles, K = design.roles(), design.n_folds
    keys = [(r, k) for r in roles for k in range(K)]
    beta = {key: np.zeros(design.width(*key) + 1) for key in keys}
    prev: dict[tuple[str, int], tuple[np.ndarray, float]] = {}
    done = dict.fromkeys(keys, False)
    info: dict[str, Any] = {"iterations": 0, "backtracks": 0, "objective": {}, "n": {}}
    last_log = time.perf_counter()
    for it in range(max_iter):
        sums = {key: np.zeros(2 + len(b) + len(b) ** 2) for key, b in beta.items()}
        for blk in source():  # one pass: every (role, fold) model at once
            for key in keys:
                x, target = design.model_rows(key[0], blk, key[1])
                if len(target):
                    s = est.glm_sums(x, target, beta[key], design.link_of(key[0]))
                    sums[key] += np.concatenate([[s.loss, s.n], s.grad, s.hess.ravel()])
        flat = torch.from_numpy(np.concatenate([sums[key] for key in keys]))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flat)
        flat = flat.numpy()
        off, worst = 0, 0.0
        for key in keys:
            b = beta[key]
            d = len(b)
            chunk = flat[off : off + 2 + d + d * d]
            off += len(chunk)
            s = est.GlmSums(chunk[0], chunk[2 : 2 + d], chunk[2 + d :].reshape(d, d), chunk[1])
            step, obj = est.penalised_newton_step(s, b, C)
            pen = np.full(d, 1.0 / C)
            pen[-1] = 0.0
            gmax = float(np.max(np.abs(s.grad + pen * b)) / max(s.n, 1.0))
            if key in prev and obj > prev[key][1] + 1e-12 * abs(prev[key][1]):
                old = prev[key][0]  # the last step overshot: back half way, evaluate again
                beta[key] = old + 0.5 * (b - old)
                info["backtracks"] += 1
                worst = np.inf
                continue
            worst = max(worst, gmax)
            done[key] = gmax < tol
            if not done[key]:
                prev[key] = (b, obj)
                beta[key] = b + step
            info["objective"][f"{key[0]}:{key[1]}"] = obj
            info["n"][f"{key[0]}:{key[1]}"] = float(s.n)
        info["iterations"] = it + 1
        info["max_scaled_gradient"] = worst
        if rank == 0 and time.perf_counter() - last_log > config["log_every_s"]:
            log.warning("[nuisance] pass %d: max |gradient|/rows %.3g", it + 1, worst)
            last_log = time.perf_counter()
        if all(done.values()):
            break
    # Out-of-fold loss of every model on its held-out fold (the outcome models at the
    # observed arm): the cross-validated nuisance loss a Tune sweep ranks trials by.
    held = {(name, k): np.zeros(2) for name in ("propensity", "outcome") for k in range(K)}
    for blk in source():
        for r, k in keys:
            x, target = design.model_rows(r, blk, k, held_out=True)
            if len(target):
                link = design.link_of(r)
                p = est.predict_glm(x, beta[(r, k)], link)
                name = "propensity" if r == "propensity" else "outcome"
                held[(name, k)] += [_loss(target, p, link), len(target)]
    hv = torch.from_numpy(np.concatenate([held[h] for h in sorted(held)]))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(hv)
    hv = hv.numpy().reshape(-1, 2)
    info["val_loss"] = float(np.mean(hv[:, 0] / np.maximum(hv[:, 1], 1.0)))
    info["converged"] = bool(all(done.values()))
    info["seconds"] = time.perf_counter() - t0
    info["cached_in_worker_memory"] = cached
    metrics = {
        "val_loss": info["val_loss"],
        "iterations": info["iterations"],
        "converged": info["converged"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            arrays = {f"beta:{r}:{k}": b for (r, k), b in beta.items()}
            arrays["info"] = np.frombuffer(pickle.dumps(info), dtype=np.uint8)
            np.savez(os.path.join(tmp, RESULT_FILE), **arrays)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def _loss(y: np.ndarray, p: np.ndarray, link: str) -> float:
    """Summed log loss (logit) or squared error (identity) of predictions ``p``."""
    if link == "logit":
        q = np.clip(p, 1e-15, 1 - 1e-15)
        return -float(np.sum(y * np.log(q) + (1 - y) * np.log(1 - q)))
    return float(np.sum((p - y) ** 2))


# ----------------------------------------------------------------------------- pass 4: scores


def _scored(
    batch: dict[str, Any],
    design: Design,
    betas: dict[tuple[str, int], np.ndarray],
    clip: float,
    rows: RowFilter | None,
) -> tuple[dict[str, Any], RawBlock, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    if rows is not None:
        keep = rows.mask({rows.column: np.asarray(batch[rows.column])})
        batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
    blk = design.raw(batch)
    pred = design.predict(betas, blk)
    psi, clipped = est.aipw_scores(blk.t, blk.y, pred["e"], pred["mu1"], pred["mu0"], clip)
    return batch, blk, pred, psi, clipped


def score_block(
    batch: dict[str, Any],
    design: Design,
    betas: dict[tuple[str, int], np.ndarray],
    clip: float,
    tau: str | None = None,
    rows: RowFilter | None = None,
) -> dict[str, list[bytes]]:
    """One row of sums per batch: global and per-segment ``STATS``, propensity overlap,
    per-fold binned nuisance metrics."""
    batch, blk, pred, psi, clipped = _scored(batch, design, betas, clip, rows)
    t, y, e = blk.t, blk.y, pred["e"]
    n = len(t)
    cols = np.zeros((n, len(STATS)))
    cols[:, _S["n"]] = 1.0
    cols[:, _S["n_t"]] = t
    cols[:, _S["sy_t"]] = t * y
    cols[:, _S["sy_c"]] = (1 - t) * y
    cols[:, _S["syy_t"]] = t * y * y
    cols[:, _S["syy_c"]] = (1 - t) * y * y
    cols[:, _S["spsi"]] = psi
    cols[:, _S["spsi2"]] = psi * psi
    cols[:, _S["spsi3"]] = psi * psi * psi
    cols[:, _S["n_clip"]] = clipped
    cols[:, _S["se_t"]] = t * e
    cols[:, _S["se_c"]] = (1 - t) * e
    if design.link == "logit":  # expected events: binary outcomes only (NaN otherwise)
        cols[:, _S["ev_t"]] = t * pred["mu1"]
        cols[:, _S["ev_c"]] = (1 - t) * pred["mu0"]
    else:
        cols[:, _S["ev_t"]] = cols[:, _S["ev_c"]] = np.nan
    if tau is not None:
        cols[:, _S["s_tau"]] = as_float(batch[tau])
        cols[:, _S["n_tau"]] = 1.0
    out: dict[str, Any] = {"global": cols.sum(axis=0), "segments": {}}
    for rule in design.segments:
        code = rule.codes(batch[rule.column])
        code = np.where(code < 0, len(rule.labels), code)  # last row: outside every segment
        out["segments"][rule.column] = np.stack(
            [
                np.bincount(code, weights=cols[:, j], minlength=len(rule.labels) + 1)
                for j in range(len(STATS))
            ],
            axis=1,
        )
    ob = np.minimum((e * OVERLAP_BINS).astype(np.int64), OVERLAP_BINS - 1)
    out["overlap"] = np.bincount(
        t.astype(np.int64) * OVERLAP_BINS + ob, minlength=2 * OVERLAP_BINS
    ).reshape(2, OVERLAP_BINS)
    # nuisance metrics per fold: the propensity (label t) and the outcome model at the
    # observed arm (label y)
    mu_obs = np.where(t == 1, pred["mu1"], pred["mu0"])
    K = design.n_folds
    metrics = {}
    for name, p, label in (("propensity", e, t), ("outcome", mu_obs, y)):
        binary = name == "propensity" or design.link == "logit"
        pc_ = np.clip(p, 1e-15, 1 - 1e-15)
        m = np.zeros((K, 5))  # n, positives, log loss sum, brier sum, squared error sum
        hist = np.zeros((K, 2, METRIC_BINS))
        for k in range(K):
            f = blk.fold == k
            lab, pk = label[f], p[f]
            m[k, 0] = f.sum()
            m[k, 1] = lab.sum()
            m[k, 4] = float(np.sum((pk - lab) ** 2))
            if binary:
                ck = pc_[f]
                m[k, 2] = -float(np.sum(lab * np.log(ck) + (1 - lab) * np.log(1 - ck)))
                m[k, 3] = m[k, 4]
                b = np.minimum((np.clip(pk, 0, 1) * METRIC_BINS).astype(np.int64), METRIC_BINS - 1)
                hist[k] = np.bincount(
                    lab.astype(np.int64) * METRIC_BINS + b, minlength=2 * METRIC_BINS
                ).reshape(2, METRIC_BINS)
        metrics[name] = {"sums": m, "hist": hist}
    out["metrics"] = metrics
    return {"sums": [pickle.dumps(out)]}


def score_rows(
    batch: dict[str, Any],
    design: Design,
    betas: dict[tuple[str, int], np.ndarray],
    clip: float,
) -> dict[str, np.ndarray]:
    """Per-row scores: key, fold, ê (unclipped), μ̂1, μ̂0, ψ, clipped."""
    batch, blk, pred, psi, clipped = _scored(batch, design, betas, clip, None)
    return {
        design.key: np.asarray(batch[design.key]),
        "fold": blk.fold,
        "e_hat": pred["e"],
        "mu1_hat": pred["mu1"],
        "mu0_hat": pred["mu0"],
        "score": psi,
        "clipped": clipped,
    }


def merge_pickled(rows: list[dict[str, Any]], column: str) -> Any:
    """Sum the pickled per-batch dicts (nested dicts of arrays/numbers) of a pass."""
    total = None
    for row in rows:
        part = pickle.loads(row[column])
        total = part if total is None else _add(total, part)
    return total


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _add(out[k], v) if k in out else v
        return out
    if isinstance(a, list):
        return [_add(x, y) for x, y in zip(a, b, strict=True)]
    if a is None:
        return b
    return a + b
