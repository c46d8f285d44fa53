"""Fixed-effects heterogeneous-treatment-effect network (pure PyTorch, no Ray).

    y = beta(x_beta) * t + g(x_g) + sum_f FE_f[id_f] + intercept

Identification and normalisation
--------------------------------
* Each fixed effect is an ``nn.Embedding(n_ids, 1)``. Effects are identified only up to
  a constant per family, so after training :meth:`FixedEffectsHTE.normalize_` shifts
  every family to zero mean over its ids (unweighted) and moves the constants into
  ``intercept``. Predictions do not change.
* ``g`` has no output bias: its constant would be confounded with the intercept.
  A nonlinear ``g`` is still identified only up to an additive constant.
* A feature that is constant within some fixed-effect id (e.g. a user attribute with a
  user effect) is absorbed by that effect when it enters ``g``; only row-level
  (context) features belong in ``g``. Such features *can* enter ``beta``, because they
  multiply the treatment, which varies within ids.
* Features are standardised inside the model with fixed (buffer) means and scales
  taken from the data, so optimisation is well conditioned; :meth:`linear_coefficients`
  reports coefficients on the raw feature scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distributed_hte.models.config import MLPConfig
from distributed_hte.models.layers import activation

__all__ = ["MLP", "FixedEffectsHTE", "MLPConfig"]

_LINEAR = MLPConfig()


class MLP(nn.Module):
    """Standardise → [Linear → BatchNorm → act → Dropout]* → Linear(·, 1), plus a linear
    skip path from the standardised inputs when ``config.skip`` (nonlinear nets only).

    Input ``(batch, n_features)``, output ``(batch,)``.
    """

    def __init__(
        self,
        n_features: int,
        config: MLPConfig,
        *,
        mean: Sequence[float] | None = None,
        scale: Sequence[float] | None = None,
        output_bias: bool = True,
    ) -> None:
        super().__init__()
        self.n_features = n_features
        self.register_buffer(
            "mean",
            torch.tensor(mean if mean is not None else [0.0] * n_features, dtype=torch.float32),
        )
        self.register_buffer(
            "scale",
            torch.tensor(scale if scale is not None else [1.0] * n_features, dtype=torch.float32),
        )
        layers: list[nn.Module] = []
        width = n_features
        for h in config.hidden:
            layers.append(nn.Linear(width, h))
            if config.batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(activation(config.activation))
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1, bias=output_bias)
        self.is_linear = not config.hidden
        self.skip = nn.Linear(n_features, 1, bias=False) if config.skip and config.hidden else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.scale
        out = self.head(self.body(z))
        if self.skip is not None:
            out = out + self.skip(z)
        return out.squeeze(-1)

    def raw_linear_coefficients(self) -> tuple[float, torch.Tensor]:
        """(intercept, weights (n_features,)) on the raw feature scale; linear nets only."""
        if not self.is_linear:
            raise ValueError("coefficients exist only for a linear network (hidden: [])")
        w = self.head.weight.detach().double().squeeze(0) / self.scale.double()
        b = self.head.bias.detach().double().item() if self.head.bias is not None else 0.0
        return b - float((w * self.mean.double()).sum()), w


class FixedEffectsHTE(nn.Module):
    """The fe_hte model.

    Args:
        n_beta: number of features of beta, ``x_beta`` has shape ``(batch, n_beta)``.
        n_g: number of features of g (0: no g), ``x_g`` has shape ``(batch, n_g)``.
        fe_sizes: number of distinct ids of each fixed-effect family, in order.
        beta_config, g_config: sub-network architectures.
        beta_mean, beta_scale, g_mean, g_scale: standardisation of the inputs.
    """

    def __init__(
        self,
        n_beta: int,
        n_g: int,
        fe_sizes: Sequence[int],
        beta_config: MLPConfig = _LINEAR,
        g_config: MLPConfig = _LINEAR,
        *,
        beta_mean: Sequence[float] | None = None,
        beta_scale: Sequence[float] | None = None,
        g_mean: Sequence[float] | None = None,
        g_scale: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.beta_net = (
            MLP(n_beta, beta_config, mean=beta_mean, scale=beta_scale) if n_beta else None
        )
        # beta without features is a single constant slope.
        self.beta_const = None if n_beta else nn.Parameter(torch.zeros(()))
        self.g_net = (
            MLP(n_g, g_config, mean=g_mean, scale=g_scale, output_bias=False) if n_g else None
        )
        self.fixed_effects = nn.ModuleList(nn.Embedding(n, 1) for n in fe_sizes)
        for emb in self.fixed_effects:
            nn.init.zeros_(emb.weight)
        self.intercept = nn.Parameter(torch.zeros(()))

    def beta(self, x_beta: torch.Tensor) -> torch.Tensor:
        """Treatment effect per row, ``(batch,)``."""
        if self.beta_net is None:
            return self.beta_const.expand(x_beta.shape[0])
        return self.beta_net(x_beta)

    def g(self, x_g: torch.Tensor) -> torch.Tensor:
        """Direct effect per row, ``(batch,)`` (zeros when there are no g features)."""
        if self.g_net is None:
            return x_g.new_zeros(x_g.shape[0])
        return self.g_net(x_g)

    def fixed_effect_sum(self, ids: torch.Tensor) -> torch.Tensor:
        """Sum of fixed effects, ``ids`` is ``(batch, n_fe)`` int64 indices → ``(batch,)``."""
        total = self.intercept.expand(ids.shape[0])
        for f, emb in enumerate(self.fixed_effects):
            total = total + emb(ids[:, f]).squeeze(-1)
        return total

    def forward(
        self, x_beta: torch.Tensor, x_g: torch.Tensor, treatment: torch.Tensor, ids: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Return ``y_hat``, ``beta``, ``g``, each ``(batch,)``."""
        beta = self.beta(x_beta)
        g = self.g(x_g)
        y_hat = beta * treatment + g + self.fixed_effect_sum(ids)
        return {"y_hat": y_hat, "beta": beta, "g": g}

    @torch.no_grad()
    def normalize_(self, counts: Sequence[torch.Tensor] | None = None) -> None:
        """Shift each fixed-effect family to zero mean; the intercept absorbs the shift.

        ``counts`` (optional, one ``(n_ids,)`` tensor per family) restricts the mean to
        ids that were seen in training (count > 0); unseen ids are set to zero.
        """
        for f, emb in enumerate(self.fixed_effects):
            w = emb.weight[:, 0]
            seen = torch.ones_like(w, dtype=torch.bool) if counts is None else counts[f] > 0
            shift = w[seen].mean() if seen.any() else w.new_zeros(())
            w.sub_(shift)
            w[~seen] = 0.0
            self.intercept.add_(shift)

    def linear_coefficients(
        self, beta_names: Sequence[str], g_names: Sequence[str]
    ) -> dict[str, dict[str, float]]:
        """Raw-scale coefficients of whichever sub-networks are linear.

        Returns ``{"beta": {"(intercept)": c, name: c, ...}, "g": {name: c, ...},
        "intercept": c}``; a nonlinear sub-network is left out. ``intercept`` is the
        model constant on the raw feature scale, after :meth:`normalize_`.
        """
        out: dict = {}
        intercept = float(self.intercept.detach())
        if self.beta_net is None:
            out["beta"] = {"(intercept)": float(self.beta_const.detach())}
        elif self.beta_net.is_linear:
            b, w = self.beta_net.raw_linear_coefficients()
            out["beta"] = {
                "(intercept)": b,
                **{n: float(v) for n, v in zip(beta_names, w, strict=True)},
            }
        if self.g_net is not None and self.g_net.is_linear:
            b, w = self.g_net.raw_linear_coefficients()
            # The standardisation constant of g is confounded with the intercept.
            out["g"] = {n: float(v) for n, v in zip(g_names, w, strict=True)}
            intercept += b
        out["intercept"] = intercept
        return out
