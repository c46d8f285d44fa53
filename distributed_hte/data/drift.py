"""Data lineage and the checks a retrain runs before training: fingerprint, profile, shift.

* :func:`data_fingerprint`: files (relative path, size), row count and a hash of the
  schema, from parquet metadata only.
* :func:`profile_columns`: what a later day is compared with: per numeric column its
  mean, standard deviation and decile bins (edges from a sample, counts over every row);
  per id column its levels. One streaming pyarrow pass (two for the edges' sample).
* :func:`compare_with`: a new dataset against a stored profile: the columns it must
  have with the same types (a schema change is a DataError), per numeric column the
  population stability index on the stored bins and the standardised mean difference,
  per id column the new levels and the share of rows carrying one.

Numbers happen here; the life cycle (:mod:`distributed_hte.lifecycle`) only orchestrates.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from distributed_hte.data.schema import open_dataset
from distributed_hte.errors import DataError

# Rows the decile edges are taken from (the counts use every row).
EDGE_SAMPLE_ROWS = 200_000
N_BINS = 10
# A bin with no rows on one side would make PSI infinite: proportions are floored here.
PSI_FLOOR = 1e-4
# The customary reading of PSI: < 0.1 no shift, 0.1-0.25 moderate, > 0.25 major.
PSI_MAJOR = 0.25
EXAMPLES = 5


def schema_of(path: str, columns: list[str] | None = None) -> dict[str, str]:
    """``{column: arrow type}`` of ``path`` (only ``columns`` when given)."""
    schema = open_dataset(path).schema
    names = columns if columns is not None else schema.names
    return {c: str(schema.field(c).type) for c in names if c in schema.names}


def data_fingerprint(path: str) -> dict[str, Any]:
    """Files (path relative to ``path``, bytes), rows and schema hash of a parquet dataset."""
    ds = open_dataset(path)
    root = str(Path(path).expanduser().resolve())
    files = []
    for f in ds.files:
        rel = f[len(root) :].lstrip("/") if f.startswith(root) else f
        size = Path(f).stat().st_size if Path(f).exists() else None
        files.append({"file": rel or Path(f).name, "bytes": size})
    schema = {n: str(ds.schema.field(n).type) for n in ds.schema.names}
    blob = json.dumps([files, schema], sort_keys=True).encode()
    return {
        "path": root,
        "files": files,
        "n_files": len(files),
        "bytes": sum(f["bytes"] or 0 for f in files),
        "n_rows": ds.count_rows(),
        "schema_hash": hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:16],
        "hash": hashlib.sha256(blob).hexdigest()[:16],
    }


def _batches(path: str, columns: list[str]):
    return open_dataset(path).to_batches(columns=columns, batch_size=262_144)


def _as_float(arr: pa.Array) -> np.ndarray:
    return np.asarray(pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False), dtype=float)


def profile_columns(path: str, numeric: list[str], ids: list[str]) -> dict[str, Any]:
    """The profile a later dataset is compared with (plain JSON)."""
    ds = open_dataset(path)
    sample = ds.head(EDGE_SAMPLE_ROWS, columns=numeric) if numeric else None
    edges = {}
    for c in numeric:
        x = _as_float(sample.column(c).combine_chunks())
        x = x[np.isfinite(x)]
        qs = np.quantile(x, np.linspace(0, 1, N_BINS + 1)[1:-1]) if len(x) else np.array([])
        edges[c] = np.unique(qs)
    counts = {c: np.zeros(len(edges[c]) + 1) for c in numeric}
    moments = {c: np.zeros(3) for c in numeric}  # n, sum, sum of squares
    levels: dict[str, set] = {c: set() for c in ids}
    for batch in _batches(path, numeric + ids):
        for c in numeric:
            x = _as_float(batch.column(c))
            counts[c] += np.bincount(
                np.searchsorted(edges[c], x, side="right"), minlength=len(edges[c]) + 1
            )
            moments[c] += [len(x), x.sum(), (x * x).sum()]
        for c in ids:
            levels[c].update(pc.unique(batch.column(c)).to_pylist())
    out: dict[str, Any] = {"numeric": {}, "ids": {}}
    for c in numeric:
        n, s, ss = moments[c]
        mean = s / max(n, 1)
        var = max(ss / max(n, 1) - mean * mean, 0.0)
        out["numeric"][c] = {
            "edges": edges[c].tolist(),
            "counts": counts[c].tolist(),
            "mean": mean,
            "std": var**0.5,
        }
    for c in ids:
        out["ids"][c] = sorted(levels[c], key=lambda v: (str(type(v)), v))
    return out


@dataclass(frozen=True, slots=True)
class Shift:
    """One numeric column's shift: PSI on the reference bins, standardised mean difference."""

    psi: float
    smd: float
    mean: float
    reference_mean: float


def psi(reference_counts: np.ndarray, counts: np.ndarray) -> float:
    """Population stability index of two histograms on the same bins, ``(n_bins,)`` each."""
    p = np.maximum(reference_counts / max(reference_counts.sum(), 1), PSI_FLOOR)
    q = np.maximum(counts / max(counts.sum(), 1), PSI_FLOOR)
    return float(((q - p) * np.log(q / p)).sum())


def smd(mean: float, std: float, reference_mean: float, reference_std: float) -> float:
    """Standardised mean difference (pooled standard deviation; 0 when both are constant)."""
    pooled = ((std**2 + reference_std**2) / 2) ** 0.5
    return float((mean - reference_mean) / pooled) if pooled > 0 else 0.0


def compare_with(
    reference: dict[str, Any], reference_schema: dict[str, str], path: str
) -> dict[str, Any]:
    """Check ``path`` against a reference profile; DataError if its schema differs.

    Returns ``{"schema": "same", "numeric": {col: {psi, smd, ...}}, "ids": {col:
    {new_levels, new_level_examples, rows_with_new_level_share}}, "max_psi": ...}``.
    """
    found = schema_of(path)
    problems = []
    for col, dtype in reference_schema.items():
        if col not in found:
            problems.append(f"column {col!r} is missing")
        elif found[col] != dtype:
            problems.append(f"column {col!r} is {found[col]}, the champion's data had {dtype}")
    if problems:
        raise DataError(
            f"the data at {path} does not have the champion's schema: {'; '.join(problems)}. "
            "Retrain from scratch under a new registry.model name if the change is intended"
        )
    numeric = list(reference["numeric"])
    ids = list(reference["ids"])
    edges = {c: np.asarray(reference["numeric"][c]["edges"]) for c in numeric}
    counts = {c: np.zeros(len(edges[c]) + 1) for c in numeric}
    moments = {c: np.zeros(3) for c in numeric}
    known = {c: set(reference["ids"][c]) for c in ids}
    new: dict[str, set] = {c: set() for c in ids}
    rows_new = dict.fromkeys(ids, 0)
    n_rows = 0
    for batch in _batches(path, numeric + ids):
        n_rows += batch.num_rows
        for c in numeric:
            x = _as_float(batch.column(c))
            counts[c] += np.bincount(
                np.searchsorted(edges[c], x, side="right"), minlength=len(edges[c]) + 1
            )
            moments[c] += [len(x), x.sum(), (x * x).sum()]
        for c in ids:
            col = batch.column(c)
            unique = set(pc.unique(col).to_pylist())
            fresh = unique - known[c]
            if fresh:
                new[c] |= fresh
                mask = pc.is_in(col, value_set=pa.array(sorted(fresh, key=str), col.type))
                rows_new[c] += int(pc.sum(mask).as_py() or 0)
    out: dict[str, Any] = {"schema": "same as the champion's", "rows": n_rows, "numeric": {}}
    for c in numeric:
        n, s, ss = moments[c]
        mean = s / max(n, 1)
        std = max(ss / max(n, 1) - mean * mean, 0.0) ** 0.5
        ref = reference["numeric"][c]
        out["numeric"][c] = {
            "psi": round(psi(np.asarray(ref["counts"]), counts[c]), 6),
            "smd": round(smd(mean, std, ref["mean"], ref["std"]), 6),
            "mean": mean,
            "champion_mean": ref["mean"],
        }
    out["ids"] = {
        c: {
            "new_levels": len(new[c]),
            "new_level_examples": [str(v) for v in sorted(new[c], key=str)[:EXAMPLES]],
            "rows_with_new_level_share": rows_new[c] / max(n_rows, 1),
            "champion_levels": len(known[c]),
        }
        for c in ids
    }
    out["max_psi"] = max((v["psi"] for v in out["numeric"].values()), default=0.0)
    out["shifted_columns"] = sorted(c for c, v in out["numeric"].items() if v["psi"] > PSI_MAJOR)
    return out
