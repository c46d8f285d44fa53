"""What shuffling costs on the 50M job: `jobs/fe_hte_50m.yaml` with `train.shuffle` on and off.

    python benchmarks/bench_shuffle_50m.py [--rows 50000000] [--repeats 1]

The job as users run it (2 DDP workers streaming 50M rows through Ray Data, one epoch,
then the evaluation pass), on one simulated copy of the data, each setting in its own
process, interleaved (off, on, off, on, ...). Recorded per run: wall time, peak PSS of the
process tree, the epoch's rows/s and steady rows/s (once the first batch arrived) and the
final training loss. `bench_shuffle.py` measures the same ratio at 1M rows in one process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd
from common import WORK, run_dhte_job, save

SETTINGS = {"off": "false", "on": "true"}


def one(rows: int, setting: str, data: Path) -> dict:
    res, run_dir, m = run_dhte_job(
        "jobs/fe_hte_50m.yaml",
        [
            f"simulate.n_rows={rows}",
            f"simulate.out={data}",
            "data.cache=never",
            f"train.shuffle={SETTINGS[setting]}",
            f"outputs.dir={WORK / 'runs'}",
        ],
        WORK / f"shuffle_50m_{setting}.log",
    )
    last = pd.read_parquet(run_dir / "history.parquet").iloc[-1]
    return {
        **res,
        "setting": setting,
        "rows_per_s": float(last["rows_per_s"]),
        "steady_rows_per_s_per_worker": float(last["steady_rows_per_s_per_worker"]),
        "first_batch_seconds": float(last["first_batch_seconds"]),
        "final_train_loss": float(last["train_loss"]),
        "fit_seconds": m["training"]["fit_seconds"],
        "beta_corr": m["truth"]["beta_corr"],
        "load_average_after": os.getloadavg(),
        "run_dir": str(run_dir),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000_000)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    data = WORK / f"shuffle_{args.rows}"
    runs: list[dict] = []
    for _ in range(args.repeats):
        for setting in SETTINGS:
            runs.append(one(args.rows, setting, data))
            print(json.dumps({k: runs[-1][k] for k in ("setting", "seconds", "rows_per_s")}))

    def best(setting: str, key: str, pick=max) -> float:
        return pick(r[key] for r in runs if r["setting"] == setting)

    save(
        "shuffle_50m",
        {
            "command": "python benchmarks/bench_shuffle_50m.py " + " ".join(sys.argv[1:]),
            "rows": args.rows,
            "runs": runs,
            "ratio_on_over_off": {
                "rows_per_s": best("on", "rows_per_s") / best("off", "rows_per_s"),
                "steady_rows_per_s": best("on", "steady_rows_per_s_per_worker")
                / best("off", "steady_rows_per_s_per_worker"),
                "fit_seconds": best("on", "fit_seconds", min) / best("off", "fit_seconds", min),
                "wall_seconds": best("on", "seconds", min) / best("off", "seconds", min),
                "peak_pss": best("on", "peak_pss_gb") / best("off", "peak_pss_gb"),
            },
        },
    )


if __name__ == "__main__":
    main()
