"""Architecture configs of the networks (plain dataclasses: no torch import).

Specs build these, model bundles store them as JSON, and :mod:`distributed_hte.models.layers`
turns them into modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Activation = Literal["relu", "gelu", "tanh", "silu"]
ACTIVATION_NAMES: tuple[str, ...] = ("relu", "gelu", "tanh", "silu")


@dataclass(frozen=True, slots=True)
class MLPConfig:
    """Architecture of one sub-network. ``hidden=()`` means linear.

    ``skip``: a linear path from the inputs to the output beside the hidden layers (wide
    and deep); it lets a warm start hold a linear fit while the hidden layers learn the rest.
    """

    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    batchnorm: bool = False
    activation: str = "relu"
    skip: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "hidden": list(self.hidden),
            "dropout": self.dropout,
            "batchnorm": self.batchnorm,
            "activation": self.activation,
            "skip": self.skip,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> MLPConfig:
        return cls(
            tuple(raw.get("hidden", ())),
            float(raw.get("dropout", 0.0)),
            bool(raw.get("batchnorm", False)),
            str(raw.get("activation", "relu")),
            bool(raw.get("skip", False)),
        )
