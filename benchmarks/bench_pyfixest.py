"""fe_hte (linear) against pyfixest feols at 1M and 10M rows: coefficients, wall time, peak memory.

    python benchmarks/bench_pyfixest.py [--rows 1000000 10000000]

Both run as separate processes on the same parquet; peak memory is the PSS of each
process tree (for dhte: the driver, the embedded Ray and all its workers).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import ROOT, WORK, run_measured, save, simulate

FORMULA = "revenue ~ clicks + clicks:u0 + clicks:u1 + clicks:v0 + clicks:v1 + clicks:x0 + z0 + z1 + z2 | user_id + vendor_id + period"
PAIRS = {"(intercept)": "clicks", **{f: f"clicks:{f}" for f in ["u0", "u1", "v0", "v1", "x0"]}}

FEOLS = """
import json, sys, pyarrow.dataset as ds, pyfixest as pf
df = ds.dataset(sys.argv[1]).to_table(columns=["revenue","clicks","u0","u1","v0","v1","x0","z0","z1","z2","user_id","vendor_id","period"]).to_pandas()
fit = pf.feols(sys.argv[2], data=df)
print(json.dumps({k: float(v) for k, v in fit.coef().items()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--epochs", type=int, nargs="+", default=[12, 4])
    args = ap.parse_args()
    out = {"command": "python benchmarks/bench_pyfixest.py " + " ".join(sys.argv[1:]), "cases": []}
    for n, epochs in zip(args.rows, args.epochs, strict=True):
        data = simulate(f"linear_{n}", n, seed=21)
        ref = run_measured(
            [sys.executable, "-c", FEOLS, str(data / "data"), FORMULA], WORK / f"feols_{n}.log"
        )
        coef_ref = json.loads(ref["last_line"])
        ours = run_measured(
            [
                sys.executable,
                "-m",
                "distributed_hte.cli",
                "run",
                "jobs/fe_hte_500k_linear.yaml",
                f"data.path={data / 'data'}",
                "simulate=null",
                f"train.epochs={epochs}",
                "train.batch_size=8192",
                f"outputs.dir={WORK / 'runs'}",
                "train.log_every_s=60",
            ],
            WORK / f"dhte_{n}.log",
        )
        run_dir = Path(ours["last_line"])
        coefs = json.loads((run_dir / "coefficients.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        diffs = {k: coefs["beta"][k] - coef_ref[v] for k, v in PAIRS.items()}
        diffs.update({z: coefs["g"][z] - coef_ref[z] for z in ["z0", "z1", "z2"]})
        out["cases"].append(
            {
                "rows": n,
                "pyfixest": {"seconds": ref["seconds"], "peak_pss_gb": ref["peak_pss_gb"]},
                "dhte": {
                    "seconds": ours["seconds"],
                    "peak_pss_gb": ours["peak_pss_gb"],
                    "epochs": epochs,
                    "fit_seconds": metrics["training"]["fit_seconds"],
                    "run_dir": str(run_dir),
                },
                "max_abs_coef_diff": max(abs(d) for d in diffs.values()),
                "coef_diff": diffs,
                "memory_ratio_dhte_over_pyfixest": ours["peak_pss_gb"] / ref["peak_pss_gb"],
                "time_ratio_dhte_over_pyfixest": ours["seconds"] / ref["seconds"],
                "beta_corr": metrics["truth"]["beta_corr"],
            }
        )
        save("pyfixest", out)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
