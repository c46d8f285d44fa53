"""Artefacts of kind ``interference``: the estimates plot and the log table."""

from __future__ import annotations

from typing import Any

from distributed_hte.estimators.interference_summary import BENCHMARKS
from distributed_hte.kinds.toolkit import figure
from distributed_hte.rundir import RunDir


def plot_estimates(spec, estimates: dict[str, Any], truth: dict | None, run: RunDir) -> None:
    """``plots/estimates.png``: every estimator with its interval, and the truth if known."""
    names = ["DB", "plug_in", *BENCHMARKS]
    with figure(run.file("plots", "estimates.png"), figsize=(6, 3.6)) as (_, ax):
        _draw(ax, spec, estimates, truth, names)


def _draw(ax, spec, estimates: dict[str, Any], truth: dict | None, names: list[str]) -> None:
    for i, name in enumerate(names):
        e = estimates[name]
        ax.errorbar(
            e["estimate"],
            i,
            xerr=[[e["estimate"] - e["ci_low"]], [e["ci_high"] - e["estimate"]]],
            fmt="o",
            color="C0" if name == "DB" else "C7",
            capsize=3,
        )
    if truth and "gte" in truth:
        ax.axvline(truth["gte"]["value"], color="C3", ls="--", label="true GTE")
        ax.legend(loc="lower right")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel(f"global treatment effect ({spec.estimate.ci_level:.0%} CI)")
    ax.set_title(f"{spec.name}: estimators")


def format_table(estimates: dict[str, Any], truth: dict | None = None) -> str:
    """The estimates as a readable table (for the run log)."""
    lines = [
        "global treatment effect (all items treated vs none)",
        f"  {'estimator':<10} {'estimate':>10} {'se':>9} {'ci_low':>10} {'ci_high':>10}",
    ]
    for name in ["DB", "plug_in", *BENCHMARKS]:
        e = estimates[name]
        lines.append(
            f"  {name:<10} {e['estimate']:>10.4f} {e['se']:>9.4f} {e['ci_low']:>10.4f} {e['ci_high']:>10.4f}"
        )
    for q, e in estimates["DB"].get("policy_values", {}).items():
        lines.append(
            f"  {'V(q=' + q + ')':<10} {e['estimate']:>10.4f} {e['se']:>9.4f} {e['ci_low']:>10.4f} {e['ci_high']:>10.4f}"
        )
    for g, e in estimates["DB"].get("subgroups", {}).items():
        label = f"group {g}"
        lines.append(
            f"  {label:<10} {e['estimate']:>10.4f} {e['se']:>9.4f} {e['ci_low']:>10.4f} {e['ci_high']:>10.4f}"
        )
    if truth and "gte" in truth:
        lines.append(f"  true GTE (simulation): {truth['gte']['value']:.4f}")
    ex = estimates["diagnostics"]["exposure"]
    lines.append(
        f"  exposures to treated items: {ex['treated_share']:.3f} (assignment p = {ex['p_treat']:.3f})"
    )
    return "\n".join(lines)
