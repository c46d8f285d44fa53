"""Artefacts of kind ``fe_hte``: fixed-effect tables, coefficients and plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from distributed_hte.kinds.toolkit import figure, truth_error
from distributed_hte.rundir import RunDir

TRUTH_COLUMNS = ("id", "effect")


def read_fixed_effect_truth(truth_dir: Path, column: str) -> pd.Series | None:
    """True effects of one family (a Series indexed by id), or None when there is no file.

    A file that is there but does not have ``id`` and ``effect`` columns is a DataError
    (raised at prepare time, before any training).
    """
    path = Path(truth_dir) / f"{column}.parquet"
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise truth_error(
            "data.truth_dir", path, f"is not a readable parquet file ({exc})"
        ) from exc
    missing = [c for c in TRUTH_COLUMNS if c not in table.column_names]
    if missing:
        raise truth_error(
            "data.truth_dir",
            path,
            f"lacks column(s) {missing}; a truth file holds one row per id with columns id, effect",
        )
    df = table.select(list(TRUTH_COLUMNS)).to_pandas()
    return pd.Series(df["effect"].to_numpy(), index=df["id"].to_numpy(), name=column)


def export_fixed_effects(
    model,
    vocab: dict[str, np.ndarray],
    id_counts: dict[str, np.ndarray],
    truth: dict[str, pd.Series],
    run: RunDir,
) -> dict[str, Any]:
    """Write ``fixed_effects/<column>.parquet`` (id, estimate, n_rows); correlate with truth."""
    summary: dict[str, Any] = {
        "normalisation": "zero mean over ids seen in training; constant in intercept",
        "intercept": float(model.intercept.detach()),
    }
    for f, col in enumerate(vocab):
        ids = vocab[col]
        est = model.fixed_effects[f].weight.detach().double()[:, 0].numpy()
        pq.write_table(
            pa.table({"id": ids, "estimate": est, "n_rows": id_counts[col]}),
            run.file("fixed_effects", f"{col}.parquet"),
        )
        entry: dict[str, Any] = {"n_ids": len(ids), "sd": float(est.std())}
        if col in truth:
            common = truth[col].reindex(ids)
            ok = common.notna().to_numpy()
            if ok.sum() > 2:
                entry["corr_with_truth"] = float(np.corrcoef(est[ok], common.to_numpy()[ok])[0, 1])
        summary[col] = entry
    return summary


def plot_beta_recovery(true_beta: np.ndarray, beta_hat: np.ndarray, run: RunDir) -> None:
    """Scatter of estimated against true treatment effects."""
    with figure(run.file("plots", "beta_recovery.png"), figsize=(4.5, 4.5)) as (_, ax):
        ax.scatter(true_beta, beta_hat, s=2, alpha=0.3)
        lo, hi = float(true_beta.min()), float(true_beta.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        ax.set_xlabel("true beta")
        ax.set_ylabel("estimated beta")
        ax.set_title(f"treatment-effect recovery ({len(true_beta) // 1000}k rows)")
