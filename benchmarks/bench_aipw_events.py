"""Why a segment under-covers: pointwise coverage against the segment's treated events.

    python benchmarks/bench_aipw_events.py --replications 1000 --rows 60000
    python benchmarks/bench_aipw_events.py --replications 600 --rows 150000

With the TRUE nuisances (as ``bench_aipw_oracle.py``: no fitting, no folds, clip 0.01),
per segment of the category and history segmentations and without any size filter:
mean rows, treated rows, treated and control clicks, the normal pointwise 95 % coverage,
the share of misses on each side, the mean t statistic and its skewness, sd of the
estimate against the mean SE, and the correlation of the estimate with its SE; then the
coverage among replications whose *observed* treated events pass a threshold (what a
filter on observed events would report). NumPy only, one process. Writes
``results/aipw_events_<rows>.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks.common import RESULTS


def main() -> None:
    import pandas as pd
    from scipy import stats

    from distributed_hte.estimators import aipw as est
    from distributed_hte.simulate import aipw_segments as sim

    ap = argparse.ArgumentParser()
    ap.add_argument("--replications", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--truth-rows", type=int, default=2_000_000)
    args = ap.parse_args()
    t0 = time.perf_counter()
    cfg = sim.AipwSimConfig(n_rows=args.rows, truth_rows=args.truth_rows, seed=args.seed)
    pop = sim.population_truth(cfg)["segments"]
    truth = {
        "category": [pop["category"][c] for c in sim.CATEGORIES],
        "history_len": [pop["history_len"][h] for h in sim.HISTORY_LABELS],
    }
    labels = {"category": sim.CATEGORIES, "history_len": sim.HISTORY_LABELS}
    recs = []
    for r in range(args.replications):
        rng = np.random.default_rng([11, r])  # bench_aipw_oracle.py's tables
        d = sim._draw(cfg, rng, args.rows)
        t = (rng.random(args.rows) < d["e"]).astype(float)
        y = (rng.random(args.rows) < np.where(t == 1, d["p1"], d["p0"])).astype(float)
        psi, _ = est.aipw_scores(t, y, d["e"], d["p1"], d["p0"], 0.01)
        bucket = np.searchsorted(np.asarray(sim.HISTORY_BINS), d["history_len"], side="left") - 1
        for key, code in (("category", d["cat"]), ("history_len", bucket)):
            for j, tv in enumerate(truth[key]):
                m = code == j
                p = psi[m]
                recs.append(
                    {
                        "segmentation": key,
                        "segment": labels[key][j],
                        "rows": int(m.sum()),
                        "treated": float(t[m].sum()),
                        "treated_events": float((t[m] * y[m]).sum()),
                        "control_events": float(((1 - t[m]) * y[m]).sum()),
                        "estimate": float(p.mean()),
                        "se": float(p.std(ddof=1) / np.sqrt(m.sum())),
                        "truth": tv,
                    }
                )
    df = pd.DataFrame(recs)
    z = stats.norm.ppf(0.975)
    df["covered"] = (df.estimate - z * df.se <= df.truth) & (df.truth <= df.estimate + z * df.se)
    df["interval_below_truth"] = df.estimate + z * df.se < df.truth
    df["interval_above_truth"] = df.estimate - z * df.se > df.truth
    df["t"] = (df.estimate - df.truth) / df.se
    out = {}
    for (key, seg), g in df.groupby(["segmentation", "segment"], sort=False):
        out[f"{key}={seg}"] = {
            "rows": g.rows.mean(),
            "treated_rows": g.treated.mean(),
            "treated_events": g.treated_events.mean(),
            "control_events": g.control_events.mean(),
            "coverage": g.covered.mean(),
            "miss_interval_below_truth": g.interval_below_truth.mean(),
            "miss_interval_above_truth": g.interval_above_truth.mean(),
            "mean_t": g.t.mean(),
            "skewness_t": float(stats.skew(g.t)),
            "sd_estimate_over_mean_se": g.estimate.std() / g.se.mean(),
            "corr_estimate_se": float(np.corrcoef(g.estimate, g.se)[0, 1]),
        }
    observed_filter = {}
    for k in (10, 20, 25, 30):
        kept = df[np.minimum(df.treated_events, df.treated - df.treated_events) >= k]
        per = kept.groupby(["segmentation", "segment"]).covered.agg(["mean", "size"])
        per = per[per["size"] >= 30]
        worst = per["mean"].idxmin()
        observed_filter[str(k)] = {
            "worst_segment": "=".join(worst),
            "its_coverage": float(per.loc[worst, "mean"]),
            "its_replications_kept": int(per.loc[worst, "size"]),
        }
    result = {
        "command": f"python benchmarks/bench_aipw_events.py --replications {args.replications} "
        f"--rows {args.rows} --seed {args.seed} --truth-rows {args.truth_rows}",
        "seconds": round(time.perf_counter() - t0, 1),
        "by_segment": out,
        "filter_on_observed_treated_events": observed_filter,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"aipw_events_{args.rows}.json").write_text(
        json.dumps(result, indent=1, default=float)
    )
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
