"""Ground-truth simulator for ``segments``: people, creatives, segments, binary responses.

m segments with unequal numbers of creatives n_j. Every segment has a sparse true centroid
γ_j (``active_features`` non-zero entries, on a support of its own). Most creatives match
their segment exactly (δ_k = 0); ``off_message`` creatives have a dense δ_k of norm
``off_message_norm``. Each person has p standard-normal covariates, is shown one creative
uniformly at random and responds with probability σ(c_k + (γ_j + δ_k)ᵀ x).

The true segment of a person is argmax_j (a_j + γ_jᵀ x), with a_j the mean intercept of
segment j's creatives: the rule the fitted model applies. ``truth.json`` holds every
true parameter. Chunk i draws from ``SeedSequence(seed, spawn_key=(1, i))``, so the data
depends on the seed and chunk size only.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from distributed_hte.simulate.chunks import atomic_folder, chunk_sizes, write_chunks
from distributed_hte.simulate.marker import SIMULATION_MARKER, simulation_marker


@dataclass(frozen=True)
class SegmentsSimConfig:
    """Size and shape of one simulated dataset."""

    n_people: int = 200_000
    n_features: int = 50
    creatives_per_segment: tuple[int, ...] = (3, 4, 5, 6)
    active_features: int = 5
    effect_low: float = 0.4
    effect_high: float = 0.9
    base_logit: float = -1.0
    intercept_sd: float = 0.1
    off_message: int = 2
    off_message_norm: float = 1.0
    seed: int = 0
    chunk_rows: int = 500_000


@dataclass(frozen=True)
class SegmentsWorld:
    """True parameters: ``segment_of (C,)``, ``gamma (m, p)``, ``delta (C, p)``, ``intercept (C,)``."""

    segments: list[str]
    creatives: np.ndarray  # (C,) int64 ids, unique across segments
    segment_of: np.ndarray  # (C,) int64 index into segments
    gamma: np.ndarray
    delta: np.ndarray
    intercept: np.ndarray
    features: list[str] = field(default_factory=list)

    def segment_intercepts(self) -> np.ndarray:
        """``(m,)`` a_j: mean creative intercept of each segment."""
        m = len(self.segments)
        return np.bincount(self.segment_of, weights=self.intercept, minlength=m) / np.bincount(
            self.segment_of, minlength=m
        )

    def true_segment(self, x: np.ndarray) -> np.ndarray:
        """``(n,)`` index of argmax_j a_j + γ_jᵀ x for features ``x (n, p)``."""
        return np.argmax(x @ self.gamma.T + self.segment_intercepts()[None, :], axis=1)


def make_world(cfg: SegmentsSimConfig) -> SegmentsWorld:
    """Draw the segments' centroids, the creatives and their deviations."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0,)))
    m, p = len(cfg.creatives_per_segment), cfg.n_features
    if cfg.active_features * m > p:
        raise ValueError("active_features × segments must not exceed n_features")
    segment_of = np.repeat(np.arange(m), cfg.creatives_per_segment)
    C = len(segment_of)
    gamma = np.zeros((m, p))
    support = rng.permutation(p)[: cfg.active_features * m].reshape(m, cfg.active_features)
    for j in range(m):
        size = rng.uniform(cfg.effect_low, cfg.effect_high, cfg.active_features)
        gamma[j, support[j]] = rng.choice([-1.0, 1.0], cfg.active_features) * size
    delta = np.zeros((C, p))
    off = rng.choice(C, size=min(cfg.off_message, C), replace=False)
    for k in off:
        v = rng.normal(size=p)
        delta[k] = cfg.off_message_norm * v / np.linalg.norm(v)
    intercept = cfg.base_logit + rng.normal(0.0, cfg.intercept_sd, C)
    creatives = np.sort(rng.choice(90_000, size=C, replace=False)).astype(np.int64) + 10_000
    return SegmentsWorld(
        segments=[f"seg_{chr(ord('a') + j)}" for j in range(m)],
        creatives=creatives,
        segment_of=segment_of,
        gamma=gamma,
        delta=delta,
        intercept=intercept,
        features=[f"x{i}" for i in range(p)],
    )


def simulate_chunk(world: SegmentsWorld, index: int, n_rows: int, seed: int) -> pa.Table:
    """Chunk ``index`` of ``n_rows`` people as an Arrow table."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index)))
    p = world.gamma.shape[1]
    x = rng.standard_normal((n_rows, p), dtype=np.float32)
    k = rng.integers(0, len(world.creatives), n_rows)
    beta = world.gamma[world.segment_of[k]] + world.delta[k]
    score = world.intercept[k] + np.einsum("ij,ij->i", x.astype(np.float64), beta)
    y = (rng.random(n_rows) < 1.0 / (1.0 + np.exp(-score))).astype(np.int8)
    cols: dict[str, np.ndarray] = {
        "segment": np.asarray(world.segments, dtype=object)[world.segment_of[k]],
        "creative": world.creatives[k],
        "y": y,
    }
    cols.update({name: x[:, i] for i, name in enumerate(world.features)})
    return pa.table(cols)


def truth_dict(world: SegmentsWorld) -> dict:
    """What ``truth.json`` holds: every true parameter, keyed by names."""
    return {
        "segments": world.segments,
        "features": world.features,
        "creatives": world.creatives.tolist(),
        "segment_of_creative": [world.segments[j] for j in world.segment_of],
        "gamma": world.gamma.tolist(),
        "delta": world.delta.tolist(),
        "intercept": world.intercept.tolist(),
        "segment_intercept": world.segment_intercepts().tolist(),
    }


def world_from_truth(truth: dict) -> SegmentsWorld:
    """Inverse of :func:`truth_dict`."""
    segments = list(truth["segments"])
    return SegmentsWorld(
        segments=segments,
        creatives=np.asarray(truth["creatives"], dtype=np.int64),
        segment_of=np.asarray([segments.index(s) for s in truth["segment_of_creative"]]),
        gamma=np.asarray(truth["gamma"]),
        delta=np.asarray(truth["delta"]),
        intercept=np.asarray(truth["intercept"]),
        features=list(truth["features"]),
    )


def simulate_segments(cfg: SegmentsSimConfig, out: str | Path, *, progress: bool = True) -> Path:
    """Write ``out/data/part-*.parquet``, ``out/truth.json`` and ``out/simulation.json``."""
    started = time.perf_counter()
    with atomic_folder(out) as tmp:
        (tmp / "data").mkdir()
        world = make_world(cfg)
        sizes = chunk_sizes(cfg.n_people, cfg.chunk_rows)
        write_chunks(
            partial(simulate_chunk, seed=cfg.seed),
            world,
            sizes,
            tmp / "data",
            "simulate segments",
            progress,
        )
        (tmp / "truth.json").write_text(json.dumps(truth_dict(world), indent=1))
        meta = simulation_marker(
            "segments",
            asdict(cfg),
            n_files=len(sizes),
            seconds=round(time.perf_counter() - started, 3),
        )
        (tmp / SIMULATION_MARKER).write_text(json.dumps(meta, indent=2))
    return Path(out)
