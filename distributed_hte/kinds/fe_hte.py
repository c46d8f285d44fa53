"""Kind ``fe_hte``: y = beta(X_beta)·T + g(X_g) + Σ_f FE_f[id_f] + intercept.

Stages: simulate (optional) → profile the data (vocabularies, moments, NaN check) →
Ray Train DDP over Ray Data shards → normalise the fixed effects (zero mean per
family, constant in the intercept) → one distributed evaluation pass (R², RMSE, and
recovery against ``beta_true`` / ``g_true`` / truth files when present) → artefacts.
See :mod:`distributed_hte.models.fe_hte` for identification.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator

from distributed_hte.data.profile import DatasetProfile, profile_dataset
from distributed_hte.data.schema import ColumnRequirement, check_schema
from distributed_hte.data.split import cache_if_small, split_datasets, split_unit
from distributed_hte.errors import DataError, RunDirError, SpecError
from distributed_hte.evaluation.metrics import (
    correlation_from_sums,
    correlation_sums,
    regression_metrics,
    regression_sums,
)
from distributed_hte.kinds import Kind
from distributed_hte.models.fe_hte import FixedEffectsHTE, MLPConfig
from distributed_hte.rundir import RunDir, write_json
from distributed_hte.simulate import fe_hte as sim
from distributed_hte.spec import JobSpec, StrictModel

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- spec


class MLPSpec(StrictModel):
    """A sub-network. ``hidden: []`` is linear (coefficients are exported)."""

    hidden: list[int] = Field(default_factory=list)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batchnorm: bool = False
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"

    def config(self) -> MLPConfig:
        return MLPConfig(tuple(self.hidden), self.dropout, self.batchnorm, self.activation)


class FeHteModelSpec(StrictModel):
    beta_net: MLPSpec = MLPSpec()
    g_net: MLPSpec = MLPSpec()
    # Each id's embedding sees a gradient from only a few rows per batch; a larger step
    # size for the embeddings lets them converge in as many epochs as the networks.
    fixed_effect_lr_multiplier: float = Field(10.0, gt=0)


class FeHteDataSpec(StrictModel):
    """Columns of the input parquet. Defaults match the simulator's output."""

    path: str | None = None
    outcome: str = "revenue"
    treatment: str = "clicks"
    beta_features: list[str] = Field(default_factory=lambda: list(sim.BETA_FEATURES))
    g_features: list[str] = Field(default_factory=lambda: list(sim.G_FEATURES))
    fixed_effects: list[str] = Field(default_factory=lambda: list(sim.FIXED_EFFECTS))
    split_key: list[str] | None = Field(
        None, description="columns hashed for the train/val split (default: all used)"
    )
    beta_true: str | None = "beta_true"
    g_true: str | None = "g_true"
    truth_dir: str | None = Field(
        None, description="fixed-effect truth files (default: <path>/../truth if present)"
    )
    cache: Literal["auto", "always", "never"] = Field(
        "auto",
        description="keep the split datasets in the object store across epochs (auto: when small)",
    )


class FeHteSimulateSpec(StrictModel):
    """Simulated data (see :mod:`distributed_hte.simulate.fe_hte`)."""

    n_rows: int = Field(500_000, ge=1)
    n_users: int = Field(10_000, ge=1)
    n_vendors: int = Field(2_000, ge=1)
    n_periods: int = Field(50, ge=1)
    beta: Literal["linear", "nonlinear"] = "linear"
    g: Literal["linear", "nonlinear"] = "linear"
    noise_sd: float = Field(0.5, ge=0.0)
    seed: int = 0
    chunk_rows: int = Field(1_000_000, ge=1_000)
    out: str | None = Field(
        None, description="output folder (default: <outputs.dir>/data/<name>-<hash>)"
    )


class FeHteSpec(JobSpec):
    kind: Literal["fe_hte"]
    data: FeHteDataSpec = FeHteDataSpec()
    model: FeHteModelSpec = FeHteModelSpec()
    simulate: FeHteSimulateSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> FeHteSpec:
        d = self.data
        if d.path is None and self.simulate is None:
            raise ValueError("data.path is required unless a simulate section generates the data")
        used = [d.outcome, d.treatment, *d.beta_features, *d.g_features, *d.fixed_effects]
        dupes = sorted({c for c in used if used.count(c) > 1})
        if dupes:
            raise ValueError(
                f"data: column(s) {dupes} are named more than once across outcome/treatment/features/fixed_effects"
            )
        return self


# ----------------------------------------------------------------------------- plugin


@dataclass
class FeHtePlugin:
    """Everything a worker needs to build the model and read batches (picklable)."""

    outcome: str
    treatment: str
    beta_features: list[str]
    g_features: list[str]
    fixed_effects: list[str]
    vocab: dict[str, np.ndarray]
    beta_mean: list[float]
    beta_scale: list[float]
    g_mean: list[float]
    g_scale: list[float]
    beta_net: MLPConfig
    g_net: MLPConfig
    fixed_effect_lr_multiplier: float = 10.0

    def param_groups(self, model: torch.nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups: embeddings get ``lr_scale`` = the fixed-effect multiplier."""
        fe = [p for n, p in model.named_parameters() if n.startswith("fixed_effects.")]
        rest = [p for n, p in model.named_parameters() if not n.startswith("fixed_effects.")]
        return [
            {"params": rest, "lr_scale": 1.0},
            {"params": fe, "lr_scale": self.fixed_effect_lr_multiplier},
        ]

    @property
    def columns(self) -> list[str]:
        return [
            self.outcome,
            self.treatment,
            *self.beta_features,
            *self.g_features,
            *self.fixed_effects,
        ]

    def build_model(self) -> FixedEffectsHTE:
        return FixedEffectsHTE(
            len(self.beta_features),
            len(self.g_features),
            [len(self.vocab[c]) for c in self.fixed_effects],
            self.beta_net,
            self.g_net,
            beta_mean=self.beta_mean,
            beta_scale=self.beta_scale,
            g_mean=self.g_mean,
            g_scale=self.g_scale,
        )

    def encode_ids(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Map raw ids to embedding rows: ``(n, n_fe)`` int64 and an ``(n,)`` unseen mask."""
        n = len(batch[self.treatment])
        idx = np.zeros((n, len(self.fixed_effects)), dtype=np.int64)
        unseen = np.zeros(n, dtype=bool)
        for f, col in enumerate(self.fixed_effects):
            vocab = self.vocab[col]
            values = np.asarray(batch[col])
            pos = np.searchsorted(vocab, values)
            pos = np.minimum(pos, len(vocab) - 1)
            miss = vocab[pos] != values
            unseen |= miss
            idx[:, f] = pos
            idx[miss, f] = -1
        return idx, unseen

    def to_tensors(
        self, batch: dict[str, np.ndarray], device: torch.device
    ) -> dict[str, torch.Tensor]:
        def stack(cols: list[str]) -> torch.Tensor:
            if not cols:
                return torch.zeros(
                    (len(batch[self.treatment]), 0), dtype=torch.float32, device=device
                )
            arr = np.column_stack([np.asarray(batch[c], dtype=np.float32) for c in cols])
            return torch.from_numpy(arr).to(device, non_blocking=True)

        ids, unseen = self.encode_ids(batch)
        if unseen.any():
            # Unseen ids only happen at predict time; they get the mean effect (zero).
            ids = np.where(ids < 0, 0, ids)
        out = {
            "x_beta": stack(self.beta_features),
            "x_g": stack(self.g_features),
            "t": torch.from_numpy(np.asarray(batch[self.treatment], dtype=np.float32)).to(device),
            "ids": torch.from_numpy(ids).to(device),
        }
        if self.outcome in batch:
            out["y"] = torch.from_numpy(np.asarray(batch[self.outcome], dtype=np.float32)).to(
                device
            )
        return out

    def loss(self, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        y_hat = model(b["x_beta"], b["x_g"], b["t"], b["ids"])["y_hat"]
        return torch.nn.functional.mse_loss(y_hat.float(), b["y"])

    def eval_sums(self, model: torch.nn.Module, b: dict[str, torch.Tensor]) -> dict[str, float]:
        y_hat = model(b["x_beta"], b["x_g"], b["t"], b["ids"])["y_hat"]
        return regression_sums(b["y"].double().cpu().numpy(), y_hat.double().cpu().numpy())

    def eval_metrics(self, sums: dict[str, float], prefix: str) -> dict[str, float]:
        return regression_metrics(sums, prefix)


# ----------------------------------------------------------------------------- prediction


_MODEL_CACHE: dict[int, FixedEffectsHTE] = {}


def _cached_model(plugin: FeHtePlugin, state: bytes) -> FixedEffectsHTE:
    """Build a model once per process and weights (Ray reuses worker processes)."""
    key = hash(state)
    if key not in _MODEL_CACHE:
        torch.set_num_threads(1)
        model = plugin.build_model()
        model.load_state_dict(torch.load(io.BytesIO(state), map_location="cpu", weights_only=False))
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = model.eval()
    return _MODEL_CACHE[key]


def predict_batch(
    batch: dict[str, np.ndarray], plugin: FeHtePlugin, state: bytes, keep: list[str]
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: ``keep`` columns plus ``beta_hat``, ``g_hat``, ``y_hat``, ``fe_unseen``.

    Runs as stateless tasks (no actor pool): a task holds its CPU only while it works,
    so scoring never deadlocks with Train workers or Tune trials on a small cluster.
    """
    model = _cached_model(plugin, state)
    b = plugin.to_tensors(batch, torch.device("cpu"))
    with torch.no_grad():
        out = model(b["x_beta"], b["x_g"], b["t"], b["ids"])
    _, unseen = plugin.encode_ids(batch)
    res = {c: np.asarray(batch[c]) for c in keep if c in batch}
    res.update(
        beta_hat=out["beta"].numpy().astype(np.float64),
        g_hat=out["g"].numpy().astype(np.float64),
        y_hat=out["y_hat"].numpy().astype(np.float64),
        fe_unseen=unseen,
    )
    return res


def evaluation_sums_batch(
    batch: dict[str, np.ndarray],
    plugin: FeHtePlugin,
    state: bytes,
    split_key: list[str],
    val_fraction: float,
    beta_true: str | None,
    g_true: str | None,
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: one row of additive metric sums per batch."""
    pred = predict_batch(batch, plugin, state, [])
    y = np.asarray(batch[plugin.outcome], dtype=np.float64)
    is_val = split_unit(batch, split_key) < val_fraction
    sums: dict[str, float] = {}
    for side, mask in (("train", ~is_val), ("val", is_val)):
        for k, v in regression_sums(y[mask], pred["y_hat"][mask]).items():
            sums[f"{side}_{k}"] = v
    if beta_true and beta_true in batch:
        sums.update(correlation_sums(pred["beta_hat"], np.asarray(batch[beta_true]), "beta"))
    if g_true and g_true in batch:
        sums.update(correlation_sums(pred["g_hat"], np.asarray(batch[g_true]), "g"))
    return {k: np.array([v]) for k, v in sums.items()}


# ----------------------------------------------------------------------------- the kind


@dataclass
class FeHtePrepared:
    path: str
    n_rows: int
    profile: DatasetProfile
    truth_dir: Path | None
    has_beta_true: bool
    has_g_true: bool


def _read_parquet(path: str, columns: list[str]):
    import ray.data

    return ray.data.read_parquet(path, columns=columns, file_extensions=["parquet"])


class FeHteKind(Kind):
    name = "fe_hte"
    spec_class = FeHteSpec

    # -- simulate ---------------------------------------------------------------------
    def simulated_data_path(self, spec: FeHteSpec) -> Path | None:
        if spec.simulate is None:
            return None
        if spec.simulate.out:
            return Path(spec.simulate.out).expanduser()
        return (
            Path(spec.outputs.dir).expanduser()
            / "data"
            / f"{spec.name}-{spec.fingerprint('simulate')}"
        )

    def simulate(self, spec: FeHteSpec, progress: bool = True) -> Path:
        """Simulate once: a folder whose ``simulation.json`` matches the section is reused."""
        out = self.simulated_data_path(spec)
        assert out is not None and spec.simulate is not None
        cfg = sim.FeHteSimConfig(**spec.simulate.model_dump(exclude={"out"}))
        meta = out / "simulation.json"
        if meta.exists():
            found = json.loads(meta.read_text()).get("config")
            if found == asdict(cfg):
                log.info("[simulate] reusing %s (same simulate section)", out)
                return out / "data"
            raise SpecError(
                f"simulate.out {out} already holds a different simulation; choose another simulate.out "
                "or delete that folder"
            )
        if out.exists():
            raise SpecError(
                f"simulate.out {out} exists and is not a finished simulation; delete it or choose another"
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        sim.simulate_fe_hte(cfg, out, progress=progress)
        log.info("[simulate] %d rows in %.1fs → %s", cfg.n_rows, time.perf_counter() - t0, out)
        return out / "data"

    # -- check / prepare ----------------------------------------------------------------
    def requirements(self, spec: FeHteSpec) -> list[ColumnRequirement]:
        d = spec.data
        req = [
            ColumnRequirement(d.outcome, "data.outcome", "numeric"),
            ColumnRequirement(d.treatment, "data.treatment", "numeric"),
        ]
        req += [ColumnRequirement(c, "data.beta_features", "numeric") for c in d.beta_features]
        req += [ColumnRequirement(c, "data.g_features", "numeric") for c in d.g_features]
        req += [ColumnRequirement(c, "data.fixed_effects", "id") for c in d.fixed_effects]
        for c in d.split_key or []:
            req.append(
                ColumnRequirement(c, "data.split_key", "id" if c in d.fixed_effects else "numeric")
            )
        return req

    def check(self, spec: FeHteSpec) -> None:
        assert spec.data.path is not None
        check_schema(spec.data.path, self.requirements(spec))

    def prepare(self, spec: FeHteSpec) -> FeHtePrepared:
        d = spec.data
        assert d.path is not None
        req = self.requirements(spec)
        summary = check_schema(d.path, req)
        numeric = [d.outcome, d.treatment, *d.beta_features, *d.g_features]
        fields = {r.name: r.field for r in req}
        profile = profile_dataset(
            _read_parquet(d.path, numeric + d.fixed_effects), numeric, d.fixed_effects, fields
        )
        for c in d.beta_features + d.g_features:
            if profile.moments[c].std == 0:
                raise DataError(
                    f"feature {c!r} is constant over the whole dataset; drop it from the spec (a constant carries no signal)"
                )
        truth_dir = Path(d.truth_dir) if d.truth_dir else None
        if truth_dir is None and "://" not in d.path:
            guess = Path(d.path).resolve().parent / "truth"
            truth_dir = guess if guess.is_dir() else None
        names = summary.schema.names
        log.info(
            "[prepare] %s: %d rows in %d file(s); fixed effects %s",
            d.path,
            profile.n_rows,
            summary.n_files,
            ", ".join(f"{c}={len(profile.vocab[c])}" for c in d.fixed_effects),
        )
        return FeHtePrepared(
            path=d.path,
            n_rows=profile.n_rows,
            profile=profile,
            truth_dir=truth_dir,
            has_beta_true=bool(d.beta_true and d.beta_true in names),
            has_g_true=bool(d.g_true and d.g_true in names),
        )

    def make_plugin(self, spec: FeHteSpec, prepared: FeHtePrepared) -> FeHtePlugin:
        d, m = spec.data, prepared.profile.moments

        def scale(c: str) -> float:
            return m[c].std or 1.0

        return FeHtePlugin(
            outcome=d.outcome,
            treatment=d.treatment,
            beta_features=list(d.beta_features),
            g_features=list(d.g_features),
            fixed_effects=list(d.fixed_effects),
            vocab={c: prepared.profile.vocab[c] for c in d.fixed_effects},
            beta_mean=[m[c].mean for c in d.beta_features],
            beta_scale=[scale(c) for c in d.beta_features],
            g_mean=[m[c].mean for c in d.g_features],
            g_scale=[scale(c) for c in d.g_features],
            beta_net=spec.model.beta_net.config(),
            g_net=spec.model.g_net.config(),
            fixed_effect_lr_multiplier=spec.model.fixed_effect_lr_multiplier,
        )

    @staticmethod
    def split_key(spec: FeHteSpec) -> list[str]:
        d = spec.data
        return list(
            d.split_key
            or [d.outcome, d.treatment, *d.fixed_effects, *d.beta_features, *d.g_features]
        )

    # -- execute ----------------------------------------------------------------------
    def execute(
        self, spec: FeHteSpec, prepared: FeHtePrepared, run: RunDir, callbacks: list | None = None
    ) -> dict[str, Any]:
        from distributed_hte.train.trainer import fit

        plugin = self.make_plugin(spec, prepared)
        ds = _read_parquet(prepared.path, plugin.columns)
        datasets = split_datasets(ds, self.split_key(spec), spec.train.val_fraction)
        cached = cache_if_small(datasets, prepared.n_rows, len(plugin.columns), spec.data.cache)
        train_rows = int(prepared.n_rows * (1 - spec.train.val_fraction))
        log.info(
            "[fit] %d workers%s, %d epochs, batch %d",
            spec.scaling.num_workers,
            " on GPU" if spec.scaling.use_gpu else "",
            spec.train.epochs,
            spec.train.batch_size,
        )
        t0 = time.perf_counter()
        result = fit(spec, plugin, datasets, train_rows, run.path, callbacks=callbacks)
        fit_seconds = time.perf_counter() - t0

        model = plugin.build_model()
        model.load_state_dict(
            torch.load(result.best_model_path, map_location="cpu", weights_only=False)
        )
        counts = [
            torch.as_tensor(prepared.profile.id_counts[c].copy()) for c in plugin.fixed_effects
        ]
        model.normalize_(counts)
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        state = buf.getvalue()
        # What predict needs: normalised weights + the plugin (vocabularies, scaling).
        torch.save({"plugin": plugin, "state": state}, run.file("model", "predictor.pt"))

        log.info("[estimate] evaluation pass over %d rows", prepared.n_rows)
        metrics = self._evaluate(spec, prepared, plugin, state)
        metrics["training"] = {
            "epochs_run": int(result.final_metrics.get("epoch", 0)),
            "best_epoch": int(result.final_metrics.get("best_epoch", 0)),
            "early_stopped": bool(result.final_metrics.get("early_stopped", False)),
            "best_val_loss": result.final_metrics.get("best_val_loss"),
            "rows_per_s": result.final_metrics.get("rows_per_s"),
            "rows_per_s_per_worker": result.final_metrics.get("rows_per_s_per_worker"),
            "fit_seconds": fit_seconds,
            "num_workers": spec.scaling.num_workers,
            "resumed_from_epoch": int(result.final_metrics.get("resumed_from_epoch", 0)),
            "cached_in_object_store": cached,
        }
        metrics["fixed_effects"] = self._export_fixed_effects(model, plugin, prepared, run)
        coefs = model.linear_coefficients(plugin.beta_features, plugin.g_features)
        if "beta" in coefs or "g" in coefs:
            write_json(run.file("coefficients.json"), coefs)
        write_json(run.file("metrics.json"), metrics)
        import pandas as pd

        if result.history:
            pd.DataFrame(result.history).to_parquet(run.file("history.parquet"))
        self._plots(spec, prepared, plugin, state, result.history, run)
        return metrics

    def _evaluate(
        self, spec: FeHteSpec, prepared: FeHtePrepared, plugin: FeHtePlugin, state: bytes
    ) -> dict[str, Any]:
        d = spec.data
        cols = list(dict.fromkeys(plugin.columns + self.split_key(spec)))
        if prepared.has_beta_true:
            cols.append(d.beta_true)
        if prepared.has_g_true:
            cols.append(d.g_true)
        rows = (
            _read_parquet(prepared.path, cols)
            .map_batches(
                evaluation_sums_batch,
                fn_kwargs={
                    "plugin": plugin,
                    "state": state,
                    "split_key": self.split_key(spec),
                    "val_fraction": spec.train.val_fraction,
                    "beta_true": d.beta_true,
                    "g_true": d.g_true,
                },
                batch_format="numpy",
                batch_size=65_536,
            )
            .take_all()
        )
        sums: dict[str, float] = {}
        for row in rows:
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        out: dict[str, Any] = {}
        for side in ("train", "val"):
            side_sums = {k[len(side) + 1 :]: v for k, v in sums.items() if k.startswith(side + "_")}
            if side_sums.get("n", 0) > 0:
                out[side] = regression_metrics(side_sums)
        truth: dict[str, Any] = {}
        if prepared.has_beta_true:
            truth.update(correlation_from_sums(sums, "beta"))
        if prepared.has_g_true:
            truth.update(correlation_from_sums(sums, "g"))
        if truth:
            out["truth"] = truth
        return out

    def _export_fixed_effects(
        self, model: FixedEffectsHTE, plugin: FeHtePlugin, prepared: FeHtePrepared, run: RunDir
    ) -> dict[str, Any]:
        """Write ``fixed_effects/<column>.parquet`` (id, estimate, n_rows); correlate with truth."""
        summary: dict[str, Any] = {
            "normalisation": "zero mean over ids seen in training; constant in intercept",
            "intercept": float(model.intercept.detach()),
        }
        for f, col in enumerate(plugin.fixed_effects):
            ids = plugin.vocab[col]
            est = model.fixed_effects[f].weight.detach().double()[:, 0].numpy()
            pq.write_table(
                pa.table({"id": ids, "estimate": est, "n_rows": prepared.profile.id_counts[col]}),
                run.file("fixed_effects", f"{col}.parquet"),
            )
            entry: dict[str, Any] = {"n_ids": len(ids), "sd": float(est.std())}
            truth = sim.read_truth(prepared.truth_dir, col) if prepared.truth_dir else None
            if truth is not None:
                common = truth.reindex(ids)
                ok = common.notna().to_numpy()
                if ok.sum() > 2:
                    entry["corr_with_truth"] = float(
                        np.corrcoef(est[ok], common.to_numpy()[ok])[0, 1]
                    )
            summary[col] = entry
        return summary

    def _plots(self, spec, prepared, plugin, state, history, run: RunDir) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if history:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            epochs = [h["epoch"] for h in history]
            ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
            if "val_loss" in history[0]:
                ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
            ax.set_xlabel("epoch")
            ax.set_ylabel("MSE")
            ax.set_yscale("log")
            ax.legend()
            ax.set_title(f"{spec.name}: training curve")
            fig.tight_layout()
            fig.savefig(run.file("plots", "training_curve.png"), dpi=110)
            plt.close(fig)
        if prepared.has_beta_true:
            d = spec.data
            sample = (
                _read_parquet(prepared.path, [*plugin.columns, d.beta_true])
                .limit(20_000)
                .to_pandas()
            )
            pred = predict_batch(
                {c: sample[c].to_numpy() for c in sample.columns}, plugin, state, []
            )
            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            ax.scatter(sample[d.beta_true], pred["beta_hat"], s=2, alpha=0.3)
            lo, hi = float(sample[d.beta_true].min()), float(sample[d.beta_true].max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=1)
            ax.set_xlabel("true beta")
            ax.set_ylabel("estimated beta")
            ax.set_title("treatment-effect recovery (20k rows)")
            fig.tight_layout()
            fig.savefig(run.file("plots", "beta_recovery.png"), dpi=110)
            plt.close(fig)

    # -- predict ----------------------------------------------------------------------
    def predict(self, run_dir: Path, data_path: str, out_path: Path) -> dict[str, Any]:
        bundle_path = Path(run_dir) / "model" / "predictor.pt"
        if not (Path(run_dir) / "COMPLETE").exists() or not bundle_path.exists():
            raise RunDirError(
                f"{run_dir} is not a complete fe_hte run (no COMPLETE marker or model/predictor.pt)"
            )
        bundle = torch.load(bundle_path, map_location="cpu", weights_only=False)
        plugin: FeHtePlugin = bundle["plugin"]
        req = [
            ColumnRequirement(c, "the trained model", "numeric")
            for c in [plugin.treatment, *plugin.beta_features, *plugin.g_features]
        ]
        req += [ColumnRequirement(c, "the trained model", "id") for c in plugin.fixed_effects]
        check_schema(data_path, req)
        out_path = Path(out_path).expanduser().resolve()
        if out_path.exists():
            raise RunDirError(
                f"--out {out_path} already exists; predictions never overwrite a path"
            )
        tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
        cols = [plugin.treatment, *plugin.beta_features, *plugin.g_features, *plugin.fixed_effects]
        t0 = time.perf_counter()
        try:
            (
                _read_parquet(data_path, cols)
                .map_batches(
                    predict_batch,
                    fn_kwargs={
                        "plugin": plugin,
                        "state": bundle["state"],
                        "keep": plugin.fixed_effects,
                    },
                    batch_format="numpy",
                    batch_size=65_536,
                )
                .write_parquet(str(tmp))
            )
            os.replace(tmp, out_path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        n = pads.dataset(str(out_path), format="parquet").count_rows()
        return {"rows": n, "seconds": time.perf_counter() - t0, "out": str(out_path)}
