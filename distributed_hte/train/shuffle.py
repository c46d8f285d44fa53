"""Seeded row order for the training loop. Pure: numpy only, no ray, no torch.

Every epoch of every worker gets its own seed, a function of ``train.seed``, the epoch
and the worker's rank only, so a re-run of the same spec on the same data replays the
same order (see ``distributed_hte/train/ingest.py`` for the Ray Data side).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

Batch = dict[str, np.ndarray]


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 32-bit seed for one worker's epoch; distinct for every (seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def concat_batches(batches: list[Batch]) -> Batch:
    """One column dict from a list of batches with the same columns (the row cache)."""
    if not batches:
        return {}
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def cached_batches(
    rows: Batch, batch_size: int, drop_last: bool, seed: int | None
) -> Iterator[Batch]:
    """Batches of one epoch from cached ``rows``, in a fresh random row order.

    ``seed`` None keeps the stored order. Rows are permuted, not only batches, so every
    epoch mixes different rows into each batch. The batch count depends only on the row
    count, so DDP ranks with equal shards stay in lockstep.
    """
    n = len(next(iter(rows.values()))) if rows else 0
    order = np.random.default_rng(seed).permutation(n) if seed is not None else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield {k: v[start : start + batch_size] for k, v in rows.items()}
        else:
            idx = order[start : start + batch_size]
            yield {k: v[idx] for k, v in rows.items()}
