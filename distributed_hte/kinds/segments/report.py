"""Artefacts of kind ``segments``: the creatives table, ``segments.json`` and plots."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from distributed_hte.kinds.segments.plugin import SegmentsModel
from distributed_hte.kinds.toolkit import figure
from distributed_hte.rundir import RunDir


def creatives_table(model: SegmentsModel, creatives: pd.DataFrame) -> pd.DataFrame:
    """One row per creative: counts, intercept, ‖δ_k‖, and every δ_k and β_k = γ_j + δ_k.

    ``delta:<f>`` and ``beta:<f>`` act on the covariates as the solver saw them
    (standardised unless ``model.standardize: false``); ``beta_original:<f>`` and
    ``intercept_original`` on the raw covariates.
    """
    enc = model.encoder
    V = len(enc.creative_vocab)
    seg_of = enc.pair_keys // V
    table = pd.DataFrame(
        {"segment": enc.segment_vocab[seg_of], "creative": enc.creative_vocab[enc.pair_keys % V]}
    )
    table = table.merge(creatives, on=["segment", "creative"], how="left")
    c, delta = model.creative_intercept, model.delta
    beta = model.gamma[seg_of] + delta  # (C, p)
    beta_orig = beta / enc.scale[None, :]
    table["intercept"] = c
    table["intercept_original"] = c - beta_orig @ enc.mean
    table["delta_norm"] = np.linalg.norm(delta, axis=1)
    table["matches_segment"] = table["delta_norm"] == 0
    wide = {}
    for i, f in enumerate(enc.features):
        wide[f"delta:{f}"] = delta[:, i]
        wide[f"beta:{f}"] = beta[:, i]
        wide[f"beta_original:{f}"] = beta_orig[:, i]
    return pd.concat([table, pd.DataFrame(wide)], axis=1)


def segments_json(
    spec, model: SegmentsModel, table: pd.DataFrame, info, lam_max: float, final
) -> dict[str, Any]:
    """Coefficients on the solver's scale (where the penalty acts) and the original one."""
    enc = model.encoder
    out_segments = {}
    for j, name in enumerate(enc.segment_vocab):
        g = model.gamma[j]
        orig = g / enc.scale
        a = model.segment_intercept[j]
        rows = table[table["segment"] == name]
        out_segments[str(name)] = {
            "intercept": float(a),
            "intercept_original_scale": float(a - np.dot(orig, enc.mean)),
            "gamma": {f: float(v) for f, v in zip(enc.features, g, strict=True)},
            "gamma_original_scale": {f: float(v) for f, v in zip(enc.features, orig, strict=True)},
            "selected_features": [f for f, v in zip(enc.features, g, strict=True) if v != 0],
            "creatives": [
                {
                    "creative": _plain(r["creative"]),
                    "intercept": float(r["intercept"]),
                    "delta_norm": float(r["delta_norm"]),
                    "matches_segment": bool(r["matches_segment"]),
                    "n_people": int(r["n_people"]),
                    "deviating_features": [f for f in enc.features if r[f"delta:{f}"] != 0],
                }
                for _, r in rows.iterrows()
            ],
        }
    scale_note = (
        "gamma and intercepts act on (x - mean) / scale; *_original_scale on raw x"
        if spec.model.standardize
        else "model.standardize is false: scale is 1, gamma acts on x - mean"
    )
    return {
        "lam": spec.model.lam,
        "alpha": spec.model.alpha,
        "lam_max": lam_max,
        "objective": final["objective"],
        "train_log_loss": final["train_log_loss"],
        "penalty": final["penalty"],
        "convergence": {
            "kkt_residual": max(info["kkt"]),
            "tol": spec.model.tol,
            "converged": bool(all(info["converged"])),
            "newton_iterations": info["newton_iterations"],
            "inner_iterations": info["inner_iterations"],
            "line_search_failures": info["line_search_failures"],
        },
        "standardisation": {
            "standardize": spec.model.standardize,
            "mean": dict(zip(enc.features, map(float, enc.mean), strict=True)),
            "scale": dict(zip(enc.features, map(float, enc.scale), strict=True)),
            "note": scale_note,
        },
        "segment_rule": "argmax_j intercept_j + gamma_j . (x - mean) / scale; intercept_j = mean creative intercept of segment j",
        "segments": out_segments,
    }


def plots(spec, model: SegmentsModel, table: pd.DataFrame, path: pd.DataFrame, run: RunDir) -> None:
    """``plots/cv_path.png`` (with CV) and ``plots/segments.png`` (γ heat map, ‖δ_k‖)."""
    enc = model.encoder
    if "cv_log_loss" in path:
        with figure(run.file("plots", "cv_path.png"), figsize=(5.5, 3.8)) as (_, ax):
            ax.errorbar(path["lam"], path["cv_log_loss"], yerr=path["cv_log_loss_se"], fmt="o-")
            sel = path.loc[path["selected"], "lam"]
            if len(sel):
                ax.axvline(
                    float(sel.iloc[0]),
                    color="tab:red",
                    ls="--",
                    label=f"selected ({spec.cv.select})",
                )
                ax.legend(fontsize=8)
            ax.set_xscale("log")
            ax.set_xlabel("λ")
            ax.set_ylabel(f"{spec.cv.folds}-fold CV mean log loss")
            ax.set_title(f"{spec.name}: CV along the λ path (α={spec.model.alpha:g})")
    with figure(
        run.file("plots", "segments.png"),
        figsize=(11, 3.8),
        ncols=2,
        gridspec_kw={"width_ratios": [3, 1.3]},
    ) as (fig, axes):
        gamma = model.gamma
        lim = max(float(np.abs(gamma).max()), 1e-9)
        im = axes[0].imshow(gamma, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[0].set_yticks(range(len(enc.segment_vocab)), [str(s) for s in enc.segment_vocab])
        axes[0].set_xlabel("feature index")
        axes[0].set_title("segment centroids γ (white: exactly 0)")
        fig.colorbar(im, ax=axes[0])
        labels = [f"{s}/{c}" for s, c in zip(table["segment"], table["creative"], strict=True)]
        colors = ["tab:gray" if z else "tab:red" for z in table["matches_segment"]]
        axes[1].barh(range(len(table)), table["delta_norm"], color=colors)
        axes[1].set_yticks(range(len(table)), labels, fontsize=6)
        axes[1].set_xlabel("‖δ_k‖ (grey: matches segment)")


def sweep_tables(spec, run: RunDir, table: pd.DataFrame) -> None:
    """CV table and curves over every (λ, α) trial of a sweep."""
    lam, alpha = "config.model.lam", "config.model.alpha"
    cols = [c for c in (lam, alpha) if c in table]
    wanted = [
        *cols,
        "val_loss",
        "cv_log_loss_se",
        "nonzero_gamma",
        "nonzero_delta",
        "trial_seconds",
        "status",
        "trial_id",
    ]
    cv = table[[c for c in wanted if c in table]]
    cv = cv.rename(columns={lam: "lam", alpha: "alpha", "val_loss": "cv_log_loss"})
    cv.to_parquet(run.file("cv_table.parquet"), index=False)
    cv.to_csv(run.file("cv_table.csv"), index=False)
    if "lam" not in cv or cv["cv_log_loss"].isna().all():
        return
    with figure(run.file("plots", "cv_curve.png"), figsize=(5.5, 3.8)) as (_, ax):
        groups = cv.groupby("alpha") if "alpha" in cv else [(spec.model.alpha, cv)]
        for a, g in groups:
            g = g.sort_values("lam")
            ax.errorbar(
                g["lam"],
                g["cv_log_loss"],
                yerr=g.get("cv_log_loss_se"),
                fmt="o-",
                label=f"α={a:g}",
                capsize=2,
            )
        ax.set_xscale("log")
        ax.set_xlabel("λ")
        ax.set_ylabel(f"{spec.cv.folds}-fold CV mean log loss")
        ax.legend(fontsize=8)
        ax.set_title(f"{spec.name}: cross-validation over (λ, α)")


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v
