"""Warm start of fe_hte (``retrain.init_from``) in one process: what the new fit starts from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distributed_hte.errors import SpecError
from distributed_hte.kinds.fe_hte.plugin import FeHtePlugin
from distributed_hte.kinds.fe_hte.warm import map_state
from distributed_hte.models.config import MLPConfig


def _plugin(users, vendors, hidden=(4,), mean=0.0, scale=1.0, betas=("u0", "x0")) -> FeHtePlugin:
    return FeHtePlugin(
        outcome="revenue",
        treatment="clicks",
        beta_features=list(betas),
        g_features=["z0"],
        fixed_effects=["user_id", "vendor_id"],
        vocab={"user_id": np.asarray(users), "vendor_id": np.asarray(vendors)},
        beta_mean=[mean] * len(betas),
        beta_scale=[scale] * len(betas),
        g_mean=[mean],
        g_scale=[scale],
        beta_net=MLPConfig(hidden),
        g_net=MLPConfig(hidden),
    )


def _trained(plugin: FeHtePlugin, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = plugin.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.state_dict()


def test_nets_and_scalers_come_from_the_champion_known_ids_keep_new_ids_zero():
    old = _plugin([10, 20, 30], ["a", "b"], mean=5.0, scale=2.0)
    old_state = _trained(old)
    # Today: user 20 left, 40 is new; vendor "c" is new; the data's moments moved.
    new = _plugin([10, 30, 40], ["a", "b", "c"], mean=-1.0, scale=7.0)
    state, summary = map_state(new, old, old_state)

    for key, value in old_state.items():
        if not key.startswith("fixed_effects."):
            torch.testing.assert_close(state[key], value, msg=key)
    # The champion's standardisation, not today's moments: scores stay comparable.
    assert state["beta_net.mean"].tolist() == [5.0, 5.0]
    assert state["g_net.scale"].tolist() == [2.0]
    users_old, users_new = old_state["fixed_effects.0.weight"], state["fixed_effects.0.weight"]
    torch.testing.assert_close(users_new[0], users_old[0])  # user 10
    torch.testing.assert_close(users_new[1], users_old[2])  # user 30
    assert users_new[2].item() == 0.0  # user 40: new, the mean effect
    vendors_old, vendors_new = old_state["fixed_effects.1.weight"], state["fixed_effects.1.weight"]
    torch.testing.assert_close(vendors_new[:2], vendors_old)
    assert vendors_new[2].item() == 0.0
    assert summary == {
        "user_id": {"known_ids": 2, "new_ids": 1},
        "vendor_id": {"known_ids": 2, "new_ids": 1},
    }
    # The mapped state loads into the new fit's model.
    model = new.build_model()
    model.load_state_dict(state)


def test_another_architecture_or_feature_list_is_refused():
    old = _plugin([1, 2], [1], hidden=(4,))
    with pytest.raises(SpecError, match="same network architecture"):
        map_state(_plugin([1, 2], [1], hidden=(8,)), old, _trained(old))
    with pytest.raises(SpecError, match="data.beta_features"):
        map_state(_plugin([1, 2], [1], betas=("u0", "u1")), old, _trained(old))
