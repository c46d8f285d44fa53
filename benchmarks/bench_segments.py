"""Segments solver benchmarks: against skglm on one core, and scaling with N at p = 200.

    python benchmarks/bench_segments.py skglm            # N = 200k, p = 50 (the target problem)
    python benchmarks/bench_segments.py scale [--sizes 1000000 10000000]

skglm: the same reparametrised problem as a weighted group lasso over an augmented dense
design (creative intercept columns with weight 0, one singleton group per γ coordinate
with weight α, one group per δ_k with weight (1 − α)/n_j) solved by GroupProxNewton.
Both run in this process on one thread; we report each one's time and objective, and
the time skglm needs to get within 1e-6 (relative) of our objective.

scale: ``dhte run jobs/segments_scale.yaml`` at each N (2 workers, streaming when a
shard exceeds data.cache_gb), with wall time and peak PSS of the whole process tree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import WORK, run_measured, save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _target_problem(n: int, p: int, seed: int = 0):
    from distributed_hte.simulate.segments import SegmentsSimConfig, make_world, simulate_chunk

    cfg = SegmentsSimConfig(n_people=n, n_features=p, seed=seed)
    world = make_world(cfg)
    table = simulate_chunk(world, 0, n, cfg.seed)
    x = np.column_stack([table[f].to_numpy() for f in world.features]).astype(np.float64)
    x = (x - x.mean(0)) / x.std(0)
    creative = np.searchsorted(world.creatives, table["creative"].to_numpy())
    y = table["y"].to_numpy().astype(np.float64)
    return world, x, creative, y


def bench_skglm(n: int, p: int, lam: float, alpha: float) -> dict:
    import scipy.sparse as sp
    from skglm.datafits import LogisticGroup
    from skglm.penalties import WeightedGroupL2
    from skglm.solvers import GroupProxNewton

    from distributed_hte.models.segments import DataPass, Layout, fit_path
    from distributed_hte.train.segments_worker import group_blocks

    torch.set_num_threads(1)
    world, x, k, y = _target_problem(n, p)
    seg = world.segment_of
    C, m = len(seg), int(seg.max()) + 1
    layout = Layout(torch.as_tensor(seg), m, p)
    blocks = list(group_blocks(k, x.astype(np.float32), y, np.zeros(n, dtype=np.int64)))
    data = DataPass(lambda: iter(blocks), layout, 0)
    t0 = time.perf_counter()
    params, infos, lam_max = fit_path(data, 1, lam, alpha, tol=1e-8, path_steps=1)
    ours_s = time.perf_counter() - t0
    ours_obj = infos[-1].objective[0]

    # Augmented design: [creative one-hot | γ blocks (segment j) | δ blocks (creative k)].
    # Ours uses float32 features (as in a run); give skglm the same rounded values.
    xf = x.astype(np.float32).astype(np.float64)
    rows = np.arange(n)
    onehot = sp.csr_matrix((np.ones(n), (rows, k)), shape=(n, C))
    gcols = (seg[k][:, None] * p + np.arange(p)[None, :]).ravel()
    gam = sp.csr_matrix((xf.ravel(), (np.repeat(rows, p), gcols)), shape=(n, m * p))
    dcols = (k[:, None] * p + np.arange(p)[None, :]).ravel()
    dlt = sp.csr_matrix((xf.ravel(), (np.repeat(rows, p), dcols)), shape=(n, C * p))
    # GroupProxNewton takes dense designs only (~1.8 GB at 200k × 1118).
    X = np.asfortranarray(sp.hstack([onehot, gam, dlt]).toarray())
    n_j = np.bincount(seg)
    sizes = [1] * C + [1] * (m * p) + [p] * C
    grp_ptr = np.r_[0, np.cumsum(sizes)].astype(np.int32)
    grp_indices = np.arange(X.shape[1], dtype=np.int32)
    weights = np.r_[np.zeros(C), np.full(m * p, alpha), (1 - alpha) / n_j[seg]]
    datafit = LogisticGroup(grp_ptr, grp_indices)
    penalty = WeightedGroupL2(lam, weights, grp_ptr, grp_indices)
    ys = 2 * y - 1

    def objective(w: np.ndarray) -> float:
        s = X @ w
        return float(np.mean(np.logaddexp(0, -ys * s)) + penalty.value(w))

    # Untimed warm-up: numba compiles skglm's kernels on the first call.
    GroupProxNewton(tol=1e-2, max_iter=1, fit_intercept=False).solve(X, ys, datafit, penalty)
    runs = []
    for tol in (1e-4, 1e-6, 1e-8, 1e-10):
        solver = GroupProxNewton(tol=tol, max_iter=200, max_pn_iter=2000, fit_intercept=False)
        t0 = time.perf_counter()
        w = solver.solve(X, ys, datafit, penalty)[0]
        secs = time.perf_counter() - t0
        obj = objective(w)
        runs.append(
            {
                "tol": tol,
                "seconds": secs,
                "objective": obj,
                "rel_gap_to_ours": (obj - ours_obj) / abs(ours_obj),
            }
        )
        print(runs[-1], flush=True)
    reached = [r for r in runs if r["rel_gap_to_ours"] <= 1e-6]
    return {
        "n": n,
        "p": p,
        "creatives": C,
        "segments": m,
        "lam": lam,
        "alpha": alpha,
        "ours": {
            "seconds": ours_s,
            "objective": ours_obj,
            "kkt": infos[-1].kkt[0],
            "newton_iterations": infos[-1].newton_iterations,
            "data_passes": data.passes,
            "threads": 1,
        },
        "skglm_runs": runs,
        "skglm_seconds_to_ours_within_1e-6": reached[0]["seconds"] if reached else None,
        "note": "skglm timed after an untimed warm-up call (numba compilation)",
    }


def bench_scale(sizes: list[int]) -> dict:
    out = []
    for n in sizes:
        res = run_measured(
            [
                sys.executable,
                "-m",
                "distributed_hte.cli",
                "run",
                "jobs/segments_scale.yaml",
                f"simulate.n_people={n}",
                f"simulate.out={WORK / f'segments_{n}'}",
                f"outputs.dir={WORK / 'runs'}",
            ],
            WORK / f"segments_scale_{n}.log",
        )
        run_dir = Path(res["last_line"])
        m = json.loads((run_dir / "metrics.json").read_text())
        sim = json.loads((WORK / f"segments_{n}" / "simulation.json").read_text())
        row = {
            **res,
            "people": n,
            "simulate_seconds": sim["seconds"],
            "solve_seconds": m["solver"]["seconds"],
            "data_passes": m["solver"]["data_passes"],
            "streamed": not m["solver"]["cached_in_worker_memory"],
            "kkt": m["solver"]["kkt_residual"],
            "objective": m["solution"]["objective"],
        }
        out.append(row)
        print(json.dumps(row, indent=1), flush=True)
    return {"runs": out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["skglm", "scale"])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--p", type=int, default=50)
    ap.add_argument("--lam", type=float, default=0.0118)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    args = ap.parse_args()
    if args.what == "skglm":
        save("segments_vs_skglm", bench_skglm(args.n, args.p, args.lam, args.alpha))
    else:
        save("segments_scale", {"sizes": args.sizes, **bench_scale(args.sizes)})


if __name__ == "__main__":
    main()
