"""One streaming Ray Data pass over the columns a kind needs.

It finds what metadata cannot: NaNs and infinities, and it collects what training
needs before the first step: per-column moments (for standardisation) and the
distinct values of id columns (the embedding vocabularies). Memory is flat in the
number of rows: each block returns a small summary, the driver merges them.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distributed_hte.errors import DataError


@dataclass
class ColumnMoments:
    """Streaming count / sum / sum of squares / min / max of one numeric column."""

    n: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    lo: float = float("inf")
    hi: float = float("-inf")
    n_nonfinite: int = 0
    n_null: int = 0

    @property
    def mean(self) -> float:
        return self.total / max(self.n, 1)

    @property
    def std(self) -> float:
        var = self.total_sq / max(self.n, 1) - self.mean**2
        return float(np.sqrt(max(var, 0.0)))

    def merge(self, other: ColumnMoments) -> None:
        self.n += other.n
        self.total += other.total
        self.total_sq += other.total_sq
        self.lo = min(self.lo, other.lo)
        self.hi = max(self.hi, other.hi)
        self.n_nonfinite += other.n_nonfinite
        self.n_null += other.n_null


@dataclass
class DatasetProfile:
    """Merged summary of a dataset: moments of numeric columns, vocabularies of ids."""

    n_rows: int = 0
    moments: dict[str, ColumnMoments] = field(default_factory=dict)
    vocab: dict[str, np.ndarray] = field(default_factory=dict)  # sorted distinct ids
    id_counts: dict[str, np.ndarray] = field(default_factory=dict)  # rows per vocab entry


def _profile_block(table: pa.Table, numeric: list[str], ids: list[str]) -> dict[str, list[bytes]]:
    prof = DatasetProfile(n_rows=table.num_rows)
    for name in numeric:
        col = table.column(name)
        m = ColumnMoments(n_null=col.null_count)
        arr = col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        finite = np.isfinite(arr)
        m.n_nonfinite = int((~finite).sum()) - m.n_null
        good = arr[finite]
        if good.size:
            m.n, m.total, m.total_sq = good.size, float(good.sum()), float(np.dot(good, good))
            m.lo, m.hi = float(good.min()), float(good.max())
        prof.moments[name] = m
    for name in ids:
        col = table.column(name)
        if col.null_count:
            prof.moments[name] = ColumnMoments(n_null=col.null_count)
        counts = pc.value_counts(col.drop_null()).flatten()
        values = counts[0].to_numpy(zero_copy_only=False)
        order = np.argsort(values, kind="stable")
        prof.vocab[name] = values[order]
        prof.id_counts[name] = counts[1].to_numpy()[order].astype(np.int64)
    return {"profile": [pickle.dumps(prof)]}


def _merge_vocab(
    a: np.ndarray, ca: np.ndarray, b: np.ndarray, cb: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    values = np.concatenate([a, b])
    counts = np.concatenate([ca, cb])
    uniq, inverse = np.unique(values, return_inverse=True)
    return uniq, np.bincount(inverse, weights=counts, minlength=len(uniq)).astype(np.int64)


def merge_profiles(parts: list[DatasetProfile]) -> DatasetProfile:
    """Merge per-block profiles into one."""
    out = DatasetProfile()
    for p in parts:
        out.n_rows += p.n_rows
        for name, m in p.moments.items():
            out.moments.setdefault(name, ColumnMoments()).merge(m)
        for name, values in p.vocab.items():
            if name in out.vocab:
                out.vocab[name], out.id_counts[name] = _merge_vocab(
                    out.vocab[name], out.id_counts[name], values, p.id_counts[name]
                )
            else:
                out.vocab[name], out.id_counts[name] = values, p.id_counts[name]
    return out


def profile_parquet(
    path: str, numeric: list[str], ids: list[str], fields: dict[str, str]
) -> DatasetProfile:
    """Profile the ``*.parquet`` data under ``path`` (see :func:`profile_dataset`).

    Data small enough for the driver (``toolkit.driver_sized``) is profiled there, one pyarrow
    batch at a time (a Ray Data pipeline's start-up costs seconds on a small job); larger
    data by a Ray Data pass.
    """
    from distributed_hte.kinds.toolkit import driver_sized, read_parquet

    columns = list(dict.fromkeys(numeric + ids))
    local = driver_sized(path)
    if local is None:
        return profile_dataset(read_parquet(path, columns), numeric, ids, fields)
    parts = [
        pickle.loads(_profile_block(pa.Table.from_batches([b]), numeric, ids)["profile"][0])
        for b in local.to_batches(columns=columns, batch_size=_LOCAL_BATCH_ROWS)
        if b.num_rows
    ]
    return _checked(merge_profiles(parts), fields)


_LOCAL_BATCH_ROWS = 262_144


def profile_dataset(
    dataset, numeric: list[str], ids: list[str], fields: dict[str, str]
) -> DatasetProfile:
    """Profile a Ray Dataset; raise DataError on nulls, NaN or infinity in any column.

    ``fields`` maps a column to the spec field that named it, for the error message.
    """
    summaries = dataset.map_batches(
        _profile_block,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"numeric": numeric, "ids": ids},
    ).take_all()
    return _checked(merge_profiles([pickle.loads(row["profile"]) for row in summaries]), fields)


def _checked(prof: DatasetProfile, fields: dict[str, str]) -> DatasetProfile:
    if prof.n_rows == 0:
        raise DataError("the dataset is empty (0 rows); nothing to train on")
    for name, m in prof.moments.items():
        where = fields.get(name, name)
        if m.n_null:
            raise DataError(
                f"column {name!r} (named by {where}) has {m.n_null} null value(s); fill or drop them before training"
            )
        if m.n_nonfinite:
            raise DataError(
                f"column {name!r} (named by {where}) has {m.n_nonfinite} NaN or infinite value(s); "
                "fill or drop them before training"
            )
    return prof
