"""Exact fit of the linear ``fe_hte`` model on a Ray Dataset, in two streaming passes.

When beta and g are linear, ``fe_hte`` *is* ``feols``: y on [T, T·x_β1.., x_g1..] with
one fixed effect per id family. :mod:`distributed_hte.estimators.fixed_effects` does the
maths on sums over rows; this module only moves those sums:

1. pass 1 — ``map_batches`` (stateless tasks) turns every batch into its sufficient
   statistics, flattened into a one-row batch; the driver streams the rows back
   (``iter_rows``) and adds them, so it holds O(ids · p + p²) plus the id-pair
   cross-tabs, never O(rows). Then the exact solve, on the driver.
2. pass 2 (only for ``hetero`` and ``CRV1``) — the same, for the sandwich's meat and the
   per-cluster scores, given the solution (shipped once through the object store).

Tasks, not actor pools: actor pools deadlock with Train workers on small machines, and
Ray Data's groupby/aggregate shuffles do not run inside Tune trials' placement groups.

The caller supplies two picklable callables on numpy batches (``dict[str, ndarray]``):
``design(batch) -> (y (n,), X (n, p))`` and ``encode_ids(batch) -> codes (n, F) int64``
(dense codes ``0..n_f-1``). :class:`LinearDesign` and :class:`SortedIdEncoder` are the
usual ones. :func:`solve_fixed_effects_given` is the finish for nonlinear nets: the
fixed effects of y − m(x) for a fixed m, by the same pass-1 machinery with p = 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from distributed_hte.estimators.fixed_effects import (
    DENSE_MAX,
    BatchScores,
    BatchStatistics,
    FEInference,
    FESolution,
    FEStatistics,
    ScoreAccumulator,
    StatisticsAccumulator,
    VcovType,
    batch_scores,
    batch_statistics,
    check_vcov,
    inference,
    solve,
)

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]
Design = Callable[[Batch], tuple[np.ndarray, np.ndarray]]
EncodeIds = Callable[[Batch], np.ndarray]
# Rows per map_batches batch: large enough that per-batch overhead is small, small
# enough that a task's working set (a few copies of (rows, p) float64) stays modest.
BATCH_ROWS = 131_072


@dataclass(frozen=True)
class LinearDesign:
    """y and X for ``outcome ~ T + T:b1 + .. + g1 + ..`` (pyfixest's coefficient names).

    ``__call__(batch) -> (y (n,), X (n, 1 + len(beta_features) + len(g_features)))``.
    """

    outcome: str
    treatment: str
    beta_features: tuple[str, ...] = ()
    g_features: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        t = self.treatment
        return (t, *(f"{t}:{b}" for b in self.beta_features), *self.g_features)

    @property
    def columns(self) -> list[str]:
        return [self.outcome, self.treatment, *self.beta_features, *self.g_features]

    def split(self, values: np.ndarray) -> dict[str, dict[str, float]]:
        """(p,) values in ``names`` order -> ``{"beta": {"(intercept)": v, b: v, ..},
        "g": {g: v, ..}}``, the layout of ``FixedEffectsHTE.linear_coefficients``."""
        v = [float(x) for x in values]
        k = 1 + len(self.beta_features)
        return {
            "beta": dict(zip(("(intercept)", *self.beta_features), v[:k], strict=True)),
            "g": dict(zip(self.g_features, v[k:], strict=True)),
        }

    def __call__(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        t = np.asarray(batch[self.treatment], np.float64)
        cols = [t, *(t * np.asarray(batch[b], np.float64) for b in self.beta_features)]
        cols += [np.asarray(batch[g], np.float64) for g in self.g_features]
        return np.asarray(batch[self.outcome], np.float64), np.column_stack(cols)


@dataclass(frozen=True)
class SortedIdEncoder:
    """Codes ids by binary search in sorted vocabularies (e.g. a profile's ``vocab``).

    ``__call__(batch) -> (n, F) int64``; raises ValueError on an id not in the vocabulary.
    """

    columns: tuple[str, ...]
    vocab: tuple[np.ndarray, ...]

    @property
    def n_ids(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.vocab)

    @cached_property
    def _index(self) -> tuple:
        import pandas as pd

        # a hash lookup is several times faster than a binary search on large vocabularies;
        # built once per process (cached_property skips the frozen __setattr__)
        return tuple(pd.Index(v) for v in self.vocab)

    def __call__(self, batch: Batch) -> np.ndarray:
        n = len(next(iter(batch.values()))) if batch else 0
        out = np.empty((n, len(self.columns)), np.int64)
        for f, (col, index) in enumerate(zip(self.columns, self._index, strict=True)):
            ids = np.asarray(batch[col])
            code = index.get_indexer(ids)
            if (code < 0).any():
                bad = ids[code < 0][0]
                raise ValueError(f"column {col!r}: id {bad!r} is not in the vocabulary")
            out[:, f] = code
        return out


@dataclass(frozen=True)
class ExactFEResult:
    """What :func:`fit_linear_fe` found.

    Attributes:
        families: (F,) fixed-effect column names, in code order.
        coef_names: (p,) regressor names.
        statistics: pass-1 sums (reusable, e.g. for another vcov without pass 1).
        solution: coefficients, intercept, fixed effects (per family (n_f,)), RSS.
        scores: pass-2 sums (meat and per-cluster scores; None when pass 2 did not run):
            with them, :func:`~distributed_hte.estimators.fixed_effects.inference` gives
            ``hetero`` as well as ``CRV1`` without another pass.
        inference: SEs, t, p-values, CIs (None when no vcov was asked for).
        seconds: wall time of ``pass1``, ``solve``, ``pass2`` (0 when skipped), ``total``.
    """

    families: tuple[str, ...]
    coef_names: tuple[str, ...]
    statistics: FEStatistics
    solution: FESolution
    scores: BatchScores | None
    inference: FEInference | None
    seconds: dict[str, float]


def _statistics_batch(batch: Batch, design: Design, encode_ids: EncodeIds) -> Batch:
    y, X = design(batch)
    flat = batch_statistics(y, X, encode_ids(batch)).to_arrays()
    return {k: v[None] for k, v in flat.items()}  # one row per batch


def _scores_batch(
    batch: Batch, design: Design, encode_ids: EncodeIds, solution: list, cluster: int | None
) -> Batch:
    import ray

    # the solution travels once through the object store, wrapped in a list so Ray Data
    # passes the reference through instead of inlining the arrays into every task
    sol = ray.get(solution[0])
    y, X = design(batch)
    flat = batch_scores(y, X, encode_ids(batch), sol, cluster).to_arrays()
    return {k: v[None] for k, v in flat.items()}


def pass_statistics(
    dataset, design: Design, encode_ids: EncodeIds, n_ids: Sequence[int], p: int, batch_rows: int
) -> FEStatistics:
    """Pass 1: stream per-batch statistics back and add them on the driver."""
    acc = StatisticsAccumulator(n_ids, p)
    parts = dataset.map_batches(
        _statistics_batch,
        fn_kwargs={"design": design, "encode_ids": encode_ids},
        batch_format="numpy",
        batch_size=batch_rows,
    )
    for row in parts.iter_rows():
        acc.add(BatchStatistics.from_arrays(row["ints"], row["floats"]))
    return acc.result()


def pass_scores(
    dataset,
    design: Design,
    encode_ids: EncodeIds,
    sol: FESolution,
    cluster: int | None,
    n_clusters: int,
    batch_rows: int,
) -> BatchScores:
    """Pass 2: stream per-batch meat and cluster scores back and add them."""
    import ray

    acc = ScoreAccumulator(n_clusters if cluster is not None else 0, len(sol.coef))
    parts = dataset.map_batches(
        _scores_batch,
        fn_kwargs={
            "design": design,
            "encode_ids": encode_ids,
            "solution": [ray.put(sol)],
            "cluster": cluster,
        },
        batch_format="numpy",
        batch_size=batch_rows,
    )
    for row in parts.iter_rows():
        acc.add(BatchScores.from_arrays(row["ints"], row["floats"]))
    return acc.result()


def fit_linear_fe(
    dataset,
    design: Design,
    encode_ids: EncodeIds,
    n_ids: Sequence[int],
    *,
    families: Sequence[str] | None = None,
    coef_names: Sequence[str] | None = None,
    vcov: VcovType | None = "iid",
    cluster: str | int | None = None,
    alpha: float = 0.05,
    batch_rows: int = BATCH_ROWS,
    dense_max: int = DENSE_MAX,
) -> ExactFEResult:
    """Exact feols on a Ray Dataset: pass 1, solve, and pass 2 when ``vcov`` needs it.

    Args:
        dataset: a ``ray.data.Dataset`` with the columns ``design`` and ``encode_ids`` read.
        design: ``batch -> (y (n,), X (n, p))``, picklable.
        encode_ids: ``batch -> (n, F)`` int64 dense codes, picklable.
        n_ids: (F,) vocabulary size per family.
        families: (F,) names of the families (for ``cluster`` by name and the logs).
        coef_names: (p,) names of the columns of X (``design.names`` if it has them).
        vcov: "iid" (one pass), "hetero" or "CRV1" (two passes), or None (no SEs).
        cluster: the family (name or index) to cluster by, for CRV1.
    """
    started = time.perf_counter()
    F = len(n_ids)
    families = tuple(families) if families is not None else tuple(f"fe{f}" for f in range(F))
    if len(families) != F:
        raise ValueError(f"{len(families)} family names for {F} id vocabularies")
    if isinstance(cluster, str):
        if cluster not in families:
            raise ValueError(f"cluster {cluster!r} is not a fixed-effect family {list(families)}")
        cluster = families.index(cluster)
    if vcov is not None:
        check_vcov(vcov, cluster, F)
    if coef_names is None:
        coef_names = getattr(design, "names", None)
    # p from the design itself on an empty batch would need the schema; take it from names
    p = len(coef_names) if coef_names is not None else None
    if p is None:
        raise ValueError("coef_names is needed when design has no .names")
    stats = pass_statistics(dataset, design, encode_ids, n_ids, p, batch_rows)
    t1 = time.perf_counter()
    log.info(
        "exact FE pass 1: %d rows, ids %s, %.2f s",
        stats.n,
        ", ".join(f"{f}={n}" for f, n in zip(families, stats.n_ids, strict=True)),
        t1 - started,
    )
    sol = solve(stats, coef_names=coef_names, dense_max=dense_max)
    t2 = time.perf_counter()
    log.info(
        "exact FE solve: %s, null dim %d, %d component(s), %.2f s",
        sol.method,
        sol.null_dim,
        sol.n_components,
        t2 - t1,
    )
    if sol.n_components > 1:
        log.warning(
            "the id graph has %d connected components: fixed effects are comparable only "
            "within a component",
            sol.n_components,
        )
    sc = None
    if vcov in ("hetero", "CRV1"):
        n_cl = stats.n_ids[cluster] if cluster is not None else 0
        sc = pass_scores(dataset, design, encode_ids, sol, cluster, n_cl, batch_rows)
        log.info("exact FE pass 2 (%s): %.2f s", vcov, time.perf_counter() - t2)
    t3 = time.perf_counter()
    inf = inference(sol, stats, vcov, sc, cluster, coef_names, alpha) if vcov is not None else None
    return ExactFEResult(
        families=families,
        coef_names=tuple(coef_names),
        statistics=stats,
        solution=sol,
        scores=sc,
        inference=inf,
        seconds={
            "pass1": t1 - started,
            "solve": t2 - t1,
            "pass2": t3 - t2 if sc is not None else 0.0,
            "total": time.perf_counter() - started,
        },
    )


@dataclass(frozen=True)
class LinearOffset:
    """``offset(batch) -> (y (n,), X b (n,))`` for a fixed b on a design's X (picklable).

    The offset of the linear model, for :func:`solve_fixed_effects_given`: with the
    exact fit's b it gives back the exact fit's fixed effects.
    """

    design: Design
    coef: np.ndarray

    def __call__(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        y, X = self.design(batch)
        return y, X @ self.coef


@dataclass(frozen=True)
class _Residual:
    """Design with p = 0 whose outcome is y − m(x), from ``offset(batch) -> (y, m)``."""

    offset: Callable[[Batch], tuple[np.ndarray, np.ndarray]]

    def __call__(self, batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        y, m = self.offset(batch)
        r = np.asarray(y, np.float64) - np.asarray(m, np.float64)
        return r, np.zeros((len(r), 0))


def solve_fixed_effects_given(
    dataset,
    offset: Callable[[Batch], tuple[np.ndarray, np.ndarray]],
    encode_ids: EncodeIds,
    n_ids: Sequence[int],
    *,
    families: Sequence[str] | None = None,
    batch_rows: int = BATCH_ROWS,
    dense_max: int = DENSE_MAX,
) -> ExactFEResult:
    """Exact fixed effects (and intercept) of r = y − m(x) for fixed nets m: one pass.

    ``offset(batch) -> (y (n,), m (n,))`` evaluates the fitted nonlinear part, e.g.
    β(x)·T + g(x) from a trained model. Returns the solution with ``coef`` empty,
    ``fixed_effects`` per family (zero mean over seen ids) and ``intercept``.
    """
    return fit_linear_fe(
        dataset,
        _Residual(offset),
        encode_ids,
        n_ids,
        families=families,
        coef_names=(),
        vcov=None,
        batch_rows=batch_rows,
        dense_max=dense_max,
    )
