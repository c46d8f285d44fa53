"""Deep MMM recovery against model settings, in one process (no Ray Train): the kind's own
prepare, model, loss, decomposition and truth comparison, trained full batch with Adam
(cosine LR) on a simulated 200-region panel. Used to choose ``model.tv_penalty`` and
``model.hill_slope_min``; the Ray Train figures are the slow test in tests/test_mmm.py.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_mmm_penalty.py --share 0.6 --tv-penalty 0.1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distributed_hte.kinds.mmm import MmmKind
from distributed_hte.kinds.mmm import report as rep
from distributed_hte.kinds.mmm.data import scaled
from distributed_hte.kinds.mmm.plugin import MmmPlugin, decompose, load_model, region_rows
from distributed_hte.simulate.mmm import CHANNELS, MmmSimConfig, simulate_mmm
from distributed_hte.spec import validate_spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regions", type=int, default=200)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--share", type=float, default=0.4)
    ap.add_argument("--tv-penalty", type=float, default=0.1)
    ap.add_argument("--hill-slope-min", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = simulate_mmm(
            MmmSimConfig(n_regions=args.regions, media_share=args.share, seed=args.seed),
            Path(tmp) / "sim",
        )
        media = list(CHANNELS[:6])
        spec = validate_spec(
            {
                "name": "bench",
                "kind": "mmm",
                "data": {
                    "path": str(out / "data"),
                    "media": media,
                    "spend": {c: f"{c}_spend" for c in media},
                    "controls": ["price", "promo"],
                },
                "model": {"tv_penalty": args.tv_penalty, "hill_slope_min": args.hill_slope_min},
            }
        )
        kind = MmmKind()
        prep = kind.prepare(spec)
    cfg = kind.model_config(spec, prep)
    plugin = MmmPlugin(cfg)
    rows = region_rows(scaled(prep.panel, prep.scalers), prep.panel.fit, prep.week)
    batch = plugin.to_tensors(
        {k: np.stack([r[k] for r in rows]) for k in rows[0]}, torch.device("cpu")
    )
    torch.manual_seed(args.seed)
    model = plugin.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    t0 = time.perf_counter()
    for step in range(args.steps):
        factor = max(0.5 * (1 + np.cos(np.pi * step / args.steps)), 0.01)
        for g in opt.param_groups:
            g["lr"] = args.lr * factor
        loss = plugin.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    fitted = load_model(cfg, model.state_dict())
    dec = decompose(fitted, scaled(prep.panel, prep.scalers), prep.scalers.kpi_scale, prep.week)
    table = rep.channel_table(prep.panel, prep.scalers, cfg, fitted, dec)
    metrics = rep.panel_metrics(prep.panel, dec["pred"])
    fit = prep.panel.fit
    share = float((dec["media"].sum(-1) * fit).sum() / (dec["pred"] * fit).sum())
    truth = rep.truth_errors(prep.truth, table, share)
    h, t = metrics["holdout"], metrics["train"]
    print(
        json.dumps(
            {
                "args": vars(args),
                "train_seconds": round(seconds, 1),
                "media_share": [share, truth["media_share"]],
                "max_abs_share_error_pp": truth["max_abs_share_error_pp"],
                "max_abs_roi_rel_error": truth["max_abs_roi_rel_error"],
                "roi_rank_correct": truth["roi_rank_correct"],
                "train_rmse_over_true": t["rmse"] / t["true_model"]["rmse"],
                "holdout_rmse_over_true": h["rmse"] / h["true_model"]["rmse"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
