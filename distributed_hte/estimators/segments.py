"""Segments: picking a solution on the λ path and recovery against a known truth.

Pure functions of arrays and tables (no torch, no Ray).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def select_on_path(path: pd.DataFrame, rule: str) -> int:
    """Index of the λ on the path that ``rule`` (last, min, one_se) picks.

    ``one_se``: the largest λ whose CV log loss is within one standard error of the
    minimum (the path runs from large to small λ).
    """
    if rule == "last" or "cv_log_loss" not in path:
        return len(path) - 1
    best = int(path["cv_log_loss"].idxmin())
    if rule == "min":
        return best
    bound = path["cv_log_loss"].iloc[best] + path["cv_log_loss_se"].iloc[best]
    return int(np.flatnonzero(path["cv_log_loss"].to_numpy() <= bound)[0])


def segment_intercepts(
    creative_intercept: np.ndarray, segment_of: np.ndarray, m: int
) -> np.ndarray:
    """``(m,)`` a_j: the mean intercept of segment j's creatives (``(C,)`` inputs)."""
    return np.bincount(segment_of, weights=creative_intercept, minlength=m) / np.bincount(
        segment_of, minlength=m
    )


def path_recovery(
    world: Any,
    segment_vocab: np.ndarray,
    features: list[str],
    pairs: list[tuple[str, Any]],
    gammas: list[np.ndarray],
    deltas: list[np.ndarray],
) -> pd.DataFrame:
    """Recovery of the true segments at every λ of the path, one row per λ.

    ``world``: the true parameters (:class:`~distributed_hte.simulate.segments.SegmentsWorld`);
    ``pairs``: (segment, creative) of the fitted creatives, in solver order ``(C,)``;
    ``gammas`` ``[(m, p)]`` and ``deltas`` ``[(C, p)]``: the refit along the path.
    δ zero pattern: share of creatives whose "matches its segment" (δ = 0) agrees with
    the truth. γ support: precision, recall and F1 of the non-zero entries.
    """
    seg_pos = {str(s): j for j, s in enumerate(segment_vocab)}
    feat_pos = {f: i for i, f in enumerate(features)}
    true_zero = {
        (world.segments[world.segment_of[k]], int(cid)): bool(np.all(world.delta[k] == 0))
        for k, cid in enumerate(world.creatives)
    }
    true_support = world.gamma != 0
    rows = []
    for gamma, delta in zip(gammas, deltas, strict=True):
        est = np.zeros_like(true_support)
        for j, s in enumerate(world.segments):
            for i, f in enumerate(world.features):
                if s in seg_pos and f in feat_pos:
                    est[j, i] = gamma[seg_pos[s], feat_pos[f]] != 0
        tp = int((est & true_support).sum())
        precision = tp / max(int(est.sum()), 1)
        recall = tp / max(int(true_support.sum()), 1)
        matches = np.linalg.norm(delta, axis=1) == 0
        agree = [true_zero.get(pair) == bool(z) for pair, z in zip(pairs, matches, strict=True)]
        rows.append(
            {
                "delta_zero_pattern_accuracy": float(np.mean(agree)),
                "gamma_support_f1": 2 * precision * recall / max(precision + recall, 1e-12),
                "gamma_support_precision": precision,
                "gamma_support_recall": recall,
            }
        )
    return pd.DataFrame(rows)
