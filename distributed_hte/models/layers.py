"""Layers every model family shares (pure PyTorch, no Ray)."""

from __future__ import annotations

from torch import nn

from distributed_hte.models.config import ACTIVATION_NAMES

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "silu": nn.SiLU,
}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (one of :data:`ACTIVATION_NAMES`)."""
    return ACTIVATIONS[name]()
