"""What Ray Train workers and Ray Data tasks of kind ``fe_hte`` run.

:class:`FeHtePlugin` is the generic loop's :class:`~distributed_hte.train.loop.TrainPlugin`
(build the model, batches → tensors, loss, evaluation sums); the ``*_batch`` functions are
``map_batches`` functions for evaluation and prediction, run as stateless tasks (a task
holds its CPU only while it works, so scoring never deadlocks with Train workers or Tune
trials on a small cluster).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distributed_hte.data.split import split_unit
from distributed_hte.evaluation.metrics import correlation_sums, regression_metrics, regression_sums
from distributed_hte.kinds.toolkit import ModelBundle, RowFilter, cached_torch_model
from distributed_hte.models.config import MLPConfig
from distributed_hte.models.fe_hte import FixedEffectsHTE

# Plain-JSON fields of the plugin stored in bundle.json (vocabularies go to vocab.npz).
_CONFIG_FIELDS = (
    "outcome",
    "treatment",
    "beta_features",
    "g_features",
    "fixed_effects",
    "beta_mean",
    "beta_scale",
    "g_mean",
    "g_scale",
    "fixed_effect_lr_multiplier",
)


@dataclass
class FeHtePlugin:
    """Everything a worker needs to build the model and read batches (picklable)."""

    outcome: str
    treatment: str
    beta_features: list[str]
    g_features: list[str]
    fixed_effects: list[str]
    vocab: dict[str, np.ndarray]
    beta_mean: list[float]
    beta_scale: list[float]
    g_mean: list[float]
    g_scale: list[float]
    beta_net: MLPConfig
    g_net: MLPConfig
    fixed_effect_lr_multiplier: float = 10.0
    # Weights training starts from (a ``state_dict`` saved by ``torch.save``); not part of
    # the bundle: the trained weights are.
    initial_state: bytes | None = None
    # Training only (not in the bundle). With rows kept in worker memory, the fixed effects
    # are not SGD parameters: after every epoch ``backfit_sweeps`` exact Gauss-Seidel sweeps
    # set them given the nets (backfitting). 0: SGD learns them with the nets.
    backfit_sweeps: int = 0
    cache_in_memory: bool = False

    # -- bundle ------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Plain JSON (the bundle's config); vocabularies are saved by :meth:`save_vocab`."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _CONFIG_FIELDS}
        out["beta_net"] = self.beta_net.to_dict()
        out["g_net"] = self.g_net.to_dict()
        return out

    def save_vocab(self, path) -> None:
        """Vocabularies as ``.npz`` (no pickles: string ids stored as unicode arrays)."""
        arrays = {}
        for col in self.fixed_effects:
            v = np.asarray(self.vocab[col])
            arrays[col] = v.astype(str) if v.dtype == object else v
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def from_bundle(cls, bundle: ModelBundle) -> FeHtePlugin:
        c = bundle.config["plugin"]
        with np.load(bundle.path("vocab"), allow_pickle=False) as z:
            vocab = {col: z[col] for col in c["fixed_effects"]}
        return cls(
            **{k: c[k] for k in _CONFIG_FIELDS},
            vocab=vocab,
            beta_net=MLPConfig.from_dict(c["beta_net"]),
            g_net=MLPConfig.from_dict(c["g_net"]),
        )

    # -- TrainPlugin -------------------------------------------------------------------
    @property
    def backfits(self) -> bool:
        """Whether :meth:`after_epoch` sets the fixed effects (they then take no SGD steps)."""
        return self.backfit_sweeps > 0 and self.cache_in_memory

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups: embeddings get ``lr_scale`` = the fixed-effect multiplier."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        fe = [p for n, p in named if n.startswith("fixed_effects.")]
        rest = [p for n, p in named if not n.startswith("fixed_effects.")]
        groups = [{"params": rest, "lr_scale": 1.0}]
        if fe:
            groups.append({"params": fe, "lr_scale": self.fixed_effect_lr_multiplier})
        return groups

    def after_epoch(
        self,
        model: torch.nn.Module,
        rows: dict[str, np.ndarray] | None,
        all_reduce: Any,
    ) -> dict[str, float]:
        """Backfitting: the fixed effects that best fit ``y − β(x)·T − g(x)`` given the nets.

        ``rows``: this worker's training rows (column → ``(n,)`` array); ``all_reduce``:
        ``(k,) float64 → (k,)`` summed over workers. Gauss-Seidel from the current effects:
        per family, each id's effect is the mean residual of its rows after the other
        families; ``backfit_sweeps`` sweeps over the families. Every rank computes the same
        numbers from all-reduced sums, so the DDP replicas stay equal. Each family ends
        with zero mean over its ids seen in training, the intercept taking the shift (as
        :meth:`FixedEffectsHTE.normalize_`). Returns metrics for the epoch's record.
        """
        if not self.backfits or rows is None:
            return {}
        t0 = time.perf_counter()
        device = next(model.parameters()).device
        n = len(rows[self.treatment])
        resid = np.empty(n, dtype=np.float64)
        ids = np.empty((n, len(self.fixed_effects)), dtype=np.int64)
        chunk = 65_536
        with torch.no_grad():
            for lo in range(0, n, chunk):
                part = {k: v[lo : lo + chunk] for k, v in rows.items()}
                b = self.to_tensors(part, device)
                nets = model.beta(b["x_beta"]) * b["t"] + model.g(b["x_g"])
                resid[lo : lo + chunk] = part[self.outcome] - nets.double().cpu().numpy()
                ids[lo : lo + chunk] = b["ids"].cpu().numpy()
        families = range(ids.shape[1])
        effects = [emb.weight[:, 0].detach().double().cpu().numpy() for emb in model.fixed_effects]
        effects[0] = effects[0] + float(model.intercept.detach())  # family 0 carries the level
        counts = [
            all_reduce(np.bincount(ids[:, f], minlength=len(effects[f])).astype(np.float64))
            for f in families
        ]
        fitted = sum(effects[f][ids[:, f]] for f in families)
        change = 0.0
        for _ in range(self.backfit_sweeps):
            change = 0.0
            for f in families:
                fitted -= effects[f][ids[:, f]]
                sums = all_reduce(
                    np.bincount(ids[:, f], weights=resid - fitted, minlength=len(effects[f]))
                )
                new = np.where(counts[f] > 0, sums / np.maximum(counts[f], 1.0), 0.0)
                change = max(change, float(np.max(np.abs(new - effects[f]), initial=0.0)))
                effects[f] = new
                fitted += effects[f][ids[:, f]]
        intercept = 0.0
        for f in families:
            seen = counts[f] > 0
            shift = float(effects[f][seen].mean()) if seen.any() else 0.0
            effects[f] = np.where(seen, effects[f] - shift, 0.0)
            intercept += shift
        with torch.no_grad():
            model.intercept.fill_(intercept)
            for emb, e in zip(model.fixed_effects, effects, strict=True):
                emb.weight[:, 0] = torch.as_tensor(e, dtype=emb.weight.dtype, device=device)
        return {
            "backfit_seconds": time.perf_counter() - t0,
            # Largest change of an effect in the last sweep: how far from the fixed point.
            "backfit_last_sweep_change": change,
        }

    @property
    def columns(self) -> list[str]:
        return [
            self.outcome,
            self.treatment,
            *self.beta_features,
            *self.g_features,
            *self.fixed_effects,
        ]

    def build_model(self) -> FixedEffectsHTE:
        """The model, holding :attr:`initial_state` when one is set."""
        model = FixedEffectsHTE(
            len(self.beta_features),
            len(self.g_features),
            [len(self.vocab[c]) for c in self.fixed_effects],
            self.beta_net,
            self.g_net,
            beta_mean=self.beta_mean,
            beta_scale=self.beta_scale,
            g_mean=self.g_mean,
            g_scale=self.g_scale,
        )
        if self.initial_state is not None:
            state = torch.load(
                io.BytesIO(self.initial_state), map_location="cpu", weights_only=True
            )
            model.load_state_dict(state)
        if self.backfits:
            # Set by after_epoch, not by the optimizer (and not in the gradient test).
            model.intercept.requires_grad_(False)
            for emb in model.fixed_effects:
                emb.weight.requires_grad_(False)
        return model

    def encode_ids(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Map raw ids to embedding rows: ``(n, n_fe)`` int64 and an ``(n,)`` unseen mask."""
        n = len(batch[self.treatment])
        idx = np.zeros((n, len(self.fixed_effects)), dtype=np.int64)
        unseen = np.zeros(n, dtype=bool)
        for f, col in enumerate(self.fixed_effects):
            vocab = self.vocab[col]
            values = np.asarray(batch[col])
            if vocab.dtype.kind == "U" and values.dtype == object:
                values = values.astype(str)
            pos = np.searchsorted(vocab, values)
            pos = np.minimum(pos, len(vocab) - 1)
            miss = vocab[pos] != values
            unseen |= miss
            idx[:, f] = pos
            idx[miss, f] = -1
        return idx, unseen

    def to_tensors(
        self, batch: dict[str, np.ndarray], device: torch.device
    ) -> dict[str, torch.Tensor]:
        def stack(cols: list[str]) -> torch.Tensor:
            if not cols:
                return torch.zeros(
                    (len(batch[self.treatment]), 0), dtype=torch.float32, device=device
                )
            arr = np.column_stack([np.asarray(batch[c], dtype=np.float32) for c in cols])
            return torch.from_numpy(arr).to(device, non_blocking=True)

        ids, unseen = self.encode_ids(batch)
        if unseen.any():
            # Unseen ids only happen at predict time; they get the mean effect (zero).
            ids = np.where(ids < 0, 0, ids)
        out = {
            "x_beta": stack(self.beta_features),
            "x_g": stack(self.g_features),
            "t": torch.from_numpy(np.asarray(batch[self.treatment], dtype=np.float32)).to(device),
            "ids": torch.from_numpy(ids).to(device),
        }
        if self.outcome in batch:
            out["y"] = torch.from_numpy(np.asarray(batch[self.outcome], dtype=np.float32)).to(
                device
            )
        return out

    def loss(self, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        y_hat = model(b["x_beta"], b["x_g"], b["t"], b["ids"])["y_hat"]
        return torch.nn.functional.mse_loss(y_hat.float(), b["y"])

    def eval_sums(self, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> dict[str, float]:
        y_hat = model(b["x_beta"], b["x_g"], b["t"], b["ids"])["y_hat"]
        return regression_sums(b["y"].double().cpu().numpy(), y_hat.double().cpu().numpy())

    def eval_metrics(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        return regression_metrics(sums, prefix)


# ----------------------------------------------------------------------------- Ray Data


def _model(plugin: FeHtePlugin, state: bytes) -> FixedEffectsHTE:
    return cached_torch_model("fe_hte", state, plugin.build_model)


def predict_batch(
    batch: dict[str, np.ndarray], plugin: FeHtePlugin, state: bytes, keep: list[str]
) -> dict[str, np.ndarray]:
    """``keep`` columns plus ``beta_hat``, ``g_hat``, ``y_hat`` ``(n,)`` and ``fe_unseen``."""
    model = _model(plugin, state)
    b = plugin.to_tensors(batch, torch.device("cpu"))
    with torch.no_grad():
        out = model(b["x_beta"], b["x_g"], b["t"], b["ids"])
    _, unseen = plugin.encode_ids(batch)
    res = {c: np.asarray(batch[c]) for c in keep if c in batch}
    res.update(
        beta_hat=out["beta"].numpy().astype(np.float64),
        g_hat=out["g"].numpy().astype(np.float64),
        y_hat=out["y_hat"].numpy().astype(np.float64),
        fe_unseen=unseen,
    )
    return res


def evaluation_sums_batch(
    batch: dict[str, np.ndarray],
    plugin: FeHtePlugin,
    state: bytes,
    split_key: list[str] | None,
    val_fraction: float,
    beta_true: str | None,
    g_true: str | None,
    rows: RowFilter | None = None,
) -> dict[str, np.ndarray]:
    """One row of additive metric sums per batch (``train_*``/``val_*``, truth correlations).

    Without ``split_key`` every row counts as ``train``: the sums of one dataset.
    """
    if rows is not None:
        keep = rows.mask(batch)
        batch = {k: v[keep] for k, v in batch.items()}
    pred = predict_batch(batch, plugin, state, [])
    y = np.asarray(batch[plugin.outcome], dtype=np.float64)
    if split_key and val_fraction > 0:
        is_val = split_unit(batch, split_key) < val_fraction
    else:
        is_val = np.zeros(len(y), dtype=bool)
    sums: dict[str, float] = {}
    for side, mask in (("train", ~is_val), ("val", is_val)):
        for k, v in regression_sums(y[mask], pred["y_hat"][mask]).items():
            sums[f"{side}_{k}"] = v
    if beta_true and beta_true in batch:
        sums.update(correlation_sums(pred["beta_hat"], np.asarray(batch[beta_true]), "beta"))
    if g_true and g_true in batch:
        sums.update(correlation_sums(pred["g_hat"], np.asarray(batch[g_true]), "g"))
    return {k: np.array([v]) for k, v in sums.items()}
