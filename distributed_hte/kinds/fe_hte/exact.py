"""The exact path of kind ``fe_hte``: with linear nets the model is ``feols``.

Two streaming Ray Data passes (:mod:`distributed_hte.train.exact_fe`): sufficient
statistics → exact solve on the driver → scores for the sandwich SEs. The solution is
written into the same :class:`~distributed_hte.models.fe_hte.FixedEffectsHTE` the SGD
path trains (so predict, evaluate and report do not care which path fitted it), and the
float64 coefficients with iid, heteroskedasticity-robust and clustered SEs go to
``fit.json`` (``coefficients.json`` and ``inference.json`` in the report).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from distributed_hte.kinds.fe_hte.plugin import FeHtePlugin
from distributed_hte.models.fe_hte import FixedEffectsHTE

log = logging.getLogger(__name__)


def fit_exact(plugin: FeHtePlugin, dataset, cluster: str | None) -> tuple[FixedEffectsHTE, dict]:
    """Solve the linear model on ``dataset`` (the training rows); return the model and a
    JSON-ready summary (coefficients on the raw scale, SEs of every vcov type, timings)."""
    from distributed_hte.estimators.fixed_effects import inference
    from distributed_hte.train.exact_fe import LinearDesign, SortedIdEncoder, fit_linear_fe

    design = LinearDesign(
        plugin.outcome, plugin.treatment, tuple(plugin.beta_features), tuple(plugin.g_features)
    )
    vocab = tuple(np.asarray(plugin.vocab[c]) for c in plugin.fixed_effects)
    encoder = SortedIdEncoder(tuple(plugin.fixed_effects), vocab)
    result = fit_linear_fe(
        dataset,
        design,
        encoder,
        encoder.n_ids,
        families=plugin.fixed_effects,
        vcov="CRV1" if cluster else "hetero",
        cluster=cluster,
    )
    sol, stats = result.solution, result.statistics
    cl = plugin.fixed_effects.index(cluster) if cluster else None
    vcovs = {"iid": inference(sol, stats, "iid", None, None, design.names)}
    if result.scores is not None:
        vcovs["hetero"] = inference(sol, stats, "hetero", result.scores, None, design.names)
        if cl is not None:
            vcovs["CRV1"] = inference(sol, stats, "CRV1", result.scores, cl, design.names)
    model = model_from_solution(plugin, sol.coef, sol.intercept, sol.fixed_effects)
    coef = dict(zip(design.names, map(float, sol.coef), strict=True))
    k = len(plugin.beta_features)
    summary = {
        "solver": "exact",
        "converged": True,
        "convergence_reason": "exact least-squares solution (feols)",
        "rows": int(stats.n),
        "coefficients": {
            "beta": {
                "(intercept)": coef[plugin.treatment],
                **{b: coef[f"{plugin.treatment}:{b}"] for b in plugin.beta_features},
            },
            "g": {g: coef[g] for g in plugin.g_features},
            "intercept": float(sol.intercept),
        },
        "inference": {name: inf.to_dict() for name, inf in vcovs.items()},
        "rss": float(sol.rss),
        "id_graph_components": int(sol.n_components),
        "method": sol.method,
        "seconds": result.seconds,
        "data_passes": 1 + (result.scores is not None),
        "n_coefficients": 1 + k + len(plugin.g_features),
    }
    if sol.n_components > 1:
        log.warning(
            "[fit] the ids form %d disconnected groups: fixed effects compare only within one",
            sol.n_components,
        )
    return model, summary


def model_from_solution(
    plugin: FeHtePlugin, coef: np.ndarray, intercept: float, fixed_effects: tuple[np.ndarray, ...]
) -> FixedEffectsHTE:
    """The network holding a linear solution on the raw scale.

    ``coef`` ``(1 + k + m,)``: T, T·x_β1..k, x_g1..m. The nets standardise their inputs,
    so weights are multiplied by the scales and the means go into the constants.
    """
    model = plugin.build_model()
    k = len(plugin.beta_features)
    b0, b, c = coef[0], np.asarray(coef[1 : 1 + k]), np.asarray(coef[1 + k :])
    bm, bs = np.asarray(plugin.beta_mean), np.asarray(plugin.beta_scale)
    gm, gs = np.asarray(plugin.g_mean), np.asarray(plugin.g_scale)
    with torch.no_grad():
        if model.beta_net is None:
            model.beta_const.fill_(float(b0))
        else:
            _hold_linear(model.beta_net, b * bs)
            model.beta_net.head.bias.fill_(float(b0 + b @ bm))
        const = float(intercept)
        if model.g_net is not None:
            _hold_linear(model.g_net, c * gs)
            const -= float(c @ gm)
        model.intercept.fill_(const)
        for emb, effect in zip(model.fixed_effects, fixed_effects, strict=True):
            emb.weight[:, 0] = torch.as_tensor(effect)
    return model


def _hold_linear(net, weights: np.ndarray) -> None:
    """Put standardised-scale linear ``weights`` ``(n_features,)`` into ``net``: its head
    when linear, else its skip path with the head's weights at zero (the hidden layers then
    add nothing until training moves them)."""
    w = torch.as_tensor(weights, dtype=torch.float32).view(1, -1)
    if net.is_linear:
        net.head.weight.copy_(w)
        return
    if net.skip is None:
        raise ValueError("a nonlinear net holds a linear fit only with a skip path (skip=True)")
    net.skip.weight.copy_(w)
    net.head.weight.zero_()


def linear_start(plugin: FeHtePlugin, dataset) -> tuple[bytes, dict]:
    """The SGD path's starting point: the exact linear fit (one pass, no SEs) as a
    ``state_dict`` of ``plugin``'s model (``torch.save`` bytes), and a JSON-ready summary."""
    import io
    import time

    from distributed_hte.train.exact_fe import LinearDesign, SortedIdEncoder, fit_linear_fe

    t0 = time.perf_counter()
    design = LinearDesign(
        plugin.outcome, plugin.treatment, tuple(plugin.beta_features), tuple(plugin.g_features)
    )
    vocab = tuple(np.asarray(plugin.vocab[c]) for c in plugin.fixed_effects)
    encoder = SortedIdEncoder(tuple(plugin.fixed_effects), vocab)
    result = fit_linear_fe(
        dataset, design, encoder, encoder.n_ids, families=plugin.fixed_effects, vcov=None
    )
    sol = result.solution
    model = model_from_solution(plugin, sol.coef, sol.intercept, sol.fixed_effects)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue(), {
        "init": "exact linear fit",
        "init_seconds": time.perf_counter() - t0,
        "init_rss": float(sol.rss),
        "init_rows": int(result.statistics.n),
    }


class NetsOffset:
    """``offset(batch) -> (y (n,), β(x)·T + g(x) (n,))`` of trained nets (picklable)."""

    def __init__(self, plugin: FeHtePlugin, state: bytes) -> None:
        self.plugin, self.state = plugin, state

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        from distributed_hte.kinds.fe_hte.plugin import predict_batch

        pred = predict_batch(batch, self.plugin, self.state, [])
        t = np.asarray(batch[self.plugin.treatment], np.float64)
        return np.asarray(batch[self.plugin.outcome], np.float64), pred["beta_hat"] * t + pred[
            "g_hat"
        ]


def finish_fixed_effects(plugin: FeHtePlugin, model: FixedEffectsHTE, dataset) -> dict:
    """Replace the SGD fixed effects and intercept by the exact ones given the nets.

    Backfitting's last step: with β and g fixed, the fixed effects of y − β(x)·T − g(x)
    are a least-squares problem the exact solver answers in one pass. Returns a summary.
    """
    import io

    from distributed_hte.train.exact_fe import SortedIdEncoder, solve_fixed_effects_given

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    vocab = tuple(np.asarray(plugin.vocab[c]) for c in plugin.fixed_effects)
    encoder = SortedIdEncoder(tuple(plugin.fixed_effects), vocab)
    result = solve_fixed_effects_given(
        dataset,
        NetsOffset(plugin, buf.getvalue()),
        encoder,
        encoder.n_ids,
        families=plugin.fixed_effects,
    )
    sol = result.solution
    with torch.no_grad():
        model.intercept.fill_(float(sol.intercept))
        for emb, effect in zip(model.fixed_effects, sol.fixed_effects, strict=True):
            emb.weight[:, 0] = torch.as_tensor(effect)
    return {
        "fixed_effects_finish": "exact given the nets (one pass)",
        "finish_seconds": result.seconds["total"],
        "finish_rss": float(sol.rss),
    }
