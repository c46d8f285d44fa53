"""aipw_segments at scale: peak memory flat in rows (5M vs 50M), and against DoubleML at 1M.

    python benchmarks/bench_aipw_scale.py --rows 5000000 50000000
    python benchmarks/bench_aipw_scale.py --doubleml-rows 1000000

``--rows``: for each size, simulate the impressions once (`dhte simulate`, Ray tasks, one
parquet file per 1M rows; measured apart), then run `jobs/aipw_segments_50m.yaml` on them
with `dhte run` in its own process: the streamed checks, two preprocessing passes, the
Newton passes of the 6 nuisance models (2 Train workers streaming their shards,
``nuisance.cache_gb: 0``), the scoring pass and the report. Peak memory is the PSS of the
whole process tree (driver, embedded Ray, all workers), sampled every 0.5 s.
Target: peak(50M) <= 1.2 x peak(5M).

``--doubleml-rows N``: on one simulated table of N rows, our job (``outcome_model:
by_arm``: propensity, μ1 and μ0 models per fold, DoubleML IRM's nine fits) against
DoubleML 0.11.4 ``DoubleMLIRM`` with sklearn logistic pipelines (scaling + one-hot, the
notebook's preprocessing), 3 folds, in one process, plus its ``gate()`` by category and
by history bucket. Each in its own measured process; the ratio is DoubleML / ours.

Every measurement is merged into ``results/aipw_scale.json`` as it finishes (a long run
that is stopped keeps the ones before it), with the 1-minute load average at its start
and end: the machine is shared, so wall times are upper bounds; memory is not affected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import RESULTS, WORK, run_dhte_job, run_measured, save

SPEC = "jobs/aipw_segments_50m.yaml"
SEED = 50
CHUNK_ROWS = 1_000_000
RESULT = "aipw_scale"


def data_for(rows: int) -> Path:
    """Simulate ``rows`` impressions once under benchmarks/_work (the job's simulate section)."""
    out = WORK / f"aipw_scale_{rows}"
    if not (out / "simulation.json").exists():
        info = run_measured(
            [
                sys.executable, "-m", "distributed_hte.cli", "simulate", "aipw_segments",
                f"n_rows={rows}", f"seed={SEED}", f"chunk_rows={CHUNK_ROWS}", "--out", str(out),
            ],
            WORK / f"aipw_scale_sim_{rows}.log",
        )  # fmt: skip
        if info["returncode"] != 0:
            raise SystemExit(
                f"simulation of {rows} rows failed: see {WORK}/aipw_scale_sim_{rows}.log"
            )
        record(f"simulate_{rows}", info)  # only when simulated here (a reuse keeps the record)
    return out


def ours(rows: int, extra: list[str], tag: str) -> dict:
    data = data_for(rows)
    load0 = os.getloadavg()[0]
    res, run_dir, m = run_dhte_job(
        SPEC,
        [
            f"simulate.n_rows={rows}",
            f"simulate.out={data}",
            f"outputs.dir={WORK / 'runs'}",
            *extra,
        ],
        WORK / f"aipw_scale_{tag}.log",
    )
    return {
        **res,
        "rows": rows,
        "overrides": extra,
        "load_1min_start_end": [load0, os.getloadavg()[0]],
        "fit_seconds": m["nuisance"]["fit_seconds"],
        "newton_passes": m["nuisance"]["newton_passes"],
        "converged": m["nuisance"]["converged"],
        "global": m["global"],
        "run_dir": str(run_dir),
    }


def doubleml(rows: int) -> dict:
    data = data_for(rows)
    load0 = os.getloadavg()[0]
    res = run_measured(
        [sys.executable, str(Path(__file__).resolve()), "--doubleml-child", str(data / "data")],
        WORK / f"aipw_scale_doubleml_{rows}.log",
    )
    if res["returncode"] != 0:
        raise SystemExit(f"DoubleML at {rows} rows: exit {res['returncode']}")
    return {
        **res,
        "rows": rows,
        "load_1min_start_end": [load0, os.getloadavg()[0]],
        **json.loads(res["last_line"]),
    }


def doubleml_child(path: str) -> None:
    """In this process: DoubleMLIRM with logistic pipelines on the parquet at ``path``."""
    import doubleml as dml
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    from distributed_hte.simulate.aipw_segments import (
        CATEGORICAL_FEATURES,
        HISTORY_BINS,
        NUMERIC_FEATURES,
    )

    t0 = time.perf_counter()
    numeric, cats = list(NUMERIC_FEATURES), list(CATEGORICAL_FEATURES)
    df = pq.read_table(path, columns=[*numeric, *cats, "is_top_3", "clicked"]).to_pandas()
    names = {c: df[c].astype("category").cat.categories for c in cats}
    for c in cats:  # DoubleMLData wants numbers: codes, one-hot encoded by the pipeline
        df[c] = df[c].astype("category").cat.codes
    pre = ColumnTransformer(
        [("num", StandardScaler(), list(range(len(numeric)))),
         ("cat", OneHotEncoder(handle_unknown="infrequent_if_exist", min_frequency=50),
          list(range(len(numeric), len(numeric) + len(cats))))]
    )  # fmt: skip
    learner = make_pipeline(pre, LogisticRegression(C=1.0, max_iter=1000))
    obj = dml.DoubleMLData(df, y_col="clicked", d_cols="is_top_3", x_cols=numeric + cats)
    irm = dml.DoubleMLIRM(obj, learner, learner, n_folds=3)
    irm.fit()
    groups = {
        "category": pd.get_dummies(pd.Categorical.from_codes(df["category"], names["category"])),
        "history_len": pd.get_dummies(
            pd.cut(df["history_len"], list(HISTORY_BINS), labels=False).astype(int)
        ),
    }
    gates = {}
    for name, dummies in groups.items():
        gate = irm.gate(groups=dummies.astype(bool))
        ci = gate.confint(level=0.95)
        gates[name] = {"segments": len(ci), "estimates": np.asarray(gate.coef).tolist()}
    print(
        json.dumps(
            {
                "ate": float(irm.coef[0]),
                "se": float(irm.se[0]),
                "gates": gates,
                "in_process_seconds": time.perf_counter() - t0,
            }
        )
    )


def record(key: str, value: dict) -> None:
    """Merge one measurement into results/aipw_scale.json and recompute the ratios."""
    path = RESULTS / f"{RESULT}.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.pop("machine", None)
    runs = doc.setdefault("runs", {})
    runs[key] = {**value, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    doc.setdefault("commands", [])
    cmd = "python benchmarks/bench_aipw_scale.py " + " ".join(sys.argv[1:])
    if cmd not in doc["commands"]:
        doc["commands"].append(cmd)
    ratios = {}
    if "ours_5000000" in runs and "ours_50000000" in runs:
        ratios["peak_pss_50m_over_5m"] = (
            runs["ours_50000000"]["peak_pss_gb"] / runs["ours_5000000"]["peak_pss_gb"]
        )
        ratios["seconds_50m_over_5m"] = (
            runs["ours_50000000"]["seconds"] / runs["ours_5000000"]["seconds"]
        )
    for key_ours in [k for k in runs if k.startswith("ours_by_arm")]:
        n = key_ours.rsplit("_", 1)[1]
        if f"doubleml_{n}" in runs:
            d, o = runs[f"doubleml_{n}"], runs[key_ours]
            ratios[f"doubleml_over_{key_ours}"] = {
                "seconds": d["seconds"] / o["seconds"],
                "peak_pss": d["peak_pss_gb"] / o["peak_pss_gb"],
                "ate_difference_in_our_se": (d["ate"] - o["global"]["estimate"])
                / o["global"]["se"],
            }
    doc["ratios"] = ratios
    save(RESULT, doc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="*", default=[])
    ap.add_argument("--doubleml-rows", type=int, default=None)
    ap.add_argument(
        "--ours-override",
        nargs="*",
        default=[],
        help="more key=value for our run against DoubleML, e.g. nuisance.cache_gb=2 "
        "(shards held in memory; the 50M spec streams them: cache_gb 0)",
    )
    ap.add_argument("--doubleml-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.doubleml_child:
        doubleml_child(args.doubleml_child)
        return
    for n in args.rows:
        record(f"ours_{n}", ours(n, [], str(n)))
    if args.doubleml_rows:
        n = args.doubleml_rows
        record(f"doubleml_{n}", doubleml(n))
        extra = ["nuisance.outcome_model=by_arm", *args.ours_override]
        tag = "".join(
            "_" + o.split("=")[0].split(".")[-1] + o.split("=")[1] for o in args.ours_override
        )
        record(f"ours_by_arm{tag}_{n}", ours(n, extra, f"by_arm{tag}_{n}"))


if __name__ == "__main__":
    main()
