"""What Ray Data tasks of kind ``segments`` run, and the fitted model they use.

Segment rule: person i goes to argmax_j a_j + γ_jᵀ x̃_i, where x̃ are the (standardised)
covariates and a_j is the mean intercept of segment j's creatives (the response of an
average person to the segment's average creative). A creative k's own model is
logit p = c_k + (γ_seg(k) + δ_k)ᵀ x̃.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from distributed_hte.kinds.toolkit import ModelBundle, RowFilter
from distributed_hte.simulate import segments as sim
from distributed_hte.train.segments_worker import SegmentsEncoder

_ENCODER_FIELDS = ("segment", "creative", "label", "features", "n_folds", "fold_key")
_ENCODER_ARRAYS = ("segment_vocab", "creative_vocab", "pair_keys", "mean", "scale")


@dataclass
class SegmentsModel:
    """The encoder and the selected refit: what ``predict`` and ``evaluate`` need."""

    encoder: SegmentsEncoder
    segment_intercept: np.ndarray  # (m,) a_j
    gamma: np.ndarray  # (m, p)
    creative_intercept: np.ndarray  # (C,) c_k
    delta: np.ndarray  # (C, p)

    def scores(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """``(n, m)`` segment scores a_j + γ_jᵀ x̃."""
        x = self.encoder.features_matrix(batch).astype(np.float64)
        return x @ self.gamma.T + self.segment_intercept[None, :]

    # -- bundle ------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        e = self.encoder
        return {"encoder": {k: getattr(e, k) for k in _ENCODER_FIELDS}}

    def save_arrays(self, path) -> None:
        e = self.encoder
        arrays = {k: _plain_array(getattr(e, k)) for k in _ENCODER_ARRAYS}
        arrays.update(
            segment_intercept=self.segment_intercept,
            gamma=self.gamma,
            creative_intercept=self.creative_intercept,
            delta=self.delta,
        )
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def from_bundle(cls, bundle: ModelBundle) -> SegmentsModel:
        with np.load(bundle.path("arrays"), allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        enc = SegmentsEncoder(**bundle.config["encoder"], **{k: a[k] for k in _ENCODER_ARRAYS})
        return cls(enc, a["segment_intercept"], a["gamma"], a["creative_intercept"], a["delta"])


def _plain_array(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v)
    return v.astype(str) if v.dtype == object else v


def _decode(batch: dict[str, np.ndarray], enc: SegmentsEncoder) -> dict[str, np.ndarray]:
    # Ids of a bundle come back as unicode arrays; parquet strings arrive as objects.
    out = dict(batch)
    for col, vocab in ((enc.segment, enc.segment_vocab), (enc.creative, enc.creative_vocab)):
        if col in out and vocab.dtype.kind == "U" and np.asarray(out[col]).dtype == object:
            out[col] = np.asarray(out[col]).astype(str)
    return out


def predict_batch(
    batch: dict[str, np.ndarray], model: SegmentsModel, keep: list[str]
) -> dict[str, np.ndarray]:
    """``keep`` columns, ``segment_assigned`` and ``score_<segment>`` ``(n,)`` each."""
    scores = model.scores(batch)
    names = model.encoder.segment_vocab
    out = {c: np.asarray(batch[c]) for c in keep if c in batch}
    out["segment_assigned"] = names[np.argmax(scores, axis=1)]
    for j, name in enumerate(names):
        out[f"score_{name}"] = scores[:, j]
    return out


def evaluation_batch(
    batch: dict[str, np.ndarray], model: SegmentsModel, rows: RowFilter | None
) -> dict[str, np.ndarray]:
    """One row of sums: log loss and accuracy of each row's own creative model, and the
    number of people assigned to each segment."""
    if rows is not None:
        keep = rows.mask(batch)
        batch = {k: v[keep] for k, v in batch.items()}
    enc = model.encoder
    batch = _decode(batch, enc)
    idx, known = enc.creative_index(batch)
    x = enc.features_matrix(batch).astype(np.float64)
    y = np.asarray(batch[enc.label], dtype=np.float64)
    seg_of = enc.pair_keys // len(enc.creative_vocab)
    beta = model.gamma[seg_of[idx]] + model.delta[idx]  # (n, p)
    logit = model.creative_intercept[idx] + np.einsum("np,np->n", x, beta)
    k = known
    # log(1 + e^z) - y z, stable
    loss = np.logaddexp(0.0, logit[k]) - y[k] * logit[k]
    out = {
        "n": np.array([float(len(y))]),
        "n_known": np.array([float(k.sum())]),
        "log_loss_sum": np.array([float(loss.sum())]),
        "correct": np.array([float(((logit[k] > 0) == (y[k] > 0.5)).sum())]),
    }
    assigned = np.argmax(model.scores(batch), axis=1)
    for j, count in enumerate(np.bincount(assigned, minlength=len(enc.segment_vocab))):
        out[f"assigned:{j}"] = np.array([float(count)])
    return out


def assignment_sums_batch(
    batch: dict[str, np.ndarray], model: SegmentsModel, truth: dict
) -> dict[str, np.ndarray]:
    """Rows whose estimated segment equals the true one (simulated data only)."""
    world = sim.world_from_truth(truth)
    est = model.encoder.segment_vocab[np.argmax(model.scores(batch), axis=1)]
    x = np.column_stack([np.asarray(batch[c], dtype=np.float64) for c in world.features])
    true = np.asarray(world.segments, dtype=object)[world.true_segment(x)]
    return {"n": np.array([len(est)]), "agree": np.array([int((est == true).sum())])}


def creative_block(table: pa.Table, segment: str, creative: str, label: str) -> pa.Table:
    """People and positives per (segment, creative) of one block."""
    out = table.group_by([segment, creative]).aggregate([(label, "count"), (label, "sum")])
    return pa.table(
        {
            "segment": out[segment],
            "creative": out[creative],
            "n_people": out[f"{label}_count"].cast(pa.int64()),
            "n_positive": out[f"{label}_sum"].cast(pa.float64()),
        }
    )
