"""Cross-fitting folds: one assignment, settable from outside, and the own-fold gather.

A row's fold is a function of its own key columns (a 64-bit hash, see
:func:`distributed_hte.data.split.split_unit`), so it is stable across runs, files,
partitionings and workers, and no pass over the data is needed to assign it. Kinds that
cross-fit (interference's per-query nets, segments' CV problems, AIPW's nuisances) all
call :func:`assign_folds` (AIPW stratifies by treatment with :func:`assign_stratified_folds`
— the same hash, cut per stratum); an external split can be passed as a fold column instead.
"""

from __future__ import annotations

import numpy as np

from distributed_hte.data.split import split_unit


def hash_unit(
    keys: dict[str, np.ndarray], columns: list[str], salt: int | None = None
) -> np.ndarray:
    """A stable number in [0, 1) per row from ``columns`` of ``keys`` ``(n,)``.

    ``salt`` gives independent numbers from the same keys (folds vs the validation split).
    """
    if salt is None:
        return split_unit(keys, columns)
    n = len(keys[columns[0]])
    salted = {**{c: keys[c] for c in columns}, "__salt": np.full(n, salt, dtype=np.int64)}
    return split_unit(salted, [*columns, "__salt"])


def assign_folds(
    keys: dict[str, np.ndarray], columns: list[str], n_folds: int, salt: int | None = None
) -> np.ndarray:
    """Fold ``0..n_folds-1`` of each row ``(n,)`` int64; all zeros when ``n_folds <= 1``."""
    n = len(keys[columns[0]])
    if n_folds <= 1:
        return np.zeros(n, dtype=np.int64)
    unit = hash_unit(keys, columns, salt)
    return np.minimum((unit * n_folds).astype(np.int64), n_folds - 1)


def own_fold(values, fold):
    """Member ``fold[i]``'s value for row i: ``(M, n, ...)`` → ``(n, ...)`` (torch tensors).

    Cross-fitted ensembles hold one member per fold, trained without that fold; a row's
    out-of-sample prediction is its own fold's member.
    """
    idx = fold.view(1, -1, *([1] * (values.dim() - 2))).expand(1, *values.shape[1:])
    return values.gather(0, idx)[0]


# Bins of the hash unit when folds are stratified: within each stratum, fold sizes are
# equal up to the rows of one bin (about rows / 65,536).
STRATIFY_BINS = 1 << 16


def stratified_cuts(histograms: np.ndarray, n_folds: int) -> np.ndarray:
    """Fold cut points ``(S, n_folds - 1)`` in [0, 1] from per-stratum hash histograms.

    ``histograms (S, STRATIFY_BINS)``: rows of each stratum per bin of :func:`hash_unit`
    (one streaming pass). Cut j of stratum s is the bin edge at which the stratum's
    cumulative count first reaches j/n_folds of its rows, so every fold holds 1/n_folds
    of every stratum (treated and control alike), up to one bin's rows.
    """
    hist = np.asarray(histograms, dtype=np.float64)
    bins = hist.shape[1]
    cum = np.cumsum(hist, axis=1)
    out = np.zeros((hist.shape[0], n_folds - 1))
    for s in range(hist.shape[0]):
        total = cum[s, -1]
        for j in range(1, n_folds):
            if total == 0:
                out[s, j - 1] = j / n_folds
                continue
            b = int(np.searchsorted(cum[s], j * total / n_folds, side="left"))
            out[s, j - 1] = (b + 1) / bins
    return out


def assign_stratified_folds(
    keys: dict[str, np.ndarray],
    columns: list[str],
    strata: np.ndarray,
    cuts: np.ndarray,
    salt: int | None = None,
) -> np.ndarray:
    """Fold of each row ``(n,)`` int64: its hash unit against its stratum's ``cuts``.

    ``strata (n,)`` int in ``0..S-1``; ``cuts`` from :func:`stratified_cuts`. A row's fold
    depends only on its key and stratum (and the cuts), never on where it is read.
    """
    unit = hash_unit(keys, columns, salt)
    strata = np.asarray(strata).astype(np.int64)
    out = np.zeros(len(unit), dtype=np.int64)
    for s in range(cuts.shape[0]):
        m = strata == s
        out[m] = np.searchsorted(cuts[s], unit[m], side="right")
    return out


def unit_histogram(unit: np.ndarray, strata: np.ndarray, n_strata: int) -> np.ndarray:
    """``(n_strata, STRATIFY_BINS)`` counts of hash units per stratum (for the cuts)."""
    b = np.minimum((unit * STRATIFY_BINS).astype(np.int64), STRATIFY_BINS - 1)
    flat = np.asarray(strata).astype(np.int64) * STRATIFY_BINS + b
    return np.bincount(flat, minlength=n_strata * STRATIFY_BINS).reshape(n_strata, -1)
