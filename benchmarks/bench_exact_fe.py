"""Exact linear fe_hte (Ray Data, two passes) against pyfixest feols: time and peak memory.

    python benchmarks/bench_exact_fe.py --rows 1000000 10000000 [--ours-only 50000000]

Data: the warehouse-layout simulator (six parquet files of five weeks each, sparse ids),
with buyers = rows/100 and sellers = rows/500. Both sides fit the same model,
``revenue ~ clicks + clicks:u0..x0 + z0 + z1 + z2 | buyer + seller + week`` with SEs
clustered by buyer (CRV1), each in its own process: wall time and the peak PSS of the
process tree (for ours: the driver, the embedded Ray and all its workers) are measured
side by side in one run. Ours includes Ray start-up and the profiling pass that builds
the id vocabularies, as the fe_hte kind would run it. ``--ours-only`` sizes run only ours
(feols would not fit in this machine's memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from common import ROOT, WORK, run_measured, save

FEATURES_B = ["u0", "u1", "v0", "v1", "x0"]
FEATURES_G = ["z0", "z1", "z2"]
NAMES = ["clicks", *(f"clicks:{b}" for b in FEATURES_B), *FEATURES_G]
FORMULA = f"revenue ~ {' + '.join(NAMES)} | buyer + seller + week"

FEOLS = """
import glob, json, sys, time
import pyarrow.parquet as pq, pyarrow as pa, pyfixest as pf
t0 = time.perf_counter()
cols = ["revenue","clicks","u0","u1","v0","v1","x0","z0","z1","z2","buyer","seller","week"]
files = sorted(glob.glob(sys.argv[1] + "/*.parquet"))
df = pa.concat_tables([pq.read_table(f, columns=cols) for f in files]).to_pandas()
t1 = time.perf_counter()
fit = pf.feols(sys.argv[2], data=df, vcov={"CRV1": "buyer"}, fixef_rm="none")
tidy = fit.tidy()
print(json.dumps({"coef": {k: float(v) for k, v in tidy["Estimate"].items()},
                  "se": {k: float(v) for k, v in tidy["Std. Error"].items()},
                  "read_s": t1 - t0, "fit_s": time.perf_counter() - t1}))
"""

OURS = """
import json, os, sys, time
t0 = time.perf_counter()
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
from distributed_hte.runtime import RayTarget, init_ray
init_ray(RayTarget(address=None, num_cpus=os.cpu_count()))
import ray.data
from distributed_hte.data.profile import profile_dataset
from distributed_hte.train.exact_fe import LinearDesign, SortedIdEncoder, fit_linear_fe
t1 = time.perf_counter()
fams = ["buyer", "seller", "week"]
design = LinearDesign("revenue", "clicks", ("u0","u1","v0","v1","x0"), ("z0","z1","z2"))
ds = ray.data.read_parquet(sys.argv[1], file_extensions=["parquet"]).select_columns(
    design.columns + fams)
prof = profile_dataset(ds, [], fams, {})
enc = SortedIdEncoder(tuple(fams), tuple(prof.vocab[f] for f in fams))
t2 = time.perf_counter()
res = fit_linear_fe(ds, design, enc, enc.n_ids, families=fams, vcov="CRV1", cluster="buyer")
inf, sol = res.inference, res.solution
print(json.dumps({"coef": dict(zip(inf.names, inf.coef.tolist())),
                  "se": dict(zip(inf.names, inf.se.tolist())),
                  "ray_start_s": t1 - t0, "profile_s": t2 - t1, **{k + "_s": v for k, v in res.seconds.items()},
                  "solver": sol.method, "cg_iterations": list(sol.cg_iterations),
                  "n_ids": list(res.statistics.n_ids), "n_components": sol.n_components,
                  "crosstab_nnz": [int(c.nnz) for c in res.statistics.cross]}))
"""


def warehouse(n: int):
    """Warehouse-layout data under benchmarks/_work (reused if present)."""
    from distributed_hte.simulate.fe_hte_warehouse import WarehouseConfig, write_warehouse

    out = WORK / f"warehouse_{n}"
    if not (out / "simulation.json").exists():
        cfg = WarehouseConfig(n_rows=n, n_buyers=n // 100, n_sellers=n // 500, seed=11)
        write_warehouse(cfg, out, progress=True)
    return out


def measured(cmd: list[str], log) -> dict:
    """run_measured plus the 1-minute load average before and after: this machine is shared,
    so wall-time ratios are only as good as the load was even."""
    before = os.getloadavg()[0]
    r = run_measured(cmd, log)
    if r["returncode"]:
        raise RuntimeError(f"{cmd[:2]} failed, see {log}")
    return {**r, **json.loads(r["last_line"]), "load_avg_1m": [before, os.getloadavg()[0]]}


def run_ours(data, n: int) -> dict:
    return measured([sys.executable, "-c", OURS, str(data / "data")], WORK / f"exact_{n}.log")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 10_000_000])
    ap.add_argument("--ours-only", type=int, nargs="*", default=[])
    args = ap.parse_args()
    # an ours-only run is recorded on its own, so it does not replace the side-by-side one
    name = "exact_fe" if args.rows else "exact_fe_ours_only"
    out = {"command": "python benchmarks/bench_exact_fe.py " + " ".join(sys.argv[1:]), "cases": []}
    for n in args.rows:
        data = warehouse(n)
        ref = measured(
            [sys.executable, "-c", FEOLS, str(data / "data"), FORMULA], WORK / f"feols_wh_{n}.log"
        )
        ours = run_ours(data, n)
        coef_diff = max(abs(ours["coef"][k] - ref["coef"][k]) for k in NAMES)
        se_rel = max(abs(ours["se"][k] / ref["se"][k] - 1) for k in NAMES)
        case = {
            "rows": n,
            "pyfixest": {k: v for k, v in ref.items() if k not in ("cmd", "last_line")},
            "exact": {k: v for k, v in ours.items() if k not in ("cmd", "last_line")},
            "max_abs_coef_diff": coef_diff,
            "max_rel_se_diff": se_rel,
            "time_ratio_exact_over_pyfixest": ours["seconds"] / ref["seconds"],
            "memory_ratio_exact_over_pyfixest": ours["peak_pss_gb"] / ref["peak_pss_gb"],
        }
        out["cases"].append(case)
        print(json.dumps({k: case[k] for k in case if k not in ("pyfixest", "exact")}), flush=True)
        save(name, out)
    for n in args.ours_only:
        data = warehouse(n)
        ours = run_ours(data, n)
        out["cases"].append(
            {"rows": n, "exact": {k: v for k, v in ours.items() if k not in ("cmd", "last_line")}}
        )
        save(name, out)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
