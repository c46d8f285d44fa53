"""Training throughput and scaling: the full Ray pipeline against a bare PyTorch loop.

    python benchmarks/bench_training.py [--rows 2000000]

* efficiency: rows/s per worker through Ray Data → Ray Train (1 worker, streaming, no
  cache) against a bare in-memory PyTorch loop, same model (the seed's 27k-parameter
  network) and batch size, one thread each. Target >= 0.9.
* scaling: total rows/s of 2 workers against 1 worker on this machine.
Steady state: the rates are from the last epoch (the first includes pipeline start-up).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import torch
from common import ROOT, WORK, run_measured, save, simulate

BATCH = 8192
MODEL = [
    "model.beta_net.hidden=[128,64,32]",
    "model.beta_net.dropout=0.1",
    "model.beta_net.batchnorm=true",
    "model.g_net.hidden=[64,32]",
    "model.g_net.batchnorm=true",
]


def bare_loop(data: Path, max_rows: int) -> float:
    """Rows/s of a plain in-memory loop: tensors prebuilt, no data pipeline at all."""
    sys.path.insert(0, str(ROOT))
    from distributed_hte.kinds.fe_hte import FeHteKind
    from distributed_hte.spec import load_spec

    torch.set_num_threads(1)
    table = pads.dataset(data / "data").head(max_rows)
    spec = load_spec(
        ROOT / "jobs/fe_hte_500k_nonlinear.yaml",
        [f"data.path={data / 'data'}", "simulate=null", *MODEL],
    )
    # The same plugin (vocabularies, scaling) the Ray workers get, built from this table.
    import pickle

    from distributed_hte.data.profile import _profile_block, merge_profiles

    d = spec.data
    numeric = [d.outcome, d.treatment, *d.beta_features, *d.g_features]
    prof = merge_profiles(
        [pickle.loads(_profile_block(table, numeric, d.fixed_effects)["profile"][0])]
    )

    class P:  # the minimum FeHteKind.make_plugin reads
        profile = prof

    plugin = FeHteKind().make_plugin(spec, P)
    model = plugin.build_model()
    opt = torch.optim.Adam(plugin.param_groups(model), lr=1e-3)
    batch = plugin.to_tensors(
        {c: table.column(c).to_numpy() for c in plugin.columns}, torch.device("cpu")
    )
    n = len(batch["y"])
    t0 = time.perf_counter()
    for i in range(0, n - BATCH + 1, BATCH):
        b = {k: v[i : i + BATCH] for k, v in batch.items()}
        loss = plugin.loss(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (n // BATCH * BATCH) / (time.perf_counter() - t0)


def ray_run(data: Path, workers: int, epochs: int, rows: int) -> dict:
    res = run_measured(
        [
            sys.executable,
            "-m",
            "distributed_hte.cli",
            "run",
            "jobs/fe_hte_500k_nonlinear.yaml",
            f"data.path={data / 'data'}",
            "simulate=null",
            *MODEL,
            f"train.epochs={epochs}",
            f"train.batch_size={BATCH}",
            "train.val_fraction=0.0",
            "train.early_stopping_patience=null",
            "data.cache=never",
            f"scaling.num_workers={workers}",
            f"outputs.dir={WORK / 'runs'}",
            "train.log_every_s=60",
        ],
        WORK / f"train_{workers}w.log",
    )
    import pandas as pd

    hist = pd.read_parquet(Path(res["last_line"]) / "history.parquet")
    last = hist.iloc[-1]
    return {
        **steady_rates(last, rows / workers),
        "rows_per_s": float(last["rows_per_s"]),
        "rows_per_s_per_worker": float(last["rows_per_s_per_worker"]),
        "first_batch_seconds": float(last["first_batch_seconds"]),
        "epoch_seconds": float(last["epoch_seconds"]),
        "wall_seconds": res["seconds"],
        "peak_pss_gb": res["peak_pss_gb"],
    }


def steady_rates(last, rows_per_worker: float) -> dict:
    """Rate once data flows: the epoch's training time minus the wait for its first batch."""
    train_seconds = rows_per_worker / float(last["rows_per_s_per_worker"])
    steady = rows_per_worker / (train_seconds - float(last["first_batch_seconds"]))
    return {"steady_rows_per_s_per_worker": steady}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    data = simulate(f"nonlinear_{args.rows}", args.rows, beta="nonlinear", g="nonlinear", seed=31)
    bare = bare_loop(data, min(args.rows, 1_000_000))
    one = ray_run(data, 1, args.epochs, args.rows)
    two = ray_run(data, 2, args.epochs, args.rows)
    save(
        "training",
        {
            "command": "python benchmarks/bench_training.py " + " ".join(sys.argv[1:]),
            "rows": args.rows,
            "batch_size": BATCH,
            "model": "beta 128-64-32 BN dropout, g 64-32 BN (seed)",
            "bare_loop_rows_per_s": bare,
            "ray_1_worker": one,
            "ray_2_workers": two,
            "efficiency_ray_per_worker_over_bare": one["rows_per_s_per_worker"] / bare,
            "scaling_2_over_1_workers": two["rows_per_s"] / one["rows_per_s"],
            "steady_efficiency_ray_per_worker_over_bare": one["steady_rows_per_s_per_worker"]
            / bare,
        },
    )


if __name__ == "__main__":
    main()
