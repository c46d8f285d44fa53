"""Kind ``segments``: segment discovery by a group lasso over creatives, solved exactly.

fit: profile the data (vocabularies, label and feature checks, the creative → segment
map) → one Ray Train run of the distributed proximal Newton solver
(:mod:`distributed_hte.train.segments_worker`), which follows a warm-started λ path from
λ_max and solves the k cross-validation folds and the full-data refit in the same data
passes → the selected refit as a model bundle. evaluate: log loss, accuracy and segment
shares on any data. report: ``segments.json``, the creatives table (every δ_k and β_k),
the CV path, recovery against ``truth.json`` on data this project simulated, plots.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from distributed_hte.data.profile import DatasetProfile, profile_dataset
from distributed_hte.data.schema import ColumnRequirement, check_schema
from distributed_hte.errors import DataError
from distributed_hte.kinds import Kind
from distributed_hte.kinds.segments.spec import SegmentsSpec
from distributed_hte.kinds.toolkit import (
    ModelBundle,
    RowFilter,
    batch_sums,
    load_bundle,
    read_parquet,
    read_truth_json,
    save_bundle,
    truth_error,
    write_predictions,
)
from distributed_hte.rundir import RunDir, write_json

log = logging.getLogger(__name__)

SOLUTION_FILE = "solution.pt"
TRUTH_KEYS = (
    "segments",
    "creatives",
    "segment_of_creative",
    "gamma",
    "delta",
    "intercept",
    "features",
)


@dataclass
class SegmentsPrepared:
    path: str
    n_rows: int
    profile: DatasetProfile
    creatives: pd.DataFrame  # segment, creative, n_people, n_positive (one row per creative)
    truth: dict | None


class SegmentsKind(Kind):
    name = "segments"
    cannot_warm_start = (
        "every fit solves the whole (λ, α) path from λ_max down with cross-validation; "
        "a previous solution is an optimum for one λ of another dataset, not a start for the path"
    )
    spec_class = SegmentsSpec
    artefacts: ClassVar[list[str]] = [
        "segments.json",
        "cv_path.parquet",
        "cv_path.csv",
        "creatives.parquet",
        "model",
        "plots",
    ]

    def report_iterations(self, spec: SegmentsSpec) -> int:
        return spec.model.path_steps

    # -- simulate ---------------------------------------------------------------------
    def simulation(self, spec: SegmentsSpec):
        from distributed_hte.simulate import segments as sim

        return spec.simulate.config(), sim.simulate_segments

    # -- check / prepare ----------------------------------------------------------------
    def requirements(self, spec: SegmentsSpec) -> list[ColumnRequirement]:
        d = spec.data
        return [
            ColumnRequirement(d.segment, "data.segment", "id"),
            ColumnRequirement(d.creative, "data.creative", "id"),
            ColumnRequirement(d.label, "data.label", "binary"),
            *[ColumnRequirement(c, "data.features", "numeric") for c in spec.feature_columns()],
        ]

    def prepare(self, spec: SegmentsSpec) -> SegmentsPrepared:
        d = spec.data
        assert d.path is not None
        req = self.requirements(spec)
        summary = check_schema(d.path, req)
        features = spec.feature_columns()
        fields = {r.name: r.field for r in req}
        ds = read_parquet(d.path, [d.segment, d.creative, d.label, *features])
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
        from distributed_hte.kinds.segments.plugin import creative_block

        d = spec.data
        parts = ds.map_batches(
            creative_block,
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
        """``truth.json`` named by the spec or written by this project's simulator, checked."""
        d = spec.data
        assert d.path is not None
        truth, path = read_truth_json(d.truth, d.path, self.name, TRUTH_KEYS)
        if truth is None:
            return None
        absent = [f for f in truth["features"] if f not in spec.feature_columns()]
        if absent:
            raise truth_error(
                "data.truth", path, f"names features {absent[:5]} that data.features does not list"
            )
        return truth

    def make_encoder(self, spec: SegmentsSpec, prepared: SegmentsPrepared):
        from distributed_hte.train.segments_worker import SegmentsEncoder

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
            # glmnet's convention: standardize=false still centres (the intercepts absorb it).
            scale=np.array(
                [prof.moments[c].std if spec.model.standardize else 1.0 for c in features]
            ),
            n_folds=spec.cv.folds,
            fold_key=[d.segment, d.creative, d.label, *features],
        )

    # -- fit --------------------------------------------------------------------------
    def fit(
        self,
        spec: SegmentsSpec,
        prepared: SegmentsPrepared,
        run: RunDir,
        callbacks: list | None = None,
    ) -> None:
        import torch
        from ray.train import FailureConfig, RunConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from distributed_hte.estimators.segments import segment_intercepts, select_on_path
        from distributed_hte.kinds.segments.plugin import SegmentsModel
        from distributed_hte.train.segments_worker import (
            RESULT_FILE,
            exact_split_config,
            segments_worker,
        )
        from distributed_hte.train.trainer import cpus_per_worker, scaling_config

        enc = self.make_encoder(spec, prepared)
        ds = read_parquet(prepared.path, [enc.segment, enc.creative, enc.label, *enc.features])
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
                "model": spec.model.model_dump(exclude={"standardize"}),
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
                # A dead worker restarts the whole λ path: the solver checkpoints only
                # its final result (a λ step's state lives in every replica's memory, and
                # the path is minutes on data that fits the workers), so there is no
                # completed-λ checkpoint to resume from.
                failure_config=FailureConfig(max_failures=spec.scaling.max_failures),
                callbacks=callbacks or None,
                worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads)}},
            ),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("the solver finished without a result checkpoint")
        with result.checkpoint.as_directory() as d:
            sol = torch.load(Path(d) / RESULT_FILE, map_location="cpu", weights_only=True)
        sol["seconds"] = time.perf_counter() - t0
        chosen = select_on_path(pd.DataFrame(sol["path"]), spec.cv.select)
        picked = sol["refit_path"][chosen]
        c = picked["c"].double().numpy()
        layout = enc.layout()
        a = segment_intercepts(c, layout.segment_of.numpy(), layout.n_segments)
        model = SegmentsModel(
            enc, a, picked["gamma"].double().numpy(), c, picked["delta"].double().numpy()
        )
        save_bundle(
            run.path,
            self.name,
            spec,
            {**model.config(), "path_step": chosen},
            {
                "arrays.npz": model.save_arrays,
                SOLUTION_FILE: lambda p: torch.save(sol, p),
            },
        )

    # -- evaluate ---------------------------------------------------------------------
    def evaluate(
        self, bundle: ModelBundle, data_path: str, rows: RowFilter | None = None
    ) -> dict[str, Any]:
        """Log loss and accuracy of each person's creative model; segment shares."""
        from distributed_hte.kinds.segments.plugin import SegmentsModel, evaluation_batch

        model = SegmentsModel.from_bundle(bundle)
        enc = model.encoder
        cols = [enc.segment, enc.creative, enc.label, *enc.features]
        if rows is not None and rows.column not in cols:
            cols.append(rows.column)
        s = batch_sums(data_path, cols, evaluation_batch, model=model, rows=rows)
        n_known = max(s.get("n_known", 0.0), 1.0)
        return {
            "n": int(s.get("n", 0)),
            "n_known_creative": int(s.get("n_known", 0)),
            "log_loss": s.get("log_loss_sum", 0.0) / n_known,
            "accuracy": s.get("correct", 0.0) / n_known,
            "segment_shares": {
                str(name): s.get(f"assigned:{j}", 0.0) / max(s.get("n", 0.0), 1.0)
                for j, name in enumerate(enc.segment_vocab)
            },
        }

    # -- report -----------------------------------------------------------------------
    def report(
        self, spec: SegmentsSpec, prepared: SegmentsPrepared, run: RunDir, bundle: ModelBundle
    ) -> dict[str, Any]:
        from distributed_hte.kinds.segments import report as rep
        from distributed_hte.kinds.segments.plugin import SegmentsModel

        sol = _load_solution(bundle)
        model = SegmentsModel.from_bundle(bundle)
        chosen = int(bundle.config["path_step"])
        path = pd.DataFrame(sol["path"])
        info = sol["refit_path"][chosen]["info"]
        step = path.iloc[chosen].to_dict()
        table = rep.creatives_table(model, prepared.creatives)
        table.to_parquet(run.file("creatives.parquet"), index=False)
        if prepared.truth is not None:
            path = pd.concat([path, self._path_recovery(prepared, model, sol)], axis=1)
        path["selected"] = np.arange(len(path)) == chosen
        path.to_parquet(run.file("cv_path.parquet"), index=False)
        path.to_csv(run.file("cv_path.csv"), index=False)
        final = sol["metrics"]
        out = rep.segments_json(spec, model, table, info, sol["lam_max"], step)
        out["selection"] = {"rule": spec.cv.select, "path_step": chosen + 1}
        write_json(run.file("segments.json"), out)

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
                "seconds": sol["seconds"],
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
                "assignment_accuracy": self._assignment_accuracy(prepared, model),
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
        rep.plots(spec, model, table, path, run)
        return metrics

    def _path_recovery(self, prepared: SegmentsPrepared, model, sol: dict) -> pd.DataFrame:
        from distributed_hte.estimators.segments import path_recovery
        from distributed_hte.simulate import segments as sim

        enc = model.encoder
        V = len(enc.creative_vocab)
        pairs = [
            (str(enc.segment_vocab[key // V]), _plain(enc.creative_vocab[key % V]))
            for key in enc.pair_keys
        ]
        return path_recovery(
            sim.world_from_truth(prepared.truth),
            enc.segment_vocab,
            enc.features,
            pairs,
            [s["gamma"].numpy() for s in sol["refit_path"]],
            [s["delta"].numpy() for s in sol["refit_path"]],
        )

    def _assignment_accuracy(self, prepared: SegmentsPrepared, model) -> float:
        """Share of people whose estimated segment is their true one (a Ray Data pass)."""
        from distributed_hte.kinds.segments.plugin import assignment_sums_batch

        truth = prepared.truth
        assert truth is not None
        features = list(dict.fromkeys(model.encoder.features + list(truth["features"])))
        s = batch_sums(prepared.path, features, assignment_sums_batch, model=model, truth=truth)
        return s.get("agree", 0.0) / max(s.get("n", 0.0), 1.0)

    def after_sweep(self, spec: SegmentsSpec, run: RunDir, table: pd.DataFrame) -> None:
        from distributed_hte.kinds.segments.report import sweep_tables

        sweep_tables(spec, run, table)

    # -- predict ----------------------------------------------------------------------
    def predict(self, run_dir: Path, data_path: str, out_path: Path) -> dict[str, Any]:
        from distributed_hte.kinds.segments.plugin import SegmentsModel, predict_batch

        model = SegmentsModel.from_bundle(load_bundle(run_dir, self.name))
        enc = model.encoder
        schema = check_schema(
            data_path, [ColumnRequirement(c, "data.features", "numeric") for c in enc.features]
        ).schema
        keep = [c for c in schema.names if c not in enc.features]
        scored = read_parquet(data_path, schema.names).map_batches(
            predict_batch,
            fn_kwargs={"model": model, "keep": keep},
            batch_format="numpy",
            batch_size=65_536,
        )
        return write_predictions(scored, out_path)


def _load_solution(bundle: ModelBundle) -> dict[str, Any]:
    import torch

    return torch.load(bundle.path("solution"), map_location="cpu", weights_only=True)


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


KIND = SegmentsKind
