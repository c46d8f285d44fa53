"""Train/validation split that is stable across runs, files and partitionings.

A row's split is a function of its own content: a 64-bit hash of key columns, mapped to
[0, 1) and compared with ``val_fraction``. Re-running, re-partitioning or adding files
never moves an existing row to the other side.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

_SALT = np.uint64(0x9E3779B97F4A7C15)


def split_unit(batch: dict[str, np.ndarray], key_columns: list[str]) -> np.ndarray:
    """Map each row of ``batch`` to a number in [0, 1) from its ``key_columns`` ``(n,)``."""
    h = np.zeros(len(batch[key_columns[0]]), dtype=np.uint64)
    for name in key_columns:
        col = pd.util.hash_array(np.asarray(batch[name]), categorize=False)
        h = (h * _SALT) ^ col
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def filter_split(
    batch: dict[str, np.ndarray],
    key_columns: list[str],
    val_fraction: float,
    keep: Literal["train", "val"],
) -> dict[str, np.ndarray]:
    """Keep the rows of one side of the split (a Ray Data ``map_batches`` function)."""
    is_val = split_unit(batch, key_columns) < val_fraction
    mask = is_val if keep == "val" else ~is_val
    return {k: v[mask] for k, v in batch.items()}


def split_datasets(dataset, key_columns: list[str], val_fraction: float) -> dict:
    """``{"train": ds, "val": ds}`` (no "val" when ``val_fraction`` is 0); lazy, streaming."""
    out = {}
    sides: list[Literal["train", "val"]] = ["train", "val"] if val_fraction > 0 else ["train"]
    for side in sides:
        if val_fraction == 0:
            out[side] = dataset
            continue
        out[side] = dataset.map_batches(
            filter_split,
            batch_format="numpy",
            fn_kwargs={"key_columns": key_columns, "val_fraction": val_fraction, "keep": side},
        )
    return out


# Cache datasets up to this share of the object store: small data then skips the
# per-epoch re-read; large data always streams, so memory stays flat in rows.
CACHE_OBJECT_STORE_SHARE = 0.25


def cache_if_small(datasets: dict, n_rows: int, n_columns: int, policy: str) -> bool:
    """Materialise ``datasets`` in place when ``policy`` says so; return whether it did.

    ``auto`` caches when rows × columns × 8 bytes is under a quarter of the object store.
    """
    import ray

    if policy == "never":
        return False
    if policy == "auto":
        store = ray.available_resources().get("object_store_memory", 0.0)
        if n_rows * n_columns * 8 > CACHE_OBJECT_STORE_SHARE * store:
            return False
    for name in list(datasets):
        datasets[name] = datasets[name].materialize()
    return True
