"""What shuffling and reproducibility cost: rows/s with and without, side by side.

    python benchmarks/bench_shuffle.py [--rows 1000000] [--epochs 2] [--repeats 2]

Four settings of ``train.shuffle`` / ``train.reproducible`` on the same files (10 parquet
files), one Train worker, streaming (no cache), the seed's 27k-parameter network, batch
8192. Training data is read the way a kind should read it: ``read_parquet(shuffle=
file_shuffle(spec.train))``. Measurements:

* iterator: rows/s of the loop's own epoch iterator (``_epoch_batches``) over the
  materialised data in the driver, local shuffle buffer on and off: the buffer's cost
  alone, without pipeline start-up or scheduling.
* ingest: the same iterator over a one-way streaming split (what a worker reads), per
  setting: adds file shuffling and ``preserve_order``.
* train: the real loop through ``trainer.fit``; rates from the last epoch (steady: once
  the first batch arrived; the wait for it is ``first_batch_seconds``).

Settings run interleaved ``--repeats`` times and the best rate of each is kept: on a
shared 2-core machine other processes only ever slow a run down.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from common import ROOT, WORK, save, simulate

sys.path.insert(0, str(ROOT))
BATCH = 8192
SETTINGS = {
    "off": {"shuffle": False, "reproducible": False},  # the loop before issue 10
    "order_only": {"shuffle": False, "reproducible": True},
    "on": {"shuffle": True, "reproducible": True},  # the default
    "on_not_reproducible": {"shuffle": True, "reproducible": False},
}


def spec_for(data, epochs: int, setting: dict):
    from distributed_hte.spec import load_spec

    return load_spec(
        ROOT / "jobs/fe_hte_500k_nonlinear.yaml",
        [
            f"data.path={data / 'data'}",
            "simulate=null",
            "model.beta_net.dropout=0.1",
            f"train.epochs={epochs}",
            f"train.batch_size={BATCH}",
            "train.val_fraction=0.0",
            "train.early_stopping_patience=null",
            "train.log_every_s=60",
            "scaling.num_workers=1",
            f"outputs.dir={WORK / 'runs'}",
            *[f"train.{k}={str(v).lower()}" for k, v in setting.items()],
        ],
    )


def read(spec, columns):
    import ray
    from ray.data import DataContext

    from distributed_hte.train.ingest import configure_ray_data, file_shuffle

    DataContext.get_current().execution_options.preserve_order = False
    configure_ray_data(spec.train)
    return ray.data.read_parquet(spec.data.path, columns=columns, shuffle=file_shuffle(spec.train))


def ingest_rate(spec, columns, epochs: int) -> float:
    """Rows/s of the loop's iterator over a one-way streaming split (last epoch)."""
    from distributed_hte.train.ingest import ReproducibleDataConfig
    from distributed_hte.train.loop import _epoch_batches
    from distributed_hte.train.shuffle import epoch_seed

    ds = read(spec, columns)
    cfg = ReproducibleDataConfig(spec.train.reproducible)
    shard = cfg.configure({"train": ds}, 1, None, None)[0]["train"]
    rate = 0.0
    for epoch in range(epochs):
        seed = epoch_seed(0, epoch, 0) if spec.train.shuffle else None
        t0, rows = time.perf_counter(), 0
        for b in _epoch_batches(
            shard, None, BATCH, True, seed, spec.train.shuffle_buffer_rows, batch_format="numpy"
        ):
            rows += len(b[columns[0]])
        rate = rows / (time.perf_counter() - t0)
    return rate


def train_rates(spec, kind, prepared, n_rows: int) -> dict:
    from distributed_hte.train.trainer import fit

    plugin = kind.make_plugin(spec, prepared)
    ds = read(spec, plugin.columns)
    t0 = time.perf_counter()
    result = fit(spec, plugin, {"train": ds}, n_rows, WORK / "runs" / f"shuffle_{time.time_ns()}")
    last = result.history[-1]
    return {
        "rows_per_s": last["rows_per_s"],
        "steady_rows_per_s": last["steady_rows_per_s_per_worker"],
        "first_batch_seconds": last["first_batch_seconds"],
        "final_train_loss": last["train_loss"],
        "fit_seconds": time.perf_counter() - t0,
    }


def iterator_rates(spec, columns, repeats: int) -> dict:
    """Best rows/s of ``_epoch_batches`` over materialised data, buffer on and off."""
    from distributed_hte.train.loop import _epoch_batches
    from distributed_hte.train.shuffle import epoch_seed

    ds = read(spec, columns).materialize()
    best = {"off": 0.0, "on": 0.0}
    for _ in range(repeats + 1):
        for name, seed in (("off", None), ("on", epoch_seed(0, 0, 0))):
            t0, rows = time.perf_counter(), 0
            for b in _epoch_batches(
                ds, None, BATCH, True, seed, spec.train.shuffle_buffer_rows, batch_format="numpy"
            ):
                rows += len(b[columns[0]])
            best[name] = max(best[name], rows / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    data = simulate(
        f"nonlinear_{args.rows}_10files",
        args.rows,
        beta="nonlinear",
        g="nonlinear",
        seed=31,
        chunk_rows=args.rows // 10,
    )
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from distributed_hte.kinds.fe_hte import FeHteKind
    from distributed_hte.runtime import RayTarget, init_ray

    init_ray(RayTarget(address=None, num_cpus=3))
    kind = FeHteKind()
    base = spec_for(data, args.epochs, SETTINGS["off"])
    prepared = kind.prepare(base)
    columns = kind.make_plugin(base, prepared).columns
    iterator = iterator_rates(spec_for(data, args.epochs, SETTINGS["on"]), columns, args.repeats)
    print("iterator", iterator, flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, setting in SETTINGS.items():
            spec = spec_for(data, args.epochs, setting)
            r = {
                "ingest_rows_per_s": ingest_rate(spec, columns, args.epochs),
                **train_rates(spec, kind, prepared, prepared.n_rows),
            }
            runs[name].append(r)
            print(name, r, flush=True)
    keys = ("ingest_rows_per_s", "rows_per_s", "steady_rows_per_s")
    out = {
        name: {
            **{k: max(r[k] for r in rs) for k in keys},
            "first_batch_seconds": min(r["first_batch_seconds"] for r in rs),
            "final_train_loss": [r["final_train_loss"] for r in rs],
        }
        for name, rs in runs.items()
    }
    off = out["off"]
    save(
        "shuffle",
        {
            "command": "python benchmarks/bench_shuffle.py " + " ".join(sys.argv[1:]),
            "rows": args.rows,
            "files": 10,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "batch_size": BATCH,
            "shuffle_buffer_rows": base.train.shuffle_buffer_rows,
            "workers": 1,
            "load_average_at_end": os.getloadavg(),
            "iterator_rows_per_s": iterator,
            "iterator_ratio_on_over_off": iterator["on"] / iterator["off"],
            "settings": SETTINGS,
            "best_of_repeats": out,
            "all_runs": runs,
            "ratios_vs_off": {
                name: {
                    "ingest": r["ingest_rows_per_s"] / off["ingest_rows_per_s"],
                    "train_steady": r["steady_rows_per_s"] / off["steady_rows_per_s"],
                    "train_epoch": r["rows_per_s"] / off["rows_per_s"],
                }
                for name, r in out.items()
            },
        },
    )


if __name__ == "__main__":
    main()
