"""Warm start (``retrain.init_from: champion``) against a cold fit on the next day's data.

    python benchmarks/bench_warm_start.py [--rows 200000] [--epochs 12]

Data: one simulation of the seed's design (nonlinear beta and g), shuffled and cut into
day 1 (the first half of the rows), day 2 (every row: more data of the same process) and
a fixed evaluation set (rows held out of both). Day 1 is fitted cold and becomes the
champion of an embedded MLflow registry; day 2 is then fitted three times with the same
spec: from the champion (warm), cold from the exact linear fit (``model.init: auto``, the
default, so the fair baseline) and cold from a random start (``model.init: random``).
Reported: each day-2 fit's validation loss per epoch, the first epoch at which the warm
fit reaches each cold fit's best validation loss, and the holdout R² of all three (the
gate's number). One process, one embedded Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
from common import WORK, save

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def _spec(
    root, name: str, day: str, epochs: int, init_from: str | None, model_init: str = "auto"
) -> dict:
    return {
        "name": name,
        "kind": "fe_hte",
        "data": {"path": str(root / day)},
        "model": {
            "beta_net": {"hidden": [32, 16]},
            "g_net": {"hidden": [16]},
            "solver": "sgd",
            "fixed_effect_lr_multiplier": 30,
            "init": model_init,
        },
        "train": {"epochs": epochs, "batch_size": 2048, "lr": 0.01, "log_every_s": 60,
                  "early_stopping_patience": None},
        "scaling": {"num_workers": 2},
        "outputs": {"dir": str(root / "runs")},
        "registry": {"model": "bench_warm_start"},
        "retrain": {"holdout": {"path": str(root / "golden")}, "init_from": init_from},
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--day1-epochs", type=int, default=24)
    args = p.parse_args()

    from distributed_hte.runner import run_job
    from distributed_hte.runtime import RayTarget, init_ray
    from distributed_hte.simulate.fe_hte import FeHteSimConfig, simulate_fe_hte
    from distributed_hte.spec import validate_spec

    root = WORK / "warm_start"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    init_ray(RayTarget(address=None, num_cpus=4))
    n = args.rows
    sim = simulate_fe_hte(
        FeHteSimConfig(n_rows=n + n // 5, n_users=2_000, n_vendors=400, n_periods=20,
                       beta="nonlinear", g="nonlinear", seed=3),
        root / "sim", progress=False,
    )  # fmt: skip
    df = pads.dataset(str(root / "sim" / "data"), format="parquet").to_table().to_pandas()
    df = df.iloc[np.random.default_rng(0).permutation(len(df))].reset_index(drop=True)
    for name, frame in {
        "day1": df.iloc[: n // 2],
        "day2": df.iloc[:n],
        "golden": df.iloc[n:],
    }.items():
        (root / name).mkdir()
        frame.to_parquet(root / name / "part-0.parquet", index=False)
    del sim

    results: dict = {"rows_day1": n // 2, "rows_day2": n, "holdout_rows": len(df) - n}
    t0 = time.perf_counter()
    # Day 1 gets more epochs: it must converge to become the champion.
    day1 = run_job(validate_spec(_spec(root, "bench", "day1", args.day1_epochs, None)))
    results["day1_seconds"] = time.perf_counter() - t0
    fits = {}
    # Warm first: a cold day-2 fit may be promoted, and the warm one must start from day 1.
    day1_promo = json.loads((day1 / "promotion.json").read_text())
    results["day1_promoted_by_gate"] = day1_promo["promoted"]
    results["day1_reason"] = day1_promo["reason"]
    if not day1_promo["promoted"]:
        # The gate refuses a fit the verdict calls unconverged; an operator promotes it by
        # hand (`dhte models promote`), so the warm fit still goes through @champion.
        from distributed_hte.registry import Registry, resolve_uri

        registry = Registry(resolve_uri(None, str(root / "runs")))
        registry.promote("bench_warm_start", day1_promo["version"])
    warm_from = "champion"
    # Two cold baselines: the default start from the exact linear fit (`model.init: auto`,
    # the fair one) and a random start (`model.init: random`).
    fits_to_run = (
        ("warm", warm_from, "auto"),
        ("cold_linear", None, "auto"),
        ("cold_random", None, "random"),
    )
    for label, init_from, model_init in fits_to_run:
        t0 = time.perf_counter()
        run = run_job(
            validate_spec(_spec(root, "bench", "day2", args.epochs, init_from, model_init))
        )
        seconds = time.perf_counter() - t0
        history = pd.read_parquet(run / "history.parquet")
        promo = json.loads((run / "promotion.json").read_text())
        fits[label] = {
            "val_loss": history["val_loss"].round(5).tolist(),
            "best_val_loss": float(history["val_loss"].min()),
            "holdout_r2": promo["challenger"]["score"],
            "champion_holdout_r2": (promo["champion"] or {}).get("score"),
            "converged": promo["converged"],
            "warm_start": promo.get("warm_start"),
            "seconds": seconds,
        }
    results["fits"] = fits
    for cold in ("cold_linear", "cold_random"):
        target = fits[cold]["best_val_loss"]
        reached = [i + 1 for i, v in enumerate(fits["warm"]["val_loss"]) if v <= target]
        results[cold] = {
            "best_epoch": int(np.argmin(fits[cold]["val_loss"])) + 1,
            "warm_epochs_to_its_best": reached[0] if reached else None,
        }
    save("warm_start", results)


if __name__ == "__main__":
    main()
