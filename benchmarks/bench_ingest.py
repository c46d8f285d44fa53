"""Ingest: Ray Data → Ray Train worker rows/s against single-thread pyarrow on the same files.

    python benchmarks/bench_ingest.py [--rows 2000000]

The worker only iterates its shard as numpy batches (what the training loop consumes),
with the same read → split filter pipeline that training uses. Target ratio >= 0.5.
"""

from __future__ import annotations

import argparse
import sys
import time

import pyarrow.parquet as pq
from common import ROOT, save, simulate

sys.path.insert(0, str(ROOT))

COLUMNS = [
    "revenue",
    "clicks",
    "u0",
    "u1",
    "v0",
    "v1",
    "x0",
    "z0",
    "z1",
    "z2",
    "user_id",
    "vendor_id",
    "period",
]
BATCH = 8192


def pyarrow_single_thread(files: list[str]) -> float:
    t0 = time.perf_counter()
    rows = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(
            batch_size=BATCH, columns=COLUMNS, use_threads=False
        ):
            cols = {c: batch.column(c).to_numpy() for c in COLUMNS}
            rows += len(cols["clicks"])
    return rows / (time.perf_counter() - t0)


def _consume(config: dict) -> dict:
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    t0, rows = None, 0
    for batch in shard.iter_batches(batch_size=BATCH, batch_format="numpy", prefetch_batches=2):
        t0 = t0 or time.perf_counter()
        rows += len(batch["clicks"])
    return {"rows": rows, "rows_per_s": rows / (time.perf_counter() - t0)}


def ray_to_worker(path: str, split: bool) -> dict:
    import ray.data
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from distributed_hte.data.split import split_datasets

    ds = ray.data.read_parquet(path, columns=COLUMNS)
    train = split_datasets(ds, COLUMNS, 0.1)["train"] if split else ds
    trainer = TorchTrainer(
        _consume,
        scaling_config=ScalingConfig(num_workers=1),
        datasets={"train": train},
        run_config=RunConfig(storage_path="/tmp/dhte_bench_ingest"),
    )
    return trainer.fit().return_value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2_000_000)
    args = ap.parse_args()
    data = simulate(f"nonlinear_{args.rows}", args.rows, beta="nonlinear", g="nonlinear", seed=31)
    files = sorted(str(p) for p in (data / "data").glob("*.parquet"))
    base = max(pyarrow_single_thread(files) for _ in range(2))

    from distributed_hte.runtime import RayTarget, embedded_num_cpus, init_ray

    init_ray(RayTarget(None, embedded_num_cpus(1)))
    plain = ray_to_worker(str(data / "data"), split=False)
    with_split = ray_to_worker(str(data / "data"), split=True)
    save(
        "ingest",
        {
            "command": "python benchmarks/bench_ingest.py " + " ".join(sys.argv[1:]),
            "rows": args.rows,
            "columns": len(COLUMNS),
            "batch_size": BATCH,
            "pyarrow_single_thread_rows_per_s": base,
            "ray_data_to_worker_rows_per_s": plain["rows_per_s"],
            "ray_data_to_worker_with_split_filter_rows_per_s": with_split["rows_per_s"],
            "ratio_ray_over_pyarrow": plain["rows_per_s"] / base,
            "ratio_ray_with_split_over_pyarrow": with_split["rows_per_s"] / base,
        },
    )


if __name__ == "__main__":
    main()
