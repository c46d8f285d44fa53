"""Warm start of an fe_hte fit from a previous model (``retrain.init_from``).

The new model is built for the new data (its vocabularies); the previous model's weights
are mapped onto it: the beta and g networks start from its weights and keep its input
standardisation (the ``mean``/``scale`` buffers, so scores stay comparable across
refreshes), each fixed effect of an id it knew keeps its value, an id it never saw starts
at zero (the mean effect, as at prediction time), and the intercept is kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distributed_hte.errors import SpecError


def map_state(new_plugin: Any, old_plugin: Any, old_state: dict[str, torch.Tensor]):
    """The initial state_dict for ``new_plugin``'s model and a summary of the mapping.

    Args:
        new_plugin, old_plugin: :class:`~distributed_hte.kinds.fe_hte.plugin.FeHtePlugin`
            of the new fit and of the previous model.
        old_state: the previous model's state_dict.

    Returns ``(state, summary)``; ``summary[col]`` = ``{"known_ids", "new_ids"}``.
    """
    for field in ("beta_features", "g_features", "fixed_effects"):
        old, new = getattr(old_plugin, field), getattr(new_plugin, field)
        if list(old) != list(new):
            raise SpecError(
                f"warm start: data.{field} is {list(new)}, the model started from has "
                f"{list(old)}; a warm start needs the same columns (or set retrain.init_from: null)"
            )
    state = new_plugin.build_model().state_dict()
    summary: dict[str, Any] = {}
    for key, value in state.items():
        if key.startswith("fixed_effects."):
            continue
        if key not in old_state or tuple(old_state[key].shape) != tuple(value.shape):
            found = tuple(old_state[key].shape) if key in old_state else "nothing"
            raise SpecError(
                f"warm start: {key} has shape {tuple(value.shape)} here and {found} in the model "
                "started from; a warm start needs the same network architecture"
            )
        state[key] = old_state[key].clone()
    for f, col in enumerate(new_plugin.fixed_effects):
        key = f"fixed_effects.{f}.weight"
        new_vocab, old_vocab = np.asarray(new_plugin.vocab[col]), np.asarray(old_plugin.vocab[col])
        if new_vocab.dtype.kind != old_vocab.dtype.kind:
            new_vocab, old_vocab = new_vocab.astype(str), old_vocab.astype(str)
        pos = np.minimum(np.searchsorted(old_vocab, new_vocab), max(len(old_vocab) - 1, 0))
        known = (old_vocab[pos] == new_vocab) if len(old_vocab) else np.zeros(len(new_vocab), bool)
        weight = torch.zeros_like(state[key])
        idx = torch.from_numpy(np.flatnonzero(known))
        weight[idx] = old_state[key][torch.from_numpy(pos[known])].to(weight.dtype)
        state[key] = weight
        summary[col] = {"known_ids": int(known.sum()), "new_ids": int((~known).sum())}
    return state, summary
