"""Artefacts of the ``interference_coverage`` study: the coverage plot and table text."""

from __future__ import annotations

import pandas as pd

from distributed_hte.kinds.toolkit import figure
from distributed_hte.rundir import RunDir
from distributed_hte.studies import interference_coverage as study


def plot_coverage(table: pd.DataFrame, run: RunDir) -> None:
    """``plots/coverage.png``: bias ± 2 SE and coverage per estimator and set size."""
    sizes = sorted(table.set_size.unique())
    with figure(run.file("plots", "coverage.png"), figsize=(10, 3.8), ncols=2) as (fig, axes):
        _draw(fig, axes, table, sizes)


def _draw(fig, axes, table: pd.DataFrame, sizes: list) -> None:
    names = list(study.ESTIMATORS)
    for j, k in enumerate(sizes):
        part = table[table.set_size == k].set_index("estimator").loc[names]
        off = (j - (len(sizes) - 1) / 2) * 0.25
        y = [i + off for i in range(len(names))]
        axes[0].errorbar(part.bias, y, xerr=2 * part.bias_se, fmt="o", capsize=3, label=f"K = {k}")
        axes[1].plot(part.coverage, y, "o", label=f"K = {k}")
    axes[0].axvline(0, color="k", lw=0.8)
    axes[0].set_xscale("symlog", linthresh=0.01)
    axes[0].set_xlabel("mean bias ± 2 SE (symlog)")
    axes[1].axvline(0.95, color="C3", ls="--", lw=1)
    axes[1].axvspan(0.90, 0.99, color="C2", alpha=0.1)
    axes[1].set_xlabel("coverage of the 95% interval")
    for ax in axes:
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle("interference estimators: Monte Carlo study")


def format_coverage(table: pd.DataFrame) -> str:
    """The coverage table as fixed-width text (the run log and the benchmarks README)."""
    lines = [
        f"{'K':>2} {'estimator':<8} {'bias':>9} {'(se)':>9} {'MC SD':>8} {'mean SE':>8} "
        f"{'SE/SD':>6} {'cover':>6}"
    ]
    for _, r in table.iterrows():
        lines.append(
            f"{int(r.set_size):>2} {r.estimator:<8} {r.bias:>9.4f} ({r.bias_se:>7.4f}) "
            f"{r.mc_sd:>8.4f} {r.mean_se:>8.4f} {r.se_ratio:>6.2f} {r.coverage:>6.2f}"
        )
    return "\n".join(lines)
