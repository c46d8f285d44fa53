"""Coverage of the aipw_segments intervals: R replications as Ray tasks.

Each replication simulates n impressions (a fresh seed), then runs the kind's own
pieces in process on them: stratified hash folds, per-fold preprocessing from the
fold sums (``fold_stats_block`` → ``fit_encoders``), the penalised Newton fits of every
fold's propensity and outcome model (``glm_sums`` / ``penalised_newton_step``, the
worker's arithmetic without Ray Train), the scoring sums (``score_block``) and the
segment tables (``report.segment_tables``). Only the Ray Data / Ray Train plumbing is
left out, which the tests cover.

Truth: the population effect per category and per history bucket (Monte Carlo,
``--truth-rows`` draws) and, for every segment (quantile segments included), the mean
of the rows' own τ(x) (sample truth). Writes ``results/aipw_coverage.json``.

    python benchmarks/bench_aipw_coverage.py --replications 200 --rows 20000
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from benchmarks.common import RESULTS


def fit_models(design, blk, C: float = 1.0, tol: float = 1e-9, max_iter: int = 50) -> dict:
    from distributed_hte.estimators import aipw as est

    betas = {}
    for role in design.roles():
        for k in range(design.n_folds):
            x, y = design.model_rows(role, blk, k)
            b = np.zeros(x.shape[1] + 1)
            for _ in range(max_iter):
                s = est.glm_sums(x, y, b, design.link_of(role))
                step, _ = est.penalised_newton_step(s, b, C)
                pen = np.full(len(b), 1 / C)
                pen[-1] = 0
                if np.max(np.abs(s.grad + pen * b)) / s.n < tol:
                    break
                b = b + step
            betas[(role, k)] = b
    return betas


def replicate(
    r: int, n: int, seed: int, population: dict, limits: dict, outcome_model: str = "pooled"
) -> dict:
    from distributed_hte.estimators import aipw as est
    from distributed_hte.estimators.crossfit import hash_unit, stratified_cuts, unit_histogram
    from distributed_hte.kinds.aipw_segments import fit_encoders
    from distributed_hte.kinds.aipw_segments import report as rep
    from distributed_hte.kinds.aipw_segments.plugin import (
        Design,
        SegmentRule,
        fold_stats_block,
        merge_pickled,
        score_block,
    )
    from distributed_hte.simulate import aipw_segments as sim

    cfg = sim.AipwSimConfig(n_rows=n, seed=seed)
    tbl = sim.simulate_chunk(cfg, r, n, r * n)
    batch = {c: tbl.column(c).to_numpy(zero_copy_only=False) for c in tbl.column_names}
    t = batch["is_top_3"].astype(np.int64)
    unit = hash_unit({"impression_id": batch["impression_id"]}, ["impression_id"], 0)
    cuts = stratified_cuts(unit_histogram(unit, t, 2), 3)
    values, counts = np.unique(batch["item_exposures"], return_counts=True)
    q = est.quantile_cuts(values, counts, 4)
    cats = tuple(sorted(sim.CATEGORIES))
    segments = [
        SegmentRule("category", "values", cats, levels=cats, **limits),
        SegmentRule("history_len", "bins", sim.HISTORY_LABELS, edges=sim.HISTORY_BINS,
                    **limits),
        SegmentRule("item_exposures", "quantiles", tuple(f"Q{j + 1}" for j in range(len(q) + 1)),
                    edges=tuple(q), **limits),
    ]  # fmt: skip
    numeric = ["history_len", "candidate_set_size", "log_item_exposures", "hour"]
    design = Design(
        key="impression_id", treatment="is_top_3", outcome="clicked", numeric=numeric,
        categorical=["category", "subcategory"], n_folds=3, fold_salt=0, fold_cuts=cuts,
        fold_column=None, encoders=[], outcome_model=outcome_model, link="logit", segments=segments,
    )  # fmt: skip
    lo = np.array([float(np.min(batch[c])) for c in numeric])
    hi = np.array([float(np.max(batch[c])) for c in numeric])
    stats = merge_pickled([{"stats": fold_stats_block(batch, design, lo, hi)["stats"][0]}], "stats")
    design.encoders = fit_encoders(stats, lo, hi, 50, 3)
    betas = fit_models(design, design.raw(batch))
    sums = merge_pickled(
        [{"sums": score_block(batch, design, betas, 0.01, tau="tau_true")["sums"][0]}], "sums"
    )
    table, _, per = rep.segment_tables(design.segments, sums["segments"], 0.95)
    glob = rep.global_effects(sums["global"], 0.95)
    naive = rep.naive_effect(sums["global"])
    pop = population["segments"]
    table["population_truth"] = [
        pop.get(c, {}).get(s, np.nan) for c, s in zip(table.segment_col, table.segment, strict=True)
    ]
    out = {"replication": r, "global": glob, "naive": naive, "segments": []}
    for row in table.itertuples():
        out["segments"].append(
            {
                "segment_col": row.segment_col,
                "segment": row.segment,
                "dr_lift": row.dr_lift,
                "se": row.standard_error,
                "lo": row.ci_lower,
                "hi": row.ci_upper,
                "jlo": row.ci_joint_lower,
                "jhi": row.ci_joint_upper,
                # the symmetric band θ ± crit·se (no skewness correction), for comparison
                "jlo_sym": row.dr_lift
                - per[row.segment_col]["joint_critical_value"] * row.standard_error,
                "jhi_sym": row.dr_lift
                + per[row.segment_col]["joint_critical_value"] * row.standard_error,
                "sample_truth": row.true_effect,
                "population_truth": row.population_truth,
            }
        )
    return out


def summarise(reps: list[dict], population: dict) -> dict:
    import pandas as pd

    rows = [{"replication": r["replication"], **s} for r in reps for s in r["segments"]]
    df = pd.DataFrame(rows)
    out: dict = {"replications": len(reps)}
    for truth in ("population_truth", "sample_truth"):
        d = df.dropna(subset=[truth])
        cov = (d.lo <= d[truth]) & (d[truth] <= d.hi)
        jcov = (d.jlo <= d[truth]) & (d[truth] <= d.jhi)
        jsym = (d.jlo_sym <= d[truth]) & (d[truth] <= d.jhi_sym)
        d = d.assign(cov=cov, jcov=jcov, jsym=jsym)
        by_segment = d.groupby(["segment_col", "segment"]).agg(
            coverage=("cov", "mean"), mean_se=("se", "mean"), sd_estimate=("dr_lift", "std"),
            replications=("cov", "size"),
        )  # fmt: skip
        out[truth] = {
            "by_segment": {
                f"{a}={b}": row._asdict()
                for (a, b), row in zip(
                    by_segment.index, by_segment.itertuples(index=False), strict=True
                )
            },  # fmt: skip
            "pointwise_by_segmentation": d.groupby("segment_col")["cov"].mean().to_dict(),
            "pointwise_all": float(cov.mean()),
            "joint_all_segments_by_segmentation": d.groupby(["segment_col", "replication"])["jcov"]
            .all()
            .groupby("segment_col")
            .mean()
            .to_dict(),
            "joint_symmetric_by_segmentation": d.groupby(["segment_col", "replication"])["jsym"]
            .all()
            .groupby("segment_col")
            .mean()
            .to_dict(),
            "joint_width_over_symmetric_median": (
                ((d.jhi - d.jlo) / (d.jhi_sym - d.jlo_sym))
                .groupby(d.segment_col)
                .median()
                .to_dict()
            ),
            "mean_bias_in_se": float(((d.dr_lift - d[truth]) / d.se).mean()),
        }
    ate = population["ate"]
    g = pd.DataFrame([r["global"] for r in reps])
    nv = pd.DataFrame([r["naive"] for r in reps])
    out["global"] = {
        "population_ate": ate,
        "coverage": float(((g.ci_lower <= ate) & (ate <= g.ci_upper)).mean()),
        "mean_estimate": float(g.estimate.mean()),
        "mean_se": float(g.se.mean()),
        "sd_estimate": float(g.estimate.std()),
    }
    out["naive"] = {
        "mean_estimate": float(nv.estimate.mean()),
        "mean_bias_in_se": float(((nv.estimate - ate) / nv.se).mean()),
    }
    return out


def main() -> None:
    import ray

    from distributed_hte.simulate import aipw_segments as sim

    ap = argparse.ArgumentParser()
    ap.add_argument("--replications", type=int, default=200)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--truth-rows", type=int, default=4_000_000)
    ap.add_argument("--min-rows", type=int, default=1, help="the kind's size filters")
    ap.add_argument("--min-treated", type=int, default=1)
    ap.add_argument("--min-control", type=int, default=1)
    ap.add_argument(
        "--min-treated-events", type=float, default=0.0, help="expected events (0: off)"
    )
    ap.add_argument("--min-control-events", type=float, default=0.0)
    ap.add_argument("--outcome-model", default="pooled", choices=["pooled", "by_arm"])
    ap.add_argument("--out", default="aipw_coverage.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    population = sim.population_truth(
        sim.AipwSimConfig(n_rows=args.rows, seed=args.seed, truth_rows=args.truth_rows)
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=1)(replicate)
    pop_ref = ray.put(population)
    limits = {
        "min_rows": args.min_rows,
        "min_treated": args.min_treated,
        "min_control": args.min_control,
        "min_treated_events": args.min_treated_events,
        "min_control_events": args.min_control_events,
    }
    reps = ray.get(
        [
            task.remote(r, args.rows, args.seed, pop_ref, limits, args.outcome_model)
            for r in range(args.replications)
        ]
    )
    result = {
        "command": f"python benchmarks/bench_aipw_coverage.py --replications {args.replications} "
        f"--rows {args.rows} --seed {args.seed} --truth-rows {args.truth_rows} "
        f"--min-rows {args.min_rows} --min-treated {args.min_treated} "
        f"--min-control {args.min_control} --min-treated-events {args.min_treated_events:g} "
        f"--min-control-events {args.min_control_events:g} "
        f"--outcome-model {args.outcome_model} --out {args.out}",
        "rows": args.rows,
        "seconds": round(time.perf_counter() - t0, 1),
        **summarise(reps, population),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
