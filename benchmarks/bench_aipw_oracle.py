"""Coverage of aipw_segments' segment intervals with the TRUE nuisances (no fitting).

    python benchmarks/bench_aipw_oracle.py --replications 400 --rows 60000

Each replication draws a fresh table from the simulator's generating model and forms the
AIPW scores from the true propensity e(x) and click probabilities P(Y=1|x,t), clipped
at ``--clip`` as the kind does; segment estimates, SEs, the pointwise normal intervals
and the joint bands (symmetric max-|t| and the skewness-corrected one the kind reports)
go through the kind's own functions (``estimators.aipw``). Whatever under-coverage is
left here is not nuisance estimation, clipping bias or fold plumbing: it is the normal
approximation of a segment's studentized mean. NumPy only, one process, about a minute.
Writes ``results/aipw_oracle_coverage.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks.common import RESULTS


def main() -> None:
    from scipy import stats

    from distributed_hte.estimators import aipw as est
    from distributed_hte.simulate import aipw_segments as sim

    ap = argparse.ArgumentParser()
    ap.add_argument("--replications", type=int, default=400)
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--clip", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--truth-rows", type=int, default=2_000_000)
    ap.add_argument(
        "--same-tables-as-coverage",
        action="store_true",
        help="draw replication r's table as bench_aipw_coverage.py does (same seed: same rows)",
    )
    ap.add_argument(
        "--min-treated-events",
        type=float,
        default=0.0,
        help="the kind's events filter, with the true P(Y=1|x,1) as the outcome model",
    )
    ap.add_argument("--min-control-events", type=float, default=0.0)
    ap.add_argument("--out", default="aipw_oracle_coverage.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cfg = sim.AipwSimConfig(n_rows=args.rows, truth_rows=args.truth_rows, seed=args.seed)
    pop = sim.population_truth(cfg)["segments"]
    truth = {
        "category": np.array([pop["category"][c] for c in sim.CATEGORIES]),
        "history_len": np.array([pop["history_len"][h] for h in sim.HISTORY_LABELS]),
    }
    hits = {k: {"pointwise": [], "joint_symmetric": [], "joint_skew_corrected": []} for k in truth}
    clipped = []
    for r in range(args.replications):
        if args.same_tables_as_coverage:  # simulate_chunk's stream, draw for draw
            rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1, r)))
        else:
            rng = np.random.default_rng([11, r])
        d = sim._draw(cfg, rng, args.rows)
        t = (rng.random(args.rows) < d["e"]).astype(float)
        y = (rng.random(args.rows) < np.where(t == 1, d["p1"], d["p0"])).astype(float)
        psi, clip = est.aipw_scores(t, y, d["e"], d["p1"], d["p0"], args.clip)
        clipped.append(float(clip.mean()))
        bucket = np.searchsorted(np.asarray(sim.HISTORY_BINS), d["history_len"], side="left") - 1
        for key, label in (("category", d["cat"]), ("history_len", bucket)):
            g = len(truth[key])
            n = np.bincount(label, minlength=g).astype(float)
            s1, s2, s3 = (np.bincount(label, weights=psi**p, minlength=g) for p in (1, 2, 3))
            n_t = np.bincount(label, weights=t, minlength=g)
            ev_t = np.bincount(label, weights=t * d["p1"], minlength=g)
            ev_c = np.bincount(label, weights=(1 - t) * d["p0"], minlength=g)
            keep = (np.minimum(ev_t, n_t - ev_t) >= args.min_treated_events) & (
                np.minimum(ev_c, n - n_t - ev_c) >= args.min_control_events
            )
            theta, se = est.mean_se(n, s1, s2)
            crit = est.joint_critical_value(int(keep.sum()), 0.95)
            z = stats.norm.ppf(0.975)
            tv = truth[key]
            lo, hi = est.skew_corrected_band(theta, se, n, est.skewness(n, s1, s2, s3), crit)
            # a filtered-out segment counts as NaN pointwise and is not part of the band
            hits[key]["pointwise"].append(np.where(keep, np.abs(theta - tv) <= z * se, np.nan))
            k = keep
            hits[key]["joint_symmetric"].append(
                bool(np.all(np.abs(theta[k] - tv[k]) <= crit * se[k]))
            )
            hits[key]["joint_skew_corrected"].append(
                bool(np.all((lo[k] <= tv[k]) & (tv[k] <= hi[k])))
            )
    labels = {"category": list(sim.CATEGORIES), "history_len": list(sim.HISTORY_LABELS)}
    result = {
        "command": f"python benchmarks/bench_aipw_oracle.py --replications {args.replications} "
        f"--rows {args.rows} --clip {args.clip} --seed {args.seed} "
        f"--truth-rows {args.truth_rows} --min-treated-events {args.min_treated_events:g} "
        f"--min-control-events {args.min_control_events:g}"
        f"{' --same-tables-as-coverage' if args.same_tables_as_coverage else ''} --out {args.out}",
        "seconds": round(time.perf_counter() - t0, 1),
        "share_clipped": float(np.mean(clipped)),
        "segmentations": {
            key: {
                "pointwise": float(np.nanmean(h["pointwise"])),
                "pointwise_by_segment": dict(
                    zip(
                        labels[key],
                        np.nanmean(h["pointwise"], axis=0).round(4).tolist(),
                        strict=True,
                    )
                ),
                "reported_share_by_segment": dict(
                    zip(
                        labels[key],
                        np.mean(~np.isnan(h["pointwise"]), axis=0).round(4).tolist(),
                        strict=True,
                    )
                ),
                "joint_symmetric": float(np.mean(h["joint_symmetric"])),
                "joint_skew_corrected": float(np.mean(h["joint_skew_corrected"])),
            }
            for key, h in hits.items()
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
