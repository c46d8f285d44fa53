"""Coverage of the mmm kind's bootstrap ROI intervals (issue 11: over ≥ 10 seeds, the 90 %
intervals should cover the true ROI for 80-98 % of channel × seed pairs).

For each seed: simulate a panel with known truth, run the kind end to end (``run_job``,
real Ray, real parquet) with ``uncertainty: {replicas: K, level: 0.9}`` (replicas are
Ray tasks driving Ray Train fits, as in a user's run), and check whether each channel's
true ROI (the simulator's, over the fit weeks) lies in ``[roi_low, roi_high]``. Writes
``benchmarks/results/mmm_coverage.json`` after every seed (a cut-short study keeps what
it finished). Run from the repo root::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_mmm_coverage.py --seeds 10

The defaults are the size recorded in ``benchmarks/README.md``; the issue's panel is
``--regions 200 --weeks 104 --channels 6 --epochs 40 --passes 25 --batch 256``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from distributed_hte.runner import run_job
from distributed_hte.runtime import RayTarget, init_ray
from distributed_hte.spec import validate_spec

OUT = Path(__file__).resolve().parent / "results" / "mmm_coverage.json"


def one_seed(args: argparse.Namespace, seed: int, tmp: Path) -> dict:
    """One simulated panel, fitted with intervals; per-channel truth, estimate, interval."""
    raw = {
        "name": f"mmm-coverage-{seed}",
        "kind": "mmm",
        "simulate": {
            "n_regions": args.regions,
            "n_weeks": args.weeks,
            "n_channels": args.channels,
            "media_share": args.share,
            "seed": seed,
            "out": str(tmp / f"sim{seed}"),
        },
        "train": {
            "epochs": args.epochs,
            "region_passes": args.passes,
            "batch_size": args.batch,
            "lr": args.lr,
            "log_every_s": 600,
        },
        "uncertainty": {"replicas": args.replicas, "level": args.level, "seed": seed},
        "scaling": {"num_workers": args.workers},
        "outputs": {"dir": str(tmp / "runs")},
    }
    t0 = time.perf_counter()
    run = Path(run_job(validate_spec(raw)))
    seconds = time.perf_counter() - t0
    m = json.loads((run / "metrics.json").read_text())
    ch = pd.read_csv(run / "channels.csv")
    rows = []
    for r in ch.itertuples():
        true = m["truth"]["channels"][r.channel]["roi_true"]
        rows.append(
            {
                "seed": seed,
                "channel": r.channel,
                "roi_true": true,
                "roi": r.roi,
                "roi_low": r.roi_low,
                "roi_high": r.roi_high,
                "covered": bool(r.roi_low <= true <= r.roi_high),
                "rel_width": (r.roi_high - r.roi_low) / true,
                "rel_error": r.roi / true - 1.0,
            }
        )
    return {"seconds": seconds, "converged": m["training"]["converged"], "channels": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=100)
    p.add_argument("--regions", type=int, default=30)
    p.add_argument("--weeks", type=int, default=60)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--share", type=float, default=0.4)
    p.add_argument("--replicas", type=int, default=6)
    p.add_argument("--level", type=float, default=0.9)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--passes", type=int, default=25)
    p.add_argument("--batch", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    init_ray(RayTarget(address=None, num_cpus=4))
    results: dict = {"command": vars(args) | {"out": str(args.out)}, "seeds": []}
    args.out.parent.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for s in range(args.first_seed, args.first_seed + args.seeds):
            res = one_seed(args, s, Path(d))
            res["load_avg_1min"] = os.getloadavg()[0]
            results["seeds"].append(res)
            pairs = [c for r in results["seeds"] for c in r["channels"]]
            results["summary"] = {
                "seeds_done": len(results["seeds"]),
                "pairs": len(pairs),
                "coverage": sum(c["covered"] for c in pairs) / len(pairs),
                "median_rel_width": float(pd.Series([c["rel_width"] for c in pairs]).median()),
                "median_abs_rel_error": float(
                    pd.Series([abs(c["rel_error"]) for c in pairs]).median()
                ),
                "wall_seconds": time.perf_counter() - t0,
            }
            args.out.write_text(json.dumps(results, indent=1))
            print(f"seed {s}: {res['seconds']:.0f}s load {res['load_avg_1min']:.1f} "
                  f"{results['summary']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
