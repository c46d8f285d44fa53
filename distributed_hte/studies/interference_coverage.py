"""Monte Carlo coverage study of the interference estimators (the paper's table).

One replication simulates an experiment on a fixed item pool (section 6.2 design,
a fresh assignment and fresh queries per replication), cross-fits the nuisance
ensembles over query folds with full-batch training in plain PyTorch, and returns
every estimator's estimate and SE. :func:`summarise` turns the replications into the
paper's columns: mean bias (and its SE), Monte Carlo SD, mean estimated SE and the
coverage of the 95% interval. No ray import here: the kind runs replications as Ray
tasks (:mod:`distributed_hte.kinds.interference_coverage`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from distributed_hte.data.split import split_unit
from distributed_hte.estimators.interference import (
    DTYPE,
    DBSettings,
    QueryBatch,
    all_estimates,
    benchmark_terms,
    db_influence,
    hajek_sums,
)
from distributed_hte.models.config import MLPConfig
from distributed_hte.models.interference import (
    InterferenceNets,
    NetConfig,
    fold_weights,
    query_losses,
    weighted_loss,
)
from distributed_hte.simulate.interference import (
    InterferenceSimConfig,
    make_pool,
    simulate_queries,
    true_effects,
)

ESTIMATORS = ["DB", "plug_in", "HT_DIM", "HA_DIM", "PDL", "IPW", "AIPW"]
# Reported next to the estimators: DB with the true nuisances (not available in practice).
REFERENCE = ["DB_oracle"]


@dataclass(frozen=True)
class FitConfig:
    """Full-batch training of the nuisance ensembles in one replication."""

    choice: MLPConfig = NetConfig((32, 32), "silu")
    response: MLPConfig = NetConfig((32, 32), "silu")
    pdl: MLPConfig = NetConfig((64, 64), "silu")
    steps: int = 400
    lr: float = 0.01
    weight_decay: float = 0.0
    folds: int = 3


@dataclass(frozen=True)
class ReplicationConfig:
    """One scenario of the study (a set size K) and how each replication fits it."""

    set_size: int
    n_queries: int = 5_000
    n_items: int = 1_000
    p_treat: float = 0.5
    noise_sd: float = 1.0
    pool_seed: int = 0
    fit: FitConfig = field(default_factory=FitConfig)
    hessian: str = "auto"
    hessian_draws: int = 500

    def sim_config(self, truth_queries: int = 2_000_000) -> InterferenceSimConfig:
        return InterferenceSimConfig(
            n_queries=self.n_queries,
            n_items=self.n_items,
            set_size=self.set_size,
            p_treat=self.p_treat,
            noise_sd=self.noise_sd,
            truth_queries=truth_queries,
            seed=self.pool_seed,
        )


def true_gte(cfg: ReplicationConfig, truth_queries: int = 2_000_000) -> dict[str, Any]:
    """The scenario's true GTE by Monte Carlo (fixed pool; assignment-free)."""
    pool = make_pool(cfg.n_items, cfg.p_treat, cfg.pool_seed)
    return true_effects(pool, cfg.sim_config(truth_queries))


def fit_ensembles(
    x: torch.Tensor,
    z: torch.Tensor,
    w: torch.Tensor,
    mask: torch.Tensor,
    e: torch.Tensor,
    y: torch.Tensor,
    fold: torch.Tensor,
    fit: FitConfig,
    seed: int,
) -> InterferenceNets:
    """Train the F-member choice/response/PDL ensembles on all queries at once.

    Full-batch Adam with a cosine-decayed step size; member f sees only the queries
    outside fold f (so its predictions on fold f are out of sample).
    """
    torch.manual_seed(seed)
    m = mask.unsqueeze(-1).float()
    z_mean = (z * m).sum(dim=(0, 1)) / m.sum()
    z_scale = (((z - z_mean) ** 2 * m).sum(dim=(0, 1)) / m.sum()).sqrt().clamp_min(1e-6)
    nets = InterferenceNets(
        fit.folds,
        x.shape[1],
        z.shape[2],
        z.shape[1],
        fit.choice,
        fit.response,
        fit.pdl,
        x_mean=x.mean(0).tolist(),
        x_scale=x.std(0).clamp_min(1e-6).tolist(),
        z_mean=z_mean.tolist(),
        z_scale=z_scale.tolist(),
    ).to(x.device)
    weights = fold_weights(fold, fit.folds)
    opt = torch.optim.Adam(nets.parameters(), lr=fit.lr, weight_decay=fit.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, fit.steps, eta_min=fit.lr * 0.02)
    for _ in range(fit.steps):
        opt.zero_grad(set_to_none=True)
        out = nets(x, z, w, mask)
        loss = weighted_loss(query_losses(out, w, e, y, mask, binary=False), weights)
        loss.backward()
        opt.step()
        sched.step()
    return nets


def _own_fold(t: torch.Tensor, fold: torch.Tensor) -> torch.Tensor:
    """Pick member ``fold[i]`` for query i: ``(M, n, ...)`` → ``(n, ...)``."""
    idx = fold.view(1, -1, *([1] * (t.dim() - 2))).expand(1, *t.shape[1:])
    return t.gather(0, idx)[0]


def run_replication(cfg: ReplicationConfig, rep: int, device: str = "cpu") -> dict[str, Any]:
    """Simulate, cross-fit and estimate once: every estimator's estimate and SE.

    The nets train on ``device`` (a GPU when the study's ``scaling.use_gpu`` is set);
    the estimators run in float64 on the CPU.
    """
    torch.set_num_threads(1)
    dev = torch.device(device)
    started = time.perf_counter()
    pool = make_pool(cfg.n_items, cfg.p_treat, cfg.pool_seed, assignment_seed=10_000 + rep)
    rng = np.random.default_rng(np.random.SeedSequence(cfg.pool_seed, spawn_key=(5, rep)))
    q = simulate_queries(
        pool, cfg.n_queries, cfg.set_size, cfg.set_size, "continuous", cfg.noise_sd, rng
    )
    qid = np.arange(cfg.n_queries, dtype=np.int64) + rep * 10_000_019
    fold_np = np.minimum(
        (split_unit({"q": qid}, ["q"]) * cfg.fit.folds).astype(np.int64), cfg.fit.folds - 1
    )
    f32 = torch.float32
    x = torch.as_tensor(q.v[:, None], dtype=f32)
    z = torch.as_tensor(np.stack([pool.c_bin[q.items], pool.c_cont[q.items]], axis=-1), dtype=f32)
    w = torch.as_tensor(q.w, dtype=f32)
    mask = torch.as_tensor(q.mask)
    e = torch.as_tensor(q.e)
    y = torch.as_tensor(q.y, dtype=f32)
    fold = torch.as_tensor(fold_np)
    on = [t.to(dev) for t in (x, z, w, mask, e, y, fold)]
    nets = fit_ensembles(*on, cfg.fit, seed=rep)
    fit_s = time.perf_counter() - started
    with torch.no_grad():
        xd, zd, wd, md = on[:4]
        b, tau, r = (t.cpu() for t in nets.pair_outputs(xd, zd))
        f_obs = nets.pdl_output(xd, zd, wd, md).cpu()
        f1 = nets.pdl_output(xd, zd, torch.ones_like(wd), md).cpu()
        f0 = nets.pdl_output(xd, zd, torch.zeros_like(wd), md).cpu()
    own = {k: _own_fold(v, fold).to(DTYPE) for k, v in dict(b=b, tau=tau, r=r).items()}
    batch = QueryBatch(own["b"], own["tau"], own["r"], w.to(DTYPE), mask, e, y.to(DTYPE))
    settings = DBSettings(
        p=cfg.p_treat, hessian=cfg.hessian, hessian_draws=cfg.hessian_draws, seed=rep
    )
    influence = db_influence(batch, settings)
    terms = benchmark_terms(
        batch.w,
        e,
        batch.y,
        mask,
        cfg.p_treat,
        _own_fold(f_obs, fold).to(DTYPE),
        _own_fold(f1, fold).to(DTYPE),
        _own_fold(f0, fold).to(DTYPE),
    )
    est = all_estimates(terms, influence, hajek_sums(batch.w, e, batch.y))
    # Reference: the same estimator with the TRUE nuisances (what cross-fitting approximates).
    t64 = lambda a: torch.as_tensor(a, dtype=DTYPE)  # noqa: E731
    oracle_batch = QueryBatch(t64(q.b), t64(q.tau), t64(q.mu), batch.w, mask, e, batch.y)
    oracle = db_influence(oracle_batch, settings).psi[:, 0]
    row: dict[str, Any] = {
        "set_size": cfg.set_size,
        "rep": rep,
        "fit_seconds": fit_s,
        "seconds": time.perf_counter() - started,
        "ridge_queries": int((influence.ridge > 0).sum()),
        "mean_correction": float((influence.psi[:, 0] - influence.theta[:, 0]).mean()),
        # Nuisance quality against the truth, for the report (not used by any estimator).
        "tau_rmse": float(((own["tau"] - torch.as_tensor(q.tau)) ** 2).mean().sqrt()),
        "mu_rmse": float(((own["r"] - torch.as_tensor(q.mu)) ** 2).mean().sqrt()),
    }
    for name in ESTIMATORS:
        row[f"{name}_est"] = est[name].estimate
        row[f"{name}_se"] = est[name].se
    row["DB_oracle_est"] = float(oracle.mean())
    row["DB_oracle_se"] = float(oracle.std(unbiased=False) / math.sqrt(len(oracle)))
    return row


def summarise(rows: pd.DataFrame, truth: dict[int, float], level: float = 0.95) -> pd.DataFrame:
    """The paper's table: one row per (set size, estimator).

    ``bias`` = mean(estimate − truth) and ``bias_se`` = MC SD / √R; ``mc_sd`` the SD of
    the estimates over replications; ``mean_se`` the mean estimated SE; ``coverage`` the
    share of intervals estimate ± z·SE that contain the truth.
    """
    from distributed_hte.estimators.interference import z_value

    z = z_value(level)
    out = []
    for k, part in rows.groupby("set_size"):
        gte = truth[int(k)]
        for name in ESTIMATORS + [r for r in REFERENCE if f"{r}_est" in part]:
            est = part[f"{name}_est"].to_numpy()
            se = part[f"{name}_se"].to_numpy()
            r = len(est)
            sd = float(est.std(ddof=1)) if r > 1 else float("nan")
            out.append(
                {
                    "set_size": int(k),
                    "estimator": name,
                    "replications": r,
                    "true_gte": gte,
                    "bias": float(est.mean() - gte),
                    "bias_se": sd / math.sqrt(r),
                    "mc_sd": sd,
                    "mean_se": float(se.mean()),
                    "se_ratio": float(se.mean() / sd) if sd > 0 else float("nan"),
                    "coverage": float((np.abs(est - gte) <= z * se).mean()),
                }
            )
    return pd.DataFrame(out)


def config_dict(cfg: ReplicationConfig) -> dict[str, Any]:
    return asdict(cfg)
