"""Cross-fitting folds: one assignment, settable from outside, and the own-fold gather.

A row's fold is a function of its own key columns (a 64-bit hash, see
:func:`distributed_hte.data.split.split_unit`), so it is stable across runs, files,
partitionings and workers, and no pass over the data is needed to assign it. Kinds that
cross-fit (interference's per-query nets, segments' CV problems, AIPW's nuisances) all
call :func:`assign_folds`; an external split can be passed as a fold column instead.
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
