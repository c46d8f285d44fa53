"""What Ray Train workers and Ray Data tasks of kind ``interference`` run.

:class:`InterferencePlugin` is the generic loop's plugin (all F cross-fitting members of
the choice, response and PDL nets train together); :func:`estimation_batch` computes every
query's estimator terms with its own fold's member; :func:`predict_group` scores one
query's rows for ``dhte predict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from distributed_hte.estimators import interference as est
from distributed_hte.estimators.crossfit import own_fold
from distributed_hte.kinds.interference.data import Layout, query_fold
from distributed_hte.kinds.toolkit import cached_torch_model
from distributed_hte.models.config import MLPConfig
from distributed_hte.models.interference import (
    InterferenceNets,
    fold_weights,
    masked_scores,
    query_losses,
    weighted_loss,
)

_CONFIG_FIELDS = (
    "d_x", "d_z", "k_max", "folds", "val_fraction", "binary",
    "x_mean", "x_scale", "z_mean", "z_scale", "columns", "cache_in_memory",
)  # fmt: skip


@dataclass
class InterferencePlugin:
    """What the training workers and estimation tasks need (picklable)."""

    d_x: int
    d_z: int
    k_max: int
    folds: int
    val_fraction: float
    binary: bool
    choice_net: MLPConfig
    response_net: MLPConfig
    pdl_net: MLPConfig
    x_mean: list[float]
    x_scale: list[float]
    z_mean: list[float]
    z_scale: list[float]
    columns: list[str] = field(default_factory=lambda: ["query", "x", "z", "w", "mask", "e", "y"])
    # Keep each worker's shard in its memory after the first epoch (small data).
    cache_in_memory: bool = False

    # -- bundle ------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """Plain JSON for the model bundle."""
        out: dict[str, Any] = {k: getattr(self, k) for k in _CONFIG_FIELDS}
        for name in ("choice_net", "response_net", "pdl_net"):
            out[name] = getattr(self, name).to_dict()
        return out

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> InterferencePlugin:
        nets = {n: MLPConfig.from_dict(c[n]) for n in ("choice_net", "response_net", "pdl_net")}
        return cls(**{k: c[k] for k in _CONFIG_FIELDS}, **nets)

    def build_model(self) -> InterferenceNets:
        return InterferenceNets(
            self.folds,
            self.d_x,
            self.d_z,
            self.k_max,
            self.choice_net,
            self.response_net,
            self.pdl_net,
            self.x_mean,
            self.x_scale,
            self.z_mean,
            self.z_scale,
        )

    def to_tensors(
        self, batch: dict[str, np.ndarray], device: torch.device
    ) -> dict[str, torch.Tensor]:
        def t(a, dtype):
            return torch.as_tensor(np.asarray(a), dtype=dtype).to(device, non_blocking=True)

        out = {
            "x": t(batch["x"], torch.float32),
            "z": t(batch["z"], torch.float32),
            "w": t(batch["w"], torch.float32),
            "mask": t(batch["mask"], torch.bool),
            "e": t(batch["e"], torch.int64),
            "fold": t(query_fold(batch["query"], self.folds), torch.int64),
        }
        if "y" in batch:
            out["y"] = t(batch["y"], torch.float32)
        return out

    def _losses(self, model: torch.nn.Module, b: dict[str, torch.Tensor]):
        out = model(b["x"], b["z"], b["w"], b["mask"])
        losses = query_losses(
            {k: v.float() for k, v in out.items()}, b["w"], b["e"], b["y"], b["mask"], self.binary
        )
        return losses, fold_weights(b["fold"], self.folds)

    def loss(self, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        losses, weights = self._losses(model, b)
        return weighted_loss(losses, weights)

    def eval_sums(self, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> dict[str, float]:
        losses, weights = self._losses(model, b)
        sums = {f"{k}_sum": float((v * weights).sum()) for k, v in losses.items()}
        sums["weight"] = float(weights.sum())
        return sums

    def eval_metrics(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        n = max(sums.get("weight", 0.0), 1.0)
        parts = {k: sums.get(f"{k}_sum", 0.0) / n for k in ("choice", "response", "pdl")}
        out = {f"{prefix}{k}_loss": v for k, v in parts.items()}
        # The sum of the three, as the training loss (each member's mean, summed over members).
        out[f"{prefix}loss"] = sum(parts.values()) * self.folds
        out[f"{prefix}queries"] = n / max(self.folds - 1, 1)
        return out


# ----------------------------------------------------------------------------- estimation


def _cached_model(plugin: InterferencePlugin, state: bytes) -> InterferenceNets:
    return cached_torch_model("interference", state, plugin.build_model)


def estimation_batch(
    batch: dict[str, np.ndarray],
    plugin: InterferencePlugin,
    state: bytes,
    settings: est.DBSettings,
    truth: list[str],
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: per-query estimator terms with the own fold's member."""
    model = _cached_model(plugin, state)
    tb = plugin.to_tensors(batch, torch.device("cpu"))
    x, z, w, mask, e, fold = tb["x"], tb["z"], tb["w"], tb["mask"], tb["e"], tb["fold"]
    with torch.no_grad():
        b, tau, r = model.pair_outputs(x, z)
        f_obs = model.pdl_output(x, z, w, mask)
        f1 = model.pdl_output(x, z, torch.ones_like(w), mask)
        f0 = model.pdl_output(x, z, torch.zeros_like(w), mask)
    d = est.DTYPE
    own = {k: own_fold(v, fold).to(d) for k, v in dict(b=b, tau=tau, r=r).items()}
    pdl = {k: own_fold(v, fold).to(d) for k, v in dict(obs=f_obs, one=f1, zero=f0).items()}
    if plugin.binary:
        pdl = {k: torch.sigmoid(v) for k, v in pdl.items()}
    y = torch.as_tensor(batch["y"], dtype=d)
    group = torch.as_tensor(batch["group"]) if "group" in batch else None
    qb = est.QueryBatch(own["b"], own["tau"], own["r"], w.to(d), mask, e, y, group)
    infl = est.db_influence(qb, settings)
    terms = est.benchmark_terms(qb.w, e, y, mask, settings.p, pdl["obs"], pdl["one"], pdl["zero"])
    we = est.exposed_treated(qb.w, e)
    u = masked_scores(own["b"], own["tau"], qb.w, mask)
    p_model = torch.softmax(u, dim=-1)
    mu = torch.sigmoid(own["r"]) if plugin.binary else own["r"]
    out: dict[str, np.ndarray] = {
        "query": np.asarray(batch["query"]),
        "fold": fold.numpy(),
        "size": mask.sum(dim=1).numpy(),
        "y": y.numpy(),
        "exposed_treated": we.numpy(),
        # The model's share of exposures to treated items in this query (diagnostic).
        "model_treated_share": (p_model * qb.w).sum(dim=1).numpy(),
        "ridge": infl.ridge.numpy(),
        "resid": (y - mu.gather(1, e.unsqueeze(1))[:, 0]).numpy(),
    }
    for j, name in enumerate(infl.names):
        out[f"theta:{name}"] = infl.theta[:, j].numpy()
        out[f"psi:{name}"] = infl.psi[:, j].numpy()
    for name, values in terms.items():
        out[f"term:{name}"] = values.numpy()
    x_np = np.asarray(batch["x"], dtype=np.float64)
    for j in range(x_np.shape[1]):
        out[f"x{j}"] = x_np[:, j]
    m = mask.numpy()
    for c, pred in (("tau_true", own["tau"]), ("mu_true", mu)):
        if c in truth:
            tr = np.asarray(batch[c], dtype=np.float64)
            p = pred.numpy()
            out[f"sum:{c}:n"] = m.sum(axis=1).astype(np.float64)
            for key, val in (
                ("a", p),
                ("b", tr),
                ("aa", p * p),
                ("bb", tr * tr),
                ("ab", p * tr),
            ):
                out[f"sum:{c}:{key}"] = (val * m).sum(axis=1)
    return out


def predict_group(
    group: dict[str, np.ndarray],
    plugin: InterferencePlugin,
    state: bytes,
    layout: Layout,
    keep: list[str],
) -> dict[str, np.ndarray]:
    """``map_groups`` function of ``predict``: one query's rows, scored."""
    model = _cached_model(plugin, state)
    n = len(group[layout.query])
    x = np.array([[float(np.asarray(group[c])[0]) for c in layout.viewer_features]], np.float32)
    z = np.stack([np.asarray(group[c], np.float32) for c in layout.item_features], axis=-1)[None]
    with torch.no_grad():
        b, tau, r = model.pair_outputs(torch.from_numpy(x), torch.from_numpy(z))
    b, tau, r = b[:, 0].double(), tau[:, 0].double(), r[:, 0].double()  # (M, n)
    b = b - b.mean(dim=1, keepdim=True)
    mu = torch.sigmoid(r) if plugin.binary else r
    out = {c: np.asarray(group[c]) for c in [layout.query, *keep]}
    out.update(
        b_hat=b.mean(0).numpy(),
        tau_hat=tau.mean(0).numpy(),
        mu_hat=mu.mean(0).numpy(),
        p_control=torch.softmax(b, dim=1).mean(0).numpy(),
        p_treatment=torch.softmax(b + tau, dim=1).mean(0).numpy(),
    )
    if layout.treated in group:
        w = torch.as_tensor(np.asarray(group[layout.treated], np.float64))
        out["p_observed"] = torch.softmax(b + w * tau, dim=1).mean(0).numpy()
    assert all(len(v) == n for v in out.values())
    return out
