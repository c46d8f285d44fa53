"""Kind ``segments``: segment discovery by a group lasso over creatives, solved exactly.

Stages: simulate (optional) → profile the data (vocabularies, label and feature checks,
the creative → segment map) → one Ray Train run of the distributed proximal Newton
solver (:mod:`distributed_hte.train.segments_worker`), which follows a warm-started λ
path from λ_max and solves the k cross-validation folds and the full-data refit in the
same data passes → artefacts: ``segments.json``, the CV path table and plot, recovery
metrics against ``truth.json`` when the data is simulated, and a predictor that assigns
people to segments.

Segment rule: person i goes to argmax_j a_j + γ_jᵀ x̃_i, where x̃ are the standardised
covariates and a_j is the mean intercept of segment j's creatives (the response of an
average person to the segment's average creative).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import torch
from pydantic import Field, model_validator

from distributed_hte.data.profile import DatasetProfile, profile_dataset
from distributed_hte.data.schema import ColumnRequirement, check_schema
from distributed_hte.errors import DataError, RunDirError, SpecError
from distributed_hte.kinds import Kind
from distributed_hte.rundir import RunDir, write_json
from distributed_hte.simulate import segments as sim
from distributed_hte.spec import JobSpec, StrictModel
from distributed_hte.train.segments_worker import (
    RESULT_FILE,
    SegmentsEncoder,
    exact_split_config,
    segments_worker,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- spec


class SegmentsDataSpec(StrictModel):
    """Columns of the input parquet: one row per person. Defaults match the simulator."""

    path: str | None = None
    segment: str = "segment"
    creative: str = "creative"
    creative_scope: Literal["global", "segment"] = Field(
        "global",
        description="creative ids are unique across segments (global) or only within one",
    )
    label: str = "y"
    features: list[str] | None = Field(
        None, description="covariates (default with a simulate section: the simulator's)"
    )
    truth: str | None = Field(
        None, description="truth.json of simulated data (default: <path>/../truth.json if present)"
    )
    cache_gb: float = Field(
        2.0,
        ge=0,
        description="keep a worker's shard in its memory up to this size; beyond it, stream every pass",
    )


class SegmentsModelSpec(StrictModel):
    """The penalised problem and the solver's stopping rule."""

    lam: float = Field(0.01, gt=0, description="penalty level λ")
    alpha: float = Field(
        0.1, ge=0, le=1, description="share of λ on ‖γ‖₁ (the rest on the creative groups)"
    )
    tol: float = Field(1e-8, gt=0, description="KKT residual at which a solve stops")
    max_iter: int = Field(50, ge=1, description="Newton iterations per λ on the path")
    path_steps: int = Field(8, ge=1, description="λ values from λ_max down to lam, warm-started")


class CrossValidationSpec(StrictModel):
    """k-fold CV by a stable hash of each row; 0 turns it off (refit only).

    ``select`` picks the reported solution among the λ path: ``last`` is ``model.lam``
    (what a Tune sweep over λ wants), ``min`` the λ of least CV log loss, ``one_se`` the
    largest λ within one standard error of that minimum (sparser, and the usual choice
    when the point is which creatives match their segment).
    """

    folds: int = Field(5, ge=0)
    select: Literal["last", "min", "one_se"] = "last"

    @model_validator(mode="after")
    def _not_one(self) -> CrossValidationSpec:
        if self.folds == 1:
            raise ValueError("folds must be 0 (no cross-validation) or at least 2")
        if self.folds == 0 and self.select != "last":
            raise ValueError(f"select: {self.select} needs cross-validation (folds >= 2)")
        return self


class SegmentsSimulateSpec(StrictModel):
    """Simulated data (see :mod:`distributed_hte.simulate.segments`)."""

    n_people: int = Field(200_000, ge=10)
    n_features: int = Field(50, ge=1)
    creatives_per_segment: list[int] = Field(default_factory=lambda: [3, 4, 5, 6], min_length=1)
    active_features: int = Field(5, ge=0)
    effect_low: float = 0.4
    effect_high: float = 0.9
    base_logit: float = -1.0
    intercept_sd: float = Field(0.1, ge=0)
    off_message: int = Field(2, ge=0)
    off_message_norm: float = Field(1.0, ge=0)
    seed: int = 0
    chunk_rows: int = Field(500_000, ge=1_000)
    out: str | None = Field(
        None, description="output folder (default: <outputs.dir>/data/<name>-<hash>)"
    )

    def config(self) -> sim.SegmentsSimConfig:
        raw = self.model_dump(exclude={"out"})
        raw["creatives_per_segment"] = tuple(raw["creatives_per_segment"])
        return sim.SegmentsSimConfig(**raw)


class SegmentsSpec(JobSpec):
    kind: Literal["segments"]
    data: SegmentsDataSpec = SegmentsDataSpec()
    model: SegmentsModelSpec = SegmentsModelSpec()
    cv: CrossValidationSpec = CrossValidationSpec()
    simulate: SegmentsSimulateSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> SegmentsSpec:
        d = self.data
        if d.path is None and self.simulate is None:
            raise ValueError("data.path is required unless a simulate section generates the data")
        if d.features is None and self.simulate is None:
            raise ValueError("data.features is required: list the covariate columns")
        used = [d.segment, d.creative, d.label, *self.feature_columns()]
        dupes = sorted({c for c in used if used.count(c) > 1})
        if dupes:
            raise ValueError(
                f"data: column(s) {dupes} are named more than once across segment/creative/label/features"
            )
        return self

    def feature_columns(self) -> list[str]:
        if self.data.features is not None:
            return list(self.data.features)
        assert self.simulate is not None
        return [f"x{i}" for i in range(self.simulate.n_features)]


# ----------------------------------------------------------------------------- prediction


@dataclass
class SegmentsModel:
    """What ``dhte predict`` needs: the encoder and the fitted refit coefficients."""

    encoder: SegmentsEncoder
    segment_intercept: np.ndarray  # (m,) a_j on the standardised scale
    gamma: np.ndarray  # (m, p) standardised scale

    def scores(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """``(n, m)`` segment scores a_j + γ_jᵀ x̃."""
        x = self.encoder.features_matrix(batch).astype(np.float64)
        return x @ self.gamma.T + self.segment_intercept[None, :]


def predict_batch(
    batch: dict[str, np.ndarray], model: SegmentsModel, keep: list[str]
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: ``keep`` columns, ``segment`` and ``score_<segment>``."""
    scores = model.scores(batch)
    names = model.encoder.segment_vocab
    out = {c: np.asarray(batch[c]) for c in keep if c in batch}
    out["segment_assigned"] = names[np.argmax(scores, axis=1)]
    for j, name in enumerate(names):
        out[f"score_{name}"] = scores[:, j]
    return out


def assignment_sums_batch(
    batch: dict[str, np.ndarray], model: SegmentsModel, truth: dict
) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: rows whose estimated segment equals the true one."""
    world = sim.world_from_truth(truth)
    est = model.encoder.segment_vocab[np.argmax(model.scores(batch), axis=1)]
    x = np.column_stack([np.asarray(batch[c], dtype=np.float64) for c in world.features])
    true = np.asarray(world.segments, dtype=object)[world.true_segment(x)]
    return {"n": np.array([len(est)]), "agree": np.array([int((est == true).sum())])}


# ----------------------------------------------------------------------------- the kind


@dataclass
class SegmentsPrepared:
    path: str
    n_rows: int
    profile: DatasetProfile
    creatives: pd.DataFrame  # segment, creative, n_people, n_positive (one row per creative)
    truth: dict | None


def _read_parquet(path: str, columns: list[str]):
    import ray.data

    return ray.data.read_parquet(path, columns=columns, file_extensions=["parquet"])


def _creative_block(table: pa.Table, segment: str, creative: str, label: str) -> pa.Table:
    """Ray Data ``map_batches`` function: people and positives per (segment, creative)."""
    out = table.group_by([segment, creative]).aggregate([(label, "count"), (label, "sum")])
    return pa.table(
        {
            "segment": out[segment],
            "creative": out[creative],
            "n_people": out[f"{label}_count"].cast(pa.int64()),
            "n_positive": out[f"{label}_sum"].cast(pa.float64()),
        }
    )


class SegmentsKind(Kind):
    name = "segments"
    spec_class = SegmentsSpec
    artefacts: ClassVar[list[str]] = [
        "segments.json",
        "cv_path.parquet",
        "cv_path.csv",
        "creatives.parquet",
    ]

    def report_iterations(self, spec: SegmentsSpec) -> int:
        return spec.model.path_steps

    # -- simulate ---------------------------------------------------------------------
    def simulated_data_path(self, spec: SegmentsSpec) -> Path | None:
        if spec.simulate is None:
            return None
        if spec.simulate.out:
            return Path(spec.simulate.out).expanduser()
        return (
            Path(spec.outputs.dir).expanduser()
            / "data"
            / f"{spec.name}-{spec.fingerprint('simulate')}"
        )

    def simulate(self, spec: SegmentsSpec, progress: bool = True) -> Path:
        """Simulate once: a folder whose ``simulation.json`` matches the section is reused."""
        out = self.simulated_data_path(spec)
        assert out is not None and spec.simulate is not None
        cfg = spec.simulate.config()
        meta = out / "simulation.json"
        wanted = json.loads(json.dumps(cfg.__dict__))
        if meta.exists():
            if json.loads(meta.read_text()).get("config") == wanted:
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
        sim.simulate_segments(cfg, out, progress=progress)
        log.info("[simulate] %d people in %.1fs → %s", cfg.n_people, time.perf_counter() - t0, out)
        return out / "data"

    # -- check / prepare ----------------------------------------------------------------
    def requirements(self, spec: SegmentsSpec) -> list[ColumnRequirement]:
        d = spec.data
        return [
            ColumnRequirement(d.segment, "data.segment", "id"),
            ColumnRequirement(d.creative, "data.creative", "id"),
            ColumnRequirement(d.label, "data.label", "binary"),
            *[ColumnRequirement(c, "data.features", "numeric") for c in spec.feature_columns()],
        ]

    def check(self, spec: SegmentsSpec) -> None:
        assert spec.data.path is not None
        check_schema(spec.data.path, self.requirements(spec))

    def prepare(self, spec: SegmentsSpec) -> SegmentsPrepared:
        d = spec.data
        assert d.path is not None
        req = self.requirements(spec)
        summary = check_schema(d.path, req)
        features = spec.feature_columns()
        fields = {r.name: r.field for r in req}
        ds = _read_parquet(d.path, [d.segment, d.creative, d.label, *features])
        profile = profile_dataset(ds, [d.label, *features], [d.segment, d.creative], fields)
        lab = profile.moments[d.label]
        if lab.lo < 0 or lab.hi > 1 or lab.total != lab.total_sq:
            raise DataError(
                f"column {d.label!r} (named by data.label) must hold only 0 and 1; found values "
                f"between {lab.lo:g} and {lab.hi:g}"
                + (" that are not all 0 or 1" if lab.lo >= 0 and lab.hi <= 1 else "")
            )
        for c in features:
            if profile.moments[c].std == 0:
                raise DataError(
                    f"feature {c!r} is constant over the whole dataset; drop it from data.features "
                    "(a constant carries no signal and the creative intercepts already cover it)"
                )
        creatives = self._creative_table(ds, spec)
        truth = self._truth(spec)
        log.info(
            "[prepare] %s: %d people in %d file(s); %d segments, %d creatives, %d features",
            d.path,
            profile.n_rows,
            summary.n_files,
            creatives["segment"].nunique(),
            len(creatives),
            len(features),
        )
        return SegmentsPrepared(d.path, profile.n_rows, profile, creatives, truth)

    def _creative_table(self, ds, spec: SegmentsSpec) -> pd.DataFrame:
        """One row per creative (segment, creative, n_people, n_positive); checks the map."""
        d = spec.data
        parts = ds.map_batches(
            _creative_block,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"segment": d.segment, "creative": d.creative, "label": d.label},
        ).to_pandas()
        table = (
            parts.groupby(["segment", "creative"], as_index=False)[["n_people", "n_positive"]]
            .sum()
            .sort_values(["segment", "creative"], ignore_index=True)
        )
        if d.creative_scope == "global":
            owners = table.groupby("creative")["segment"].unique()
            shared = owners[owners.map(len) > 1]
            if len(shared):
                shown = "; ".join(
                    f"creative {k!r} in segments {', '.join(map(repr, sorted(v)))}"
                    for k, v in list(shared.items())[:3]
                )
                raise DataError(
                    f"{len(shared)} creative(s) appear in more than one segment ({shown}). Each creative "
                    "belongs to exactly one segment; if creative ids are only unique within a segment, "
                    "set data.creative_scope: segment"
                )
        degenerate = table[(table["n_positive"] == 0) | (table["n_positive"] == table["n_people"])]
        if len(degenerate):
            row = degenerate.iloc[0]
            only = 0 if row["n_positive"] == 0 else 1
            raise DataError(
                f"{len(degenerate)} creative(s) have a single label value among their people, e.g. "
                f"creative {row['creative']!r} of segment {row['segment']!r}: all {int(row['n_people'])} "
                f"people have label {only}. A creative's unpenalised intercept then has no finite "
                "estimate; drop such creatives or collect more data"
            )
        return table

    def _truth(self, spec: SegmentsSpec) -> dict | None:
        d = spec.data
        path = Path(d.truth) if d.truth else None
        if path is None and d.path and "://" not in d.path:
            guess = Path(d.path).resolve().parent / "truth.json"
            path = guess if guess.exists() else None
        return json.loads(path.read_text()) if path is not None else None

    def make_encoder(self, spec: SegmentsSpec, prepared: SegmentsPrepared) -> SegmentsEncoder:
        d, prof = spec.data, prepared.profile
        features = spec.feature_columns()
        seg_vocab, cre_vocab = prof.vocab[d.segment], prof.vocab[d.creative]
        table = prepared.creatives
        seg_idx = np.searchsorted(seg_vocab, table["segment"].to_numpy())
        cre_idx = np.searchsorted(cre_vocab, table["creative"].to_numpy())
        keys = np.sort(seg_idx.astype(np.int64) * len(cre_vocab) + cre_idx)
        return SegmentsEncoder(
            segment=d.segment,
            creative=d.creative,
            label=d.label,
            features=features,
            segment_vocab=seg_vocab,
            creative_vocab=cre_vocab,
            pair_keys=keys,
            mean=np.array([prof.moments[c].mean for c in features]),
            scale=np.array([prof.moments[c].std for c in features]),
            n_folds=spec.cv.folds,
            fold_key=[d.segment, d.creative, d.label, *features],
        )

    # -- execute ----------------------------------------------------------------------
    def execute(
        self,
        spec: SegmentsSpec,
        prepared: SegmentsPrepared,
        run: RunDir,
        callbacks: list | None = None,
    ) -> dict[str, Any]:
        from ray.train import FailureConfig, RunConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from distributed_hte.train.trainer import cpus_per_worker, scaling_config

        enc = self.make_encoder(spec, prepared)
        ds = _read_parquet(prepared.path, [enc.segment, enc.creative, enc.label, *enc.features])
        workers = spec.scaling.num_workers
        threads = max(int(cpus_per_worker(spec)), 1)
        log.info(
            "[solve] %d workers%s; λ=%g α=%g, %d-fold CV + refit, tol %g",
            workers,
            " on GPU" if spec.scaling.use_gpu else "",
            spec.model.lam,
            spec.model.alpha,
            spec.cv.folds,
            spec.model.tol,
        )
        t0 = time.perf_counter()
        trainer = TorchTrainer(
            segments_worker,
            train_loop_config={
                "encoder": enc,
                "model": spec.model.model_dump(),
                "cache_gb": spec.data.cache_gb,
                "rows_per_worker": prepared.n_rows / workers,
                "log_every_s": spec.train.log_every_s,
            },
            scaling_config=scaling_config(spec),
            torch_config=TorchConfig(backend="nccl" if spec.scaling.use_gpu else "gloo"),
            datasets={"train": ds},
            dataset_config=exact_split_config(),
            run_config=RunConfig(
                name="solve",
                storage_path=str(run.path.resolve()),
                failure_config=FailureConfig(max_failures=0),
                callbacks=callbacks or None,
                worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
            ),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("the solver finished without a result checkpoint")
        with result.checkpoint.as_directory() as d:
            sol = torch.load(Path(d) / RESULT_FILE, map_location="cpu", weights_only=False)
        seconds = time.perf_counter() - t0
        return self._write_outputs(spec, prepared, enc, sol, seconds, run)

    def _write_outputs(
        self,
        spec: SegmentsSpec,
        prepared: SegmentsPrepared,
        enc: SegmentsEncoder,
        sol: dict[str, Any],
        seconds: float,
        run: RunDir,
    ) -> dict[str, Any]:
        path = pd.DataFrame(sol["path"])
        chosen = select_on_path(path, spec.cv.select)
        picked = sol["refit_path"][chosen]
        c = picked["c"].double().numpy()
        gamma = picked["gamma"].double().numpy()
        delta = picked["delta"].double().numpy()
        info = picked["info"]
        step = path.iloc[chosen].to_dict()
        layout = enc.layout()
        seg_of = layout.segment_of.numpy()
        m = layout.n_segments
        a = np.bincount(seg_of, weights=c, minlength=m) / np.bincount(seg_of, minlength=m)
        model = SegmentsModel(enc, a, gamma)
        torch.save({"model": model}, run.file("model", "predictor.pt"))

        table = self._creatives_out(enc, prepared, c, delta)
        table.to_parquet(run.file("creatives.parquet"), index=False)
        if prepared.truth is not None:
            path = self._path_recovery(prepared, enc, path, sol["refit_path"])
        path["selected"] = np.arange(len(path)) == chosen
        path.to_parquet(run.file("cv_path.parquet"), index=False)
        path.to_csv(run.file("cv_path.csv"), index=False)
        final = sol["metrics"]
        segments_json = self._segments_json(spec, enc, a, gamma, table, info, sol["lam_max"], step)
        segments_json["selection"] = {"rule": spec.cv.select, "path_step": chosen + 1}
        write_json(run.file("segments.json"), segments_json)

        metrics: dict[str, Any] = {
            "val_loss": step.get("cv_log_loss", step["train_log_loss"]),
            "solution": {
                "lam": info["lam"],
                "alpha": spec.model.alpha,
                "selected_by": spec.cv.select,
                "lam_max": sol["lam_max"],
                "objective": step["objective"],
                "train_log_loss": step["train_log_loss"],
                "nonzero_gamma": int(step["nonzero_gamma"]),
                "creatives_matching_segment": int((table["delta_norm"] == 0).sum()),
                "creatives": len(table),
            },
            "solver": {
                "converged": bool(all(info["converged"])),
                "kkt_residual": max(info["kkt"]),
                "newton_iterations_at_lambda": info["newton_iterations"],
                "data_passes": int(final["passes_total"]),
                "path_steps": len(sol["path"]),
                "seconds": seconds,
                "num_workers": spec.scaling.num_workers,
                "replica_max_abs_diff": final["replica_max_abs_diff"],
                "cached_in_worker_memory": bool(final["cached_in_worker_memory"]),
            },
        }
        if spec.cv.folds > 1:
            metrics["cv"] = {
                "folds": spec.cv.folds,
                "log_loss": step["cv_log_loss"],
                "log_loss_se": step["cv_log_loss_se"],
                "lam_min": float(path["lam"][path["cv_log_loss"].idxmin()]),
            }
        if prepared.truth is not None:
            metrics["truth"] = {
                "assignment_accuracy": self._assignment_accuracy(prepared, enc, model),
                **{
                    k: float(path[k].iloc[chosen])
                    for k in (
                        "delta_zero_pattern_accuracy",
                        "gamma_support_f1",
                        "gamma_support_precision",
                        "gamma_support_recall",
                    )
                },
            }
        write_json(run.file("metrics.json"), metrics)
        self._plots(spec, enc, gamma, table, path, run)
        return metrics

    def _creatives_out(
        self, enc: SegmentsEncoder, prepared: SegmentsPrepared, c: np.ndarray, delta: np.ndarray
    ) -> pd.DataFrame:
        V = len(enc.creative_vocab)
        seg = enc.segment_vocab[enc.pair_keys // V]
        cre = enc.creative_vocab[enc.pair_keys % V]
        table = pd.DataFrame({"segment": seg, "creative": cre})
        table = table.merge(prepared.creatives, on=["segment", "creative"], how="left")
        table["intercept"] = c
        table["delta_norm"] = np.linalg.norm(delta, axis=1)
        table["matches_segment"] = table["delta_norm"] == 0
        return table

    def _segments_json(self, spec, enc, a, gamma, table, info, lam_max, final) -> dict[str, Any]:
        """Standardised-scale coefficients (where the penalty acts) and original-scale ones."""
        out_segments = {}
        for j, name in enumerate(enc.segment_vocab):
            g = gamma[j]
            orig = g / enc.scale
            rows = table[table["segment"] == name]
            out_segments[str(name)] = {
                "intercept": float(a[j]),
                "intercept_original_scale": float(a[j] - np.dot(orig, enc.mean)),
                "gamma": {f: float(v) for f, v in zip(enc.features, g, strict=True)},
                "gamma_original_scale": {
                    f: float(v) for f, v in zip(enc.features, orig, strict=True)
                },
                "selected_features": [f for f, v in zip(enc.features, g, strict=True) if v != 0],
                "creatives": [
                    {
                        "creative": _plain(r.creative),
                        "intercept": float(r.intercept),
                        "delta_norm": float(r.delta_norm),
                        "matches_segment": bool(r.matches_segment),
                        "n_people": int(r.n_people),
                    }
                    for r in rows.itertuples()
                ],
            }
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
                "mean": dict(zip(enc.features, map(float, enc.mean), strict=True)),
                "scale": dict(zip(enc.features, map(float, enc.scale), strict=True)),
                "note": "gamma and intercepts act on (x - mean) / scale; *_original_scale on raw x",
            },
            "segment_rule": "argmax_j intercept_j + gamma_j . (x - mean) / scale; intercept_j = mean creative intercept of segment j",
            "segments": out_segments,
        }

    def _path_recovery(
        self,
        prepared: SegmentsPrepared,
        enc: SegmentsEncoder,
        path: pd.DataFrame,
        refit_path: list[dict[str, Any]],
    ) -> pd.DataFrame:
        """Add recovery columns against ``truth.json`` to every λ of the path.

        δ zero pattern: share of creatives whose "matches its segment" (δ = 0) agrees with
        the truth. γ support: precision, recall and F1 of the non-zero entries.
        """
        world = sim.world_from_truth(prepared.truth)
        seg_pos = {str(s): j for j, s in enumerate(enc.segment_vocab)}
        feat_pos = {f: i for i, f in enumerate(enc.features)}
        V = len(enc.creative_vocab)
        pairs = [
            (str(enc.segment_vocab[key // V]), _plain(enc.creative_vocab[key % V]))
            for key in enc.pair_keys
        ]
        true_zero = {
            (world.segments[world.segment_of[k]], int(cid)): bool(np.all(world.delta[k] == 0))
            for k, cid in enumerate(world.creatives)
        }
        true_support = world.gamma != 0
        rows = []
        for step in refit_path:
            gamma = step["gamma"].numpy()
            est = np.zeros_like(true_support)
            for j, s in enumerate(world.segments):
                for i, f in enumerate(world.features):
                    if s in seg_pos and f in feat_pos:
                        est[j, i] = gamma[seg_pos[s], feat_pos[f]] != 0
            tp = int((est & true_support).sum())
            precision = tp / max(int(est.sum()), 1)
            recall = tp / max(int(true_support.sum()), 1)
            matches = (step["delta"].norm(dim=1) == 0).numpy()
            agree = [true_zero.get(pair) == bool(z) for pair, z in zip(pairs, matches, strict=True)]
            rows.append(
                {
                    "delta_zero_pattern_accuracy": float(np.mean(agree)),
                    "gamma_support_f1": 2 * precision * recall / max(precision + recall, 1e-12),
                    "gamma_support_precision": precision,
                    "gamma_support_recall": recall,
                }
            )
        return pd.concat([path, pd.DataFrame(rows)], axis=1)

    def _assignment_accuracy(
        self, prepared: SegmentsPrepared, enc: SegmentsEncoder, model: SegmentsModel
    ) -> float:
        """Share of people whose estimated segment is their true one (a Ray Data pass)."""
        truth = prepared.truth
        assert truth is not None
        features = list(dict.fromkeys(enc.features + list(truth["features"])))
        # take_all of one row per batch, not Dataset.sum: an aggregation shuffles, and its
        # tasks cannot be placed inside a Tune trial's placement group.
        rows = (
            _read_parquet(prepared.path, features)
            .map_batches(
                assignment_sums_batch,
                fn_kwargs={"model": model, "truth": truth},
                batch_format="numpy",
                batch_size=65_536,
            )
            .take_all()
        )
        n = sum(int(r["n"]) for r in rows)
        return sum(int(r["agree"]) for r in rows) / max(n, 1)

    def _plots(self, spec, enc, gamma, table, path: pd.DataFrame, run: RunDir) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if "cv_log_loss" in path:
            fig, ax = plt.subplots(figsize=(5.5, 3.8))
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
            fig.tight_layout()
            fig.savefig(run.file("plots", "cv_path.png"), dpi=110)
            plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1.3]})
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
        fig.tight_layout()
        fig.savefig(run.file("plots", "segments.png"), dpi=110)
        plt.close(fig)

    def after_sweep(self, spec: SegmentsSpec, run: RunDir, table: pd.DataFrame) -> None:
        """CV table and curves over every (λ, α) trial of a sweep."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        lam, alpha = "config.model.lam", "config.model.alpha"
        cols = [c for c in (lam, alpha) if c in table]
        keep = [
            c
            for c in [
                *cols,
                "val_loss",
                "cv_log_loss_se",
                "nonzero_gamma",
                "nonzero_delta",
                "trial_seconds",
                "status",
                "trial_id",
            ]
            if c in table
        ]
        cv = table[keep].rename(columns={lam: "lam", alpha: "alpha", "val_loss": "cv_log_loss"})
        cv.to_parquet(run.file("cv_table.parquet"), index=False)
        cv.to_csv(run.file("cv_table.csv"), index=False)
        if "lam" not in cv or cv["cv_log_loss"].isna().all():
            return
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
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
        fig.tight_layout()
        fig.savefig(run.file("plots", "cv_curve.png"), dpi=110)
        plt.close(fig)

    # -- predict ----------------------------------------------------------------------
    def predict(self, run_dir: Path, data_path: str, out_path: Path) -> dict[str, Any]:
        bundle_path = Path(run_dir) / "model" / "predictor.pt"
        if not bundle_path.exists():
            raise RunDirError(
                f"{run_dir} has no model/predictor.pt; is it a complete segments run?"
            )
        model: SegmentsModel = torch.load(bundle_path, map_location="cpu", weights_only=False)[
            "model"
        ]
        enc = model.encoder
        schema = check_schema(
            data_path, [ColumnRequirement(c, "data.features", "numeric") for c in enc.features]
        ).schema
        out_path = Path(out_path)
        if out_path.exists():
            raise RunDirError(
                f"--out {out_path} already exists; predictions never overwrite a path"
            )
        keep = [c for c in schema.names if c not in enc.features]
        tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
        t0 = time.perf_counter()
        try:
            (
                _read_parquet(data_path, schema.names)
                .map_batches(
                    predict_batch,
                    fn_kwargs={"model": model, "keep": keep},
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


def select_on_path(path: pd.DataFrame, rule: str) -> int:
    """Index of the λ on the path that ``rule`` (last, min, one_se) picks.

    ``one_se``: the largest λ whose CV log loss is within one standard error of the
    minimum (the path runs from large to small λ).
    """
    if rule == "last" or "cv_log_loss" not in path:
        return len(path) - 1
    best = int(path["cv_log_loss"].idxmin())
    if rule == "min":
        return best
    bound = path["cv_log_loss"].iloc[best] + path["cv_log_loss_se"].iloc[best]
    return int(np.flatnonzero(path["cv_log_loss"].to_numpy() <= bound)[0])


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v
