"""What Ray Train workers of kind ``mmm`` run, and the driver-side decomposition.

:class:`MmmPlugin` is the generic loop's plugin: a sample is one region's whole series
(``region``, ``week`` (T,), ``media`` (T, C), ``controls`` (T, K), ``y`` (T,), ``mask``
(T,): 1 on the region's observed fit weeks). :func:`decompose` runs a fitted model over
a whole panel and returns every component in KPI units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distributed_hte.models.mmm import DeepMMM, MmmConfig, mmm_loss


@dataclass
class MmmPlugin:
    """The generic loop's plugin (picklable)."""

    model: MmmConfig
    columns: tuple[str, ...] = ("region", "week", "media", "controls", "y", "mask")
    # A panel is small: keep each worker's regions in memory after the first epoch.
    cache_in_memory: bool = True

    def to_config(self) -> dict[str, Any]:
        return {"model": self.model.to_dict()}

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> MmmPlugin:
        return cls(MmmConfig.from_dict(raw["model"]))

    def build_model(self) -> DeepMMM:
        return DeepMMM(self.model)

    def to_tensors(
        self, batch: dict[str, np.ndarray], device: torch.device
    ) -> dict[str, torch.Tensor]:
        def t(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(np.asarray(batch[name]), dtype=dtype).to(device)

        out = {
            "region": t("region", torch.int64),
            "week": t("week", torch.float32),
            "media": t("media", torch.float32),
            "y": t("y", torch.float32),
            "mask": t("mask", torch.float32),
        }
        if len(self.model.controls):
            out["controls"] = t("controls", torch.float32)
        else:
            b, w = out["week"].shape
            out["controls"] = torch.zeros((b, w, 0), device=device)
        return out

    def _losses(self, model: torch.nn.Module, b: dict[str, torch.Tensor]):
        out = model(b["region"], b["week"], b["media"], b["controls"])
        return mmm_loss(out, b["y"], b["mask"], self.model.huber_delta, self.model.tv_penalty)

    def loss(self, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._losses(model, b)[0]

    def eval_sums(self, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> dict[str, float]:
        total, fit = self._losses(model, b)
        n = float(b["mask"].sum())
        return {"loss_sum": float(total) * n, "fit_sum": float(fit) * n, "n": n}

    def eval_metrics(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        n = max(sums.get("n", 0.0), 1.0)
        return {
            f"{prefix}loss": sums.get("loss_sum", 0.0) / n,
            f"{prefix}huber": sums.get("fit_sum", 0.0) / n,
        }


def region_rows(
    inputs: dict[str, np.ndarray], fit: np.ndarray, week: np.ndarray
) -> list[dict[str, Any]]:
    """One training sample per region.

    Args: inputs from :func:`~distributed_hte.kinds.mmm.data.scaled` (``y`` (R, T),
    ``media`` (R, T, C), ``controls`` (R, T, K)); fit ``(R, T)`` bool; week ``(T,)``.
    """
    rows = []
    for r in range(fit.shape[0]):
        row = {
            "region": np.int64(r),
            "week": week.astype(np.float32),
            "media": inputs["media"][r],
            "y": inputs["y"][r],
            "mask": fit[r].astype(np.float32),
        }
        if inputs["controls"].shape[2]:
            row["controls"] = inputs["controls"][r]
        rows.append(row)
    return rows


def load_model(cfg: MmmConfig, state: dict[str, torch.Tensor]) -> DeepMMM:
    """A fitted model in eval mode (float64 on the driver: exact decompositions)."""
    model = DeepMMM(cfg)
    model.load_state_dict(state)
    return model.double().eval()


def decompose(
    model: DeepMMM,
    inputs: dict[str, np.ndarray],
    kpi_scale: np.ndarray,
    week: np.ndarray,
    region: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every component in KPI units for the whole panel (or some of its regions).

    Args: inputs (scaled, as :func:`region_rows` takes); kpi_scale ``(R,)``; week ``(T,)``;
    region ``(R,)`` the model's region index of each row (default ``0 .. R − 1``).
    Returns ``baseline``, ``trend``, ``seasonality``, ``pred`` ``(R, T)``; ``controls``
    ``(R, T, K)``; ``media`` ``(R, T, C)``; ``coef`` ``(R, T, C)``: each channel's
    coefficient β_c·exp(δ) (scaled units).
    """
    r_n, t_n = inputs["y"].shape
    with torch.no_grad():
        out = model(
            torch.arange(r_n) if region is None else torch.as_tensor(region, dtype=torch.int64),
            torch.as_tensor(np.broadcast_to(week, (r_n, t_n)).copy(), dtype=torch.float64),
            torch.as_tensor(inputs["media"], dtype=torch.float64),
            torch.as_tensor(inputs["controls"], dtype=torch.float64),
        )
        coef = model.coef() * torch.exp(out["delta"])
    s = kpi_scale[:, None]
    res = {k: out[k].numpy() * s for k in ("baseline", "trend", "seasonality", "pred")}
    res["controls"] = out["controls"].numpy() * s[..., None]
    res["media"] = out["media"].numpy() * s[..., None]
    res["coef"] = coef.numpy()
    return res


def media_only(
    model: DeepMMM, media: np.ndarray, coef: np.ndarray, kpi_scale: np.ndarray
) -> np.ndarray:
    """Media terms ``(R, T, C)`` in KPI units for scaled ``media`` with fixed ``coef``.

    The coefficients do not depend on media (the GRU never sees it), so a counterfactual
    activity changes only the adstock and Hill part.
    """
    with torch.no_grad():
        h = model.media_response(torch.as_tensor(media, dtype=torch.float64)).numpy()
    return h * coef * kpi_scale[:, None, None]
