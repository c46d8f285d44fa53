"""Memory stays flat in rows: peak PSS of `jobs/fe_hte_50m.yaml` at 5M and at 50M rows.

    python benchmarks/bench_memory.py [--small 5000000 --large 50000000]

Each run simulates its data (Ray tasks, one file per 1M rows), profiles it, trains one
epoch with 2 DDP workers streaming through Ray Data, and runs the evaluation pass. Peak
memory is the PSS of the whole process tree (driver, embedded Ray, all workers).
Target: peak(50M) <= 1.2 x peak(5M).
"""

from __future__ import annotations

import argparse
import sys

from common import WORK, run_dhte_job, save


def one(n: int) -> dict:
    res, run_dir, m = run_dhte_job(
        "jobs/fe_hte_50m.yaml",
        [
            f"simulate.n_rows={n}",
            f"simulate.out={WORK / f'mem_{n}'}",
            "data.cache=never",
            f"outputs.dir={WORK / 'runs'}",
        ],
        WORK / f"memory_{n}.log",
    )
    return {
        **res,
        "rows": n,
        "rows_per_s": m["training"]["rows_per_s"],
        "beta_corr": m["truth"]["beta_corr"],
        "fit_seconds": m["training"]["fit_seconds"],
        "run_dir": str(run_dir),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=5_000_000)
    ap.add_argument("--large", type=int, default=50_000_000)
    args = ap.parse_args()
    small, large = one(args.small), one(args.large)
    save(
        "memory",
        {
            "command": "python benchmarks/bench_memory.py " + " ".join(sys.argv[1:]),
            "small": small,
            "large": large,
            "peak_ratio_large_over_small": large["peak_pss_gb"] / small["peak_pss_gb"],
        },
    )


if __name__ == "__main__":
    main()
