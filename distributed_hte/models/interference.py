"""Nuisance networks of the interference estimator, as cross-fitting ensembles.

One query i has viewer features ``x`` ``(d_x,)``, a consideration set of up to ``K``
items with features ``z`` ``(K, d_z)``, a validity ``mask`` ``(K,)`` (real items first,
padding last), the items' treatment ``w`` ``(K,)``, the exposed position ``e`` and the
outcome ``y`` of the exposed item.

* choice net: (x, z_k) → (b_k, τ_k); exposure is MNL with scores b_k + w_k τ_k.
* response net: (x, z_k) → r_k, the response parameter (μ_k = r_k for a continuous
  outcome, μ_k = sigmoid(r_k) for a binary one).
* PDL net (benchmark): (x, z_1..K, w_1..K, mask) → outcome (a logit when binary).

Every net is an ensemble of ``M`` independent members evaluated in one batched matmul
(parameters ``(M, d_in, d_out)``). Cross-fitting over F query folds uses ``M = F``:
member f is trained only on queries outside fold f (:func:`fold_weights`), so all F
models train in one pass over the data. Pure PyTorch, no ray import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from distributed_hte.models.config import MLPConfig
from distributed_hte.models.layers import activation

# Score given to padded positions: exp(NEG - max) is exactly 0 in float32 and float64,
# and it stays finite, so no inf - inf or 0 * inf appears in a gradient.
NEG = -1e30


def NetConfig(hidden: Sequence[int] = (32, 32), activation: str = "silu") -> MLPConfig:  # noqa: N802
    """One ensemble MLP's hidden widths and activation (dropout and batchnorm are unused)."""
    return MLPConfig(tuple(hidden), activation=activation)


_DEFAULT_NET = NetConfig()
_DEFAULT_PDL_NET = NetConfig((64, 64))


class EnsembleLinear(nn.Module):
    """``M`` independent linear maps: ``(M, n, d_in)`` → ``(M, n, d_out)``."""

    def __init__(self, members: int, d_in: int, d_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(max(d_in, 1))
        self.weight = nn.Parameter(torch.empty(members, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, d_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class EnsembleMLP(nn.Module):
    """``M`` MLPs with the same shape. Input ``(n, d_in)`` (shared) or ``(M, n, d_in)``."""

    def __init__(self, members: int, d_in: int, d_out: int, cfg: MLPConfig) -> None:
        super().__init__()
        self.members = members
        dims = [d_in, *cfg.hidden, d_out]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(EnsembleLinear(members, dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(activation(cfg.activation))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.members, -1, -1)
        return self.net(x)


class InterferenceNets(nn.Module):
    """Choice, response and PDL ensembles of ``members`` models each.

    ``forward`` returns, for every member m: ``b``, ``tau``, ``r`` ``(M, n, K)`` and
    ``pdl`` ``(M, n)`` (the PDL prediction at the observed assignment). Inputs are
    standardised with the buffers ``x_mean/x_scale`` and ``z_mean/z_scale``.
    """

    def __init__(
        self,
        members: int,
        d_x: int,
        d_z: int,
        k_max: int,
        choice: MLPConfig = _DEFAULT_NET,
        response: MLPConfig = _DEFAULT_NET,
        pdl: MLPConfig = _DEFAULT_PDL_NET,
        x_mean: Sequence[float] | None = None,
        x_scale: Sequence[float] | None = None,
        z_mean: Sequence[float] | None = None,
        z_scale: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.members, self.d_x, self.d_z, self.k_max = members, d_x, d_z, k_max
        self.choice = EnsembleMLP(members, d_x + d_z, 2, choice)
        self.response = EnsembleMLP(members, d_x + d_z, 1, response)
        self.pdl = EnsembleMLP(members, d_x + k_max * (d_z + 2), 1, pdl)
        for name, values, size in [
            ("x_mean", x_mean, d_x),
            ("x_scale", x_scale, d_x),
            ("z_mean", z_mean, d_z),
            ("z_scale", z_scale, d_z),
        ]:
            default = 0.0 if name.endswith("mean") else 1.0
            t = torch.full((size,), default) if values is None else torch.as_tensor(values)
            self.register_buffer(name, t.float().clone())

    def _standardise(self, x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x - self.x_mean.to(x.dtype)) / self.x_scale.to(x.dtype)
        z = (z - self.z_mean.to(z.dtype)) / self.z_scale.to(z.dtype)
        return x, z

    def pair_outputs(
        self, x: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``b``, ``tau``, ``r`` ``(M, n, K)`` from ``x`` ``(n, d_x)`` and ``z`` ``(n, K, d_z)``."""
        x, z = self._standardise(x, z)
        n, k, _ = z.shape
        pairs = torch.cat([x.unsqueeze(1).expand(n, k, self.d_x), z], dim=-1).reshape(n * k, -1)
        bt = self.choice(pairs).reshape(self.members, n, k, 2)
        r = self.response(pairs).reshape(self.members, n, k)
        return bt[..., 0], bt[..., 1], r

    def pdl_output(
        self, x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """PDL prediction ``(M, n)`` at assignment ``w`` ``(n, K)``."""
        x, z = self._standardise(x, z)
        m = mask.to(z.dtype)
        n = x.shape[0]
        zin = (z * m.unsqueeze(-1)).reshape(n, -1)
        inp = torch.cat([x, zin, w.to(z.dtype) * m, m], dim=-1)
        return self.pdl(inp)[..., 0]

    def forward(
        self, x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        b, tau, r = self.pair_outputs(x, z)
        return {"b": b, "tau": tau, "r": r, "pdl": self.pdl_output(x, z, w, mask)}


def fold_weights(fold: torch.Tensor, members: int) -> torch.Tensor:
    """``(M, n)`` 0/1 weights: member m learns from the queries outside fold m.

    With one member (no cross-fitting) every query trains it.
    """
    if members == 1:
        return torch.ones(1, fold.shape[0], dtype=torch.float32, device=fold.device)
    ids = torch.arange(members, device=fold.device).unsqueeze(1)
    return (fold.unsqueeze(0) != ids).float()


def masked_scores(
    b: torch.Tensor, tau: torch.Tensor, w: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """MNL scores ``b + w τ`` with padded positions at ``NEG`` (any leading shape)."""
    u = b + w.to(b.dtype) * tau
    return torch.where(mask, u, torch.full_like(u, NEG))


def query_losses(
    out: dict[str, torch.Tensor],
    w: torch.Tensor,
    e: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    binary: bool,
) -> dict[str, torch.Tensor]:
    """Per member and query ``(M, n)``: choice cross-entropy, response loss, PDL loss.

    ``e`` ``(n,)`` is the exposed position; the response loss is ½(y − μ_e)² for a
    continuous outcome and the binary cross-entropy for a binary one (``r`` is a logit).
    """
    u = masked_scores(out["b"], out["tau"], w.unsqueeze(0), mask.unsqueeze(0))
    idx = e.view(1, -1, 1).expand(u.shape[0], -1, 1)
    choice = -(torch.log_softmax(u, dim=-1).gather(-1, idx)[..., 0])
    r_e = out["r"].gather(-1, idx)[..., 0]
    yy = y.to(r_e.dtype).unsqueeze(0).expand_as(r_e)
    pdl = out["pdl"]
    if binary:
        response = F.binary_cross_entropy_with_logits(r_e, yy, reduction="none")
        pdl_loss = F.binary_cross_entropy_with_logits(pdl, yy, reduction="none")
    else:
        response = 0.5 * (yy - r_e) ** 2
        pdl_loss = 0.5 * (yy - pdl) ** 2
    return {"choice": choice, "response": response, "pdl": pdl_loss}


def weighted_loss(losses: dict[str, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Sum of the three losses, averaged per member over its training queries, summed over members.

    Members share no parameters, so the sum trains each member on its own objective.
    """
    per_member = weights.sum(dim=1).clamp_min(1.0)
    total = losses["choice"] + losses["response"] + losses["pdl"]
    return ((total * weights).sum(dim=1) / per_member).sum()
