"""Reshaping and validation of the ``interference`` kind's long-format data.

Ray Data functions (``map_groups`` / ``map_batches``) that turn one row per query ×
item into one padded row per query, and the summaries that validate the data. This
module imports no torch, so the Ray Data tasks that run it start fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distributed_hte.data.split import split_unit

# ----------------------------------------------------------------------------- folds


def query_unit(ids: np.ndarray, salt: int) -> np.ndarray:
    """A stable number in [0, 1) per query id, independent across ``salt`` values."""
    ids = np.asarray(ids)
    return split_unit({"q": ids, "s": np.full(len(ids), salt, dtype=np.int64)}, ["q", "s"])


def query_fold(ids: np.ndarray, folds: int) -> np.ndarray:
    """Cross-fitting fold of each query ``(n,)`` int64 (a hash: stable across runs)."""
    return np.minimum((query_unit(ids, 1) * folds).astype(np.int64), folds - 1)


def query_is_val(ids: np.ndarray, val_fraction: float) -> np.ndarray:
    """Queries held out from every member's training (early stopping), ``(n,)`` bool."""
    return query_unit(ids, 2) < val_fraction


# ----------------------------------------------------------------------------- reshaping


@dataclass
class Layout:
    """Column names and the padded width: how long rows become query rows (picklable)."""

    query: str
    item: str
    treated: str
    exposed: str
    outcome: str
    viewer_features: list[str]
    item_features: list[str]
    k_max: int
    subgroup: str | None = None
    subgroup_vocab: np.ndarray | None = None
    truth: list[str] = field(default_factory=list)  # pair-level truth columns present

    def long_columns(self, with_labels: bool = True) -> list[str]:
        cols = [self.query, self.item, *self.viewer_features, *self.item_features]
        if with_labels:
            cols += [self.treated, self.exposed, self.outcome, *self.truth]
        if self.subgroup:
            cols.append(self.subgroup)
        return list(dict.fromkeys(cols))


def query_row(group: dict[str, np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """``map_groups`` function: one query's rows → one padded row plus validation flags.

    Items are ordered by id (any fixed order works; b is normalised on the first).
    """
    k = layout.k_max
    order = np.argsort(group[layout.item], kind="stable")
    n = len(order)
    size = min(n, k)
    order = order[:size]
    x = np.array([np.asarray(group[c], dtype=np.float64) for c in layout.viewer_features])
    z = np.zeros((1, k, len(layout.item_features)), dtype=np.float32)
    for j, c in enumerate(layout.item_features):
        z[0, :size, j] = np.asarray(group[c], dtype=np.float32)[order]
    treated = np.asarray(group[layout.treated], dtype=np.float64)
    exposed = np.asarray(group[layout.exposed], dtype=np.float64)
    w = np.zeros((1, k), dtype=np.float32)
    w[0, :size] = treated[order]
    mask = np.zeros((1, k), dtype=bool)
    mask[0, :size] = True
    hit = np.flatnonzero(exposed[order] == 1)
    e = int(hit[0]) if len(hit) else 0
    outcome = np.asarray(group[layout.outcome], dtype=np.float64)[order]
    y = float(outcome[e]) if len(hit) else float("nan")
    out = {
        "query": np.asarray(group[layout.query])[:1],
        "x": x[:, :1].T.astype(np.float32),
        "z": z,
        "w": w,
        "mask": mask,
        "e": np.array([e], dtype=np.int64),
        "y": np.array([y], dtype=np.float64),
        "size": np.array([n], dtype=np.int64),
        "n_exposed": np.array([int((exposed == 1).sum())], dtype=np.int64),
        "bad_binary": np.array(
            [int((~np.isin(treated, (0, 1))).sum() + (~np.isin(exposed, (0, 1))).sum())]
        ),
        "viewer_varies": np.array([int((np.ptp(x, axis=1) > 1e-9).any())]),
        "y_finite": np.array([bool(np.isfinite(y))]),
        "y_binary": np.array([bool(y in (0.0, 1.0))]),
    }
    if layout.subgroup:
        g = np.full((1, k), -1, dtype=np.int64)
        values = np.asarray(group[layout.subgroup])[order]
        g[0, :size] = np.searchsorted(layout.subgroup_vocab, values)
        out["group"] = g
    for c in layout.truth:
        t = np.zeros((1, k), dtype=np.float64)
        t[0, :size] = np.asarray(group[c], dtype=np.float64)[order]
        out[c] = t
    return out


def flag_sums(batch: dict[str, np.ndarray], val_fraction: float) -> dict[str, np.ndarray]:
    """Validation counts over query rows (summed over batches by :func:`merge_rows`)."""
    return {
        "queries": np.array([len(batch["size"])]),
        "val_queries": np.array([int(query_is_val(batch["query"], val_fraction).sum())]),
        "max_size": np.array([int(batch["size"].max(initial=0))]),
        "not_one_exposure": np.array([int((batch["n_exposed"] != 1).sum())]),
        "bad_binary": np.array([int(batch["bad_binary"].sum())]),
        "viewer_varies": np.array([int(batch["viewer_varies"].sum())]),
        "y_not_finite": np.array([int((~batch["y_finite"] & (batch["n_exposed"] == 1)).sum())]),
        "y_not_binary": np.array([int((~batch["y_binary"]).sum())]),
    }


def query_summary(batch: dict[str, np.ndarray], query: str, exposed: str) -> dict[str, np.ndarray]:
    n_exp = np.asarray(batch[f"sum({exposed})"], dtype=np.float64)
    bad = n_exp != 1
    first = int(np.argmax(bad)) if bad.any() else None
    return {
        "queries": np.array([len(n_exp)]),
        "max_size": np.array([int(np.max(batch["count()"], initial=0))]),
        "not_one": np.array([int(bad.sum())]),
        "example": np.array([str(batch[query][first]) if first is not None else ""]),
        "example_exposures": np.array([n_exp[first] if first is not None else 0.0]),
    }


def item_summary(batch: dict[str, np.ndarray], item: str, treated: str) -> dict[str, np.ndarray]:
    lo, hi = batch[f"min({treated})"], batch[f"max({treated})"]
    bad = lo != hi
    return {
        "items": np.array([len(lo)]),
        "treated": np.array([int((hi == 1).sum())]),
        "varying": np.array([int(bad.sum())]),
        "example": np.array([str(batch[item][np.argmax(bad)]) if bad.any() else ""]),
    }


def merge_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine per-block summaries: counts add, ``max_*`` take the max, ``example*`` the first."""
    out: dict[str, Any] = {"example": ""}
    for row in rows:
        for k, v in row.items():
            if not k.startswith("example"):
                out[k] = max(out.get(k, 0), v) if k.startswith("max") else out.get(k, 0) + v
        if row.get("example") and not out["example"]:
            out.update({k: v for k, v in row.items() if k.startswith("example")})
    return out


def split_side(batch: dict[str, np.ndarray], vf: float, keep: str) -> dict[str, np.ndarray]:
    """Keep the training or the validation queries (a stable hash of the query id)."""
    is_val = query_is_val(batch["query"], vf)
    m = is_val if keep == "val" else ~is_val
    return {k: v[m] for k, v in batch.items()}
