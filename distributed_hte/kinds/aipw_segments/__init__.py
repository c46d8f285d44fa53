"""Kind ``aipw_segments``: segment-level doubly robust (AIPW) effects, cross-fitted, out of core.

prepare: schema and value checks, stratified fold cuts, segment levels and exact
quantile cuts (one streaming pass), then per-fold preprocessing fitted on the other
folds' rows (a second pass). fit: one Ray Train run of every fold's propensity and
outcome models (exact penalised Newton, all folds and models in the same data passes)
→ model bundle. evaluate: one Ray Data pass of out-of-fold ê, μ̂1, μ̂0, clipped AIPW
scores and per-segment sums (rows are never collected). report: ``effects.json``,
``segment_effects.csv``/``.parquet`` with pointwise and joint bands and adjusted
p-values, ``segments_filtered.csv``, ``nuisance_metrics.csv``, ``overlap.csv``, plots,
and ``scores.parquet`` with ``outputs.scores``. See :mod:`distributed_hte.estimators.aipw`.
"""

from __future__ import annotations

import logging
import pickle
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from distributed_hte.data.schema import ColumnRequirement, check_schema
from distributed_hte.errors import DataError
from distributed_hte.kinds import Kind
from distributed_hte.kinds.aipw_segments.plugin import (
    MAX_QUANTILE_VALUES,
    MEDIAN_BINS,
    RESULT_FILE,
    Design,
    FoldEncoder,
    SegmentRule,
    fold_stats_block,
    merge_pickled,
    scan_block,
    score_block,
    score_rows,
)
from distributed_hte.kinds.aipw_segments.spec import AipwSegmentsSpec
from distributed_hte.kinds.toolkit import (
    ModelBundle,
    RowFilter,
    load_bundle,
    read_parquet,
    read_truth_json,
    save_bundle,
    write_predictions,
)
from distributed_hte.rundir import RunDir, write_json
from distributed_hte.simulate.marker import read_simulation_marker

log = logging.getLogger(__name__)


@dataclass
class AipwPrepared:
    path: str
    n_rows: int
    n_treated: int
    design: Design
    tau: str | None  # true-effect column (simulated data or named by the spec)
    truth: dict | None  # truth.json (population truth)
    fold_rows: list[list[int]]  # [fold][arm] rows
    prepare_seconds: float
    fold_stats: dict[str, Any]  # per-fold sums of the preprocessing pass
    lo: np.ndarray  # per numeric feature: minimum and maximum (median histograms)
    hi: np.ndarray

    def design_for(self, spec: AipwSegmentsSpec) -> Design:
        """The design with the nuisance section of ``spec`` (a Tune trial may change it)."""
        n = spec.nuisance
        return replace(
            self.design,
            outcome_model=n.outcome_model,
            encoders=fit_encoders(
                self.fold_stats, self.lo, self.hi, n.min_frequency, self.design.n_folds
            ),
        )


class AipwSegmentsKind(Kind):
    name = "aipw_segments"
    spec_class = AipwSegmentsSpec
    artefacts: ClassVar[list[str]] = [
        "effects.json",
        "segment_effects.csv",
        "segment_effects.parquet",
        "segments_filtered.csv",
        "nuisance_metrics.csv",
        "overlap.csv",
        "model",
        "plots",
    ]

    def report_iterations(self, spec: AipwSegmentsSpec) -> int:
        return 1

    # -- simulate ---------------------------------------------------------------------
    def simulation(self, spec: AipwSegmentsSpec):
        from distributed_hte.simulate import aipw_segments as sim

        return spec.simulate.config(), sim.simulate_aipw_segments

    # -- check / prepare ----------------------------------------------------------------
    def requirements(self, spec: AipwSegmentsSpec) -> list[ColumnRequirement]:
        d = spec.data
        req = [
            ColumnRequirement(d.key, "data.key", "id"),
            ColumnRequirement(d.treatment, "data.treatment", "binary"),
            ColumnRequirement(d.outcome, "data.outcome", "numeric"),
        ]
        if d.fold:
            req.append(ColumnRequirement(d.fold, "data.fold", "numeric"))
        return req

    def check(self, spec: AipwSegmentsSpec) -> None:
        assert spec.data.path is not None
        summary = check_schema(spec.data.path, self.requirements(spec))
        self._check_other_columns(spec, summary.schema)

    def _check_other_columns(self, spec: AipwSegmentsSpec, schema: pa.Schema) -> None:
        """Features and segment columns: present and typed (nulls are imputed, not errors)."""
        names = schema.names
        cols = [(c, "data.numeric_features", True) for c in spec.numeric_features()]
        cols += [(c, "data.categorical_features", False) for c in spec.categorical_features()]
        cols += [(s.column, "segments", s.kind_of() != "values") for s in spec.segments]
        for c, field, numeric in cols:
            if c not in names:
                raise DataError(
                    f"the dataset at {spec.data.path} has no column {c!r} (named by {field}); "
                    f"its columns are: {', '.join(names)}"
                )
            t = schema.field(c).type
            if numeric and not (
                pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
            ):
                raise DataError(
                    f"column {c!r} (named by {field}) has type {t}; it must be numeric"
                    + (" (bins and quantiles cut numbers)" if field == "segments" else "")
                )

    def prepare(self, spec: AipwSegmentsSpec) -> AipwPrepared:
        t0 = time.perf_counter()
        d, e = spec.data, spec.estimate
        assert d.path is not None
        summary = check_schema(d.path, self.requirements(spec))
        self._check_other_columns(spec, summary.schema)
        numeric, categorical = spec.numeric_features(), spec.categorical_features()
        tau = self._tau_column(spec, summary.schema)
        seg_values = [s.column for s in spec.segments if s.kind_of() == "values"]
        seg_numeric = [s.column for s in spec.segments if s.kind_of() != "values"]
        bins = {s.column: list(s.bins) for s in spec.segments if s.bins is not None}
        columns = list(
            dict.fromkeys(
                [d.key, d.treatment, d.outcome, *numeric, *categorical, *seg_values, *seg_numeric]
                + ([d.fold] if d.fold else [])
            )
        )
        rows = (
            read_parquet(d.path, columns)
            .map_batches(
                scan_block,
                batch_format="pyarrow",
                batch_size=None,
                fn_kwargs={
                    "key": d.key,
                    "treatment": d.treatment,
                    "outcome": d.outcome,
                    "numeric": numeric,
                    "categorical": categorical,
                    "fold_column": d.fold,
                    "n_folds": e.folds,
                    "fold_salt": e.fold_salt,
                    "segment_values": seg_values,
                    "segment_numeric": seg_numeric,
                    "bins": bins,
                },
            )
            .take_all()
        )
        scan = [pickle.loads(r["summary"]) for r in rows]
        n = sum(s["n"] for s in scan)
        if n == 0:
            raise DataError(f"the dataset at {d.path} is empty (0 rows); nothing to estimate")
        self._check_values(spec, scan, n)
        check_unique_key(d.path, d.key, n)
        n_t = int(sum(s["n_t"] for s in scan))
        link = "logit" if sum(s["y_nonbinary"] for s in scan) == 0 else "identity"
        cuts = None
        if not d.fold:
            from distributed_hte.estimators.crossfit import stratified_cuts

            cuts = stratified_cuts(sum(s["unit_hist"] for s in scan), e.folds)
        segments = [self._segment_rule(spec, s, scan, link) for s in spec.segments]
        design = Design(
            key=d.key,
            treatment=d.treatment,
            outcome=d.outcome,
            numeric=numeric,
            categorical=categorical,
            n_folds=e.folds,
            fold_salt=e.fold_salt,
            fold_cuts=cuts,
            fold_column=d.fold,
            encoders=[],
            outcome_model=spec.nuisance.outcome_model,
            link=link,
            segments=segments,
        )
        lo = np.array([min(s["num_lo"][c] for s in scan) for c in numeric])
        hi = np.array([max(s["num_hi"][c] for s in scan) for c in numeric])
        stats = merge_pickled(
            read_parquet(d.path, design.columns())
            .map_batches(
                fold_stats_block,
                batch_format="numpy",
                batch_size=65_536,
                fn_kwargs={"design": design, "lo": lo, "hi": hi},
            )
            .take_all(),
            "stats",
        )
        design.encoders = fit_encoders(stats, lo, hi, spec.nuisance.min_frequency, e.folds)
        fold_rows = [
            [int(stats["n"][k] - stats["t"][k]), int(stats["t"][k])] for k in range(e.folds)
        ]
        for k, (nc, nt) in enumerate(fold_rows):
            if nt == 0 or nc == 0:
                raise DataError(
                    f"fold {k} has {nt} treated and {nc} control rows; every fold needs both "
                    "(fewer estimate.folds, or more data)"
                )
        truth = self._truth(spec)
        log.info(
            "[prepare] %s: %d rows (%d treated), %d folds, %s outcome, %d segmentation(s)",
            d.path,
            n,
            n_t,
            e.folds,
            "binary" if link == "logit" else "continuous",
            len(segments),
        )
        seconds = time.perf_counter() - t0
        return AipwPrepared(d.path, n, n_t, design, tau, truth, fold_rows, seconds, stats, lo, hi)

    def _check_values(self, spec: AipwSegmentsSpec, scan: list[dict], n: int) -> None:
        d = spec.data
        bad = sum(s["t_bad"] for s in scan)
        if bad:
            ex = next(s["t_bad_example"] for s in scan if s["t_bad"])
            raise DataError(
                f"column {d.treatment!r} (named by data.treatment) must hold only 0 and 1; "
                f"{bad} row(s) hold other values, e.g. {ex:g}"
            )
        n_t = sum(s["n_t"] for s in scan)
        if n_t == 0 or n_t == n:
            which = "treated" if n_t == 0 else "control"
            raise DataError(
                f"column {d.treatment!r} (named by data.treatment) has no {which} rows "
                f"among {n}; effects need both arms"
            )
        y_nan = sum(s["y_nan"] for s in scan)
        if y_nan:
            raise DataError(
                f"column {d.outcome!r} (named by data.outcome) has {y_nan} NaN or infinite "
                "value(s); fill or drop those rows before estimating"
            )
        for c in spec.numeric_features():
            inf = sum(s["num_nonfinite"][c] for s in scan)
            if inf:
                raise DataError(
                    f"column {c!r} (named by data.numeric_features) has {inf} infinite value(s); "
                    "NaN is imputed with the training median, infinity is not"
                )
            if sum(s["num_nan"][c] for s in scan) == n:
                raise DataError(
                    f"column {c!r} (named by data.numeric_features) holds no values (all NaN)"
                )
        if d.fold:
            bad = sum(s["fold_bad"] for s in scan)
            if bad:
                raise DataError(
                    f"column {d.fold!r} (named by data.fold) must hold folds 0..{spec.estimate.folds - 1}; "
                    f"{bad} row(s) do not"
                )
        for seg in spec.segments:
            if seg.kind_of() == "values":
                continue
            info = [s["seg_numeric"][seg.column] for s in scan]
            nan = sum(i["nan"] for i in info)
            if nan:
                raise DataError(
                    f"segments: column {seg.column!r} has {nan} null/NaN value(s), which no "
                    "bin or quantile holds; fill them or segment by another column"
                )
            if seg.bins is not None:
                out = sum(i["outside"] for i in info)
                if out:
                    ex = next(i["example"] for i in info if i["outside"])
                    raise DataError(
                        f"segments: the bins of {seg.column!r} ({seg.bins[0]:g} to {seg.bins[-1]:g}, "
                        f"right-closed) leave {out} row(s) outside every bin, e.g. value {ex:g}; "
                        "widen the first or last edge (.inf is allowed)"
                    )

    def _segment_rule(
        self, spec: AipwSegmentsSpec, seg, scan: list[dict], link: str
    ) -> SegmentRule:
        e = spec.estimate
        limits = {
            "min_rows": seg.min_rows if seg.min_rows is not None else e.min_rows,
            "min_treated": seg.min_treated if seg.min_treated is not None else e.min_treated,
            "min_control": seg.min_control if seg.min_control is not None else e.min_control,
        }
        if link == "logit":  # expected events mean something for a binary outcome only
            for f in ("min_treated_events", "min_control_events"):
                own = getattr(seg, f)
                limits[f] = float(own if own is not None else getattr(e, f))
        kind = seg.kind_of()
        if kind == "values":
            levels = sorted({v for s in scan for v in s["seg_values"][seg.column]})
            labels = tuple("(missing)" if v == "" else v for v in levels)
            return SegmentRule(seg.column, "values", labels, levels=tuple(levels), **limits)
        if kind == "bins":
            edges = tuple(float(b) for b in seg.bins)
            labels = (
                tuple(seg.labels)
                if seg.labels
                else tuple(
                    f"({_num(a)}, {_num(b)}]" for a, b in zip(edges, edges[1:], strict=False)
                )
            )
            return SegmentRule(seg.column, "bins", labels, edges=edges, **limits)
        vals = np.concatenate([s["seg_numeric"][seg.column]["values"] for s in scan])
        cnts = np.concatenate([s["seg_numeric"][seg.column]["counts"] for s in scan])
        values, inv = np.unique(vals, return_inverse=True)
        if len(values) > MAX_QUANTILE_VALUES:
            raise DataError(
                f"segments: column {seg.column!r} has {len(values)} distinct values; exact "
                f"quantiles count at most {MAX_QUANTILE_VALUES}. Give bins instead"
            )
        counts = np.bincount(inv, weights=cnts)
        from distributed_hte.estimators.aipw import quantile_cuts

        cuts = quantile_cuts(values, counts, seg.quantiles)
        which = np.searchsorted(cuts, values, side="left")
        labels = []
        for j in range(len(cuts) + 1):
            inside = values[which == j]
            labels.append(f"Q{j + 1} [{_num(inside.min())}, {_num(inside.max())}]")
        return SegmentRule(
            seg.column, "quantiles", tuple(labels), edges=tuple(cuts.tolist()), **limits
        )

    def _tau_column(self, spec: AipwSegmentsSpec, schema: pa.Schema) -> str | None:
        d = spec.data
        assert d.path is not None
        if d.tau_true:
            if d.tau_true not in schema.names:
                raise DataError(f"data.tau_true names column {d.tau_true!r}, which the data lacks")
            return d.tau_true
        if read_simulation_marker(d.path, self.name) is not None and "tau_true" in schema.names:
            return "tau_true"
        return None

    def _truth(self, spec: AipwSegmentsSpec) -> dict | None:
        d = spec.data
        assert d.path is not None
        return read_truth_json(d.truth, d.path, self.name, ("ate", "segments"))[0]

    # -- fit --------------------------------------------------------------------------
    def fit(
        self,
        spec: AipwSegmentsSpec,
        prepared: AipwPrepared,
        run: RunDir,
        callbacks: list | None = None,
    ) -> None:
        from ray.train import FailureConfig, RunConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from distributed_hte.kinds.aipw_segments.plugin import nuisance_worker
        from distributed_hte.train.segments_worker import exact_split_config
        from distributed_hte.train.trainer import scaling_config

        design = prepared.design_for(spec)
        workers = spec.scaling.num_workers
        # a cached row: float64 features, t, y, fold, and each category as unicode text
        # (4 bytes a character; 32 characters assumed)
        row_bytes = 8 * (len(design.numeric) + 3) + 128 * len(design.categorical)
        t0 = time.perf_counter()
        trainer = TorchTrainer(
            nuisance_worker,
            train_loop_config={
                "design": design,
                "C": spec.nuisance.C,
                "tol": spec.nuisance.tol,
                "max_iter": spec.nuisance.max_iter,
                "cache_gb": spec.nuisance.cache_gb,
                "shard_bytes": prepared.n_rows / workers * row_bytes,
                "log_every_s": spec.train.log_every_s,
            },
            scaling_config=scaling_config(spec),
            torch_config=TorchConfig(backend="gloo"),
            datasets={"train": read_parquet(prepared.path, design.columns())},
            dataset_config=exact_split_config(),
            run_config=RunConfig(
                name="nuisance",
                storage_path=str(run.path.resolve()),
                failure_config=FailureConfig(max_failures=0),
                callbacks=callbacks or None,
                worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
            ),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("the nuisance fit finished without a result checkpoint")
        with result.checkpoint.as_directory() as ckpt, np.load(Path(ckpt) / RESULT_FILE) as z:
            arrays = {k: z[k] for k in z.files}
        info = pickle.loads(arrays.pop("info").tobytes())
        info["fit_seconds"] = time.perf_counter() - t0
        info["num_workers"] = workers
        if not info["converged"]:
            log.warning(
                "[fit] WARNING: the nuisance models did not converge in %d Newton passes "
                "(max |gradient|/rows %.3g); raise nuisance.max_iter",
                info["iterations"],
                info["max_scaled_gradient"],
            )
        save_bundle(
            run.path,
            self.name,
            spec,
            {
                "design": design_config(design),
                "clip": spec.estimate.clip,
                "level": spec.estimate.level,
                "fit": {k: v for k, v in info.items() if k not in ("objective", "n")},
                "models": {
                    k: {"objective": info["objective"][k], "rows": info["n"][k]}
                    for k in info["objective"]
                },
            },
            {"coefficients.npz": lambda p: _save_npz(p, {**arrays, **design_arrays(design)})},
        )

    # -- evaluate ---------------------------------------------------------------------
    def sums(
        self,
        bundle: ModelBundle,
        data_path: str,
        rows: RowFilter | None = None,
        tau: str | None = None,
    ) -> dict[str, Any]:
        """One scoring pass: the merged per-segment sums, overlap and metric histograms."""
        design, betas = load_model(bundle)
        cols = design.columns() + [s.column for s in design.segments]
        if tau:
            cols.append(tau)
        if rows is not None:
            cols.append(rows.column)
        cols = list(dict.fromkeys(cols))
        return merge_pickled(
            read_parquet(data_path, cols)
            .map_batches(
                score_block,
                batch_format="numpy",
                batch_size=65_536,
                fn_kwargs={
                    "design": design,
                    "betas": betas,
                    "clip": float(bundle.config["clip"]),
                    "tau": tau,
                    "rows": rows,
                },
            )
            .take_all(),
            "sums",
        )

    def evaluate(
        self, bundle: ModelBundle, data_path: str, rows: RowFilter | None = None
    ) -> dict[str, Any]:
        """Global AIPW estimate, its SE, and the nuisance models' log losses on ``data_path``."""
        from distributed_hte.kinds.aipw_segments.report import global_effects, nuisance_table

        s = self.sums(bundle, data_path, rows)
        design, _ = load_model(bundle)
        out = global_effects(s["global"], float(bundle.config["level"]))
        table = nuisance_table(s["metrics"], design.n_folds)
        out["propensity_log_loss"] = float(
            table.loc[table.model == "propensity", "log_loss"].mean()
        )
        out["outcome_log_loss"] = float(table.loc[table.model == "outcome", "log_loss"].mean())
        return out

    # -- report -----------------------------------------------------------------------
    def report(
        self, spec: AipwSegmentsSpec, prepared: AipwPrepared, run: RunDir, bundle: ModelBundle
    ) -> dict[str, Any]:
        from distributed_hte.kinds.aipw_segments import report as rep

        t0 = time.perf_counter()
        s = self.sums(bundle, prepared.path, tau=prepared.tau)
        design, betas = load_model(bundle)
        level = spec.estimate.level
        effects = rep.global_effects(s["global"], level)
        naive = rep.naive_effect(s["global"])
        table, filtered, per_seg = rep.segment_tables(design.segments, s["segments"], level)
        table.to_csv(run.file("segment_effects.csv"), index=False)
        table.to_parquet(run.file("segment_effects.parquet"), index=False)
        filtered.to_csv(run.file("segments_filtered.csv"), index=False)
        metrics_table = rep.nuisance_table(s["metrics"], design.n_folds)
        metrics_table.to_csv(run.file("nuisance_metrics.csv"), index=False)
        overlap = rep.overlap_table(s["overlap"])
        overlap.to_csv(run.file("overlap.csv"), index=False)
        g = s["global"]
        out = {
            "global": {**effects, "rows": int(g[0]), "treated_rows": int(g[1])},
            "naive": naive,
            "segmentations": per_seg,
            "overlap": {
                "clip": spec.estimate.clip,
                "share_clipped": float(g[8] / g[0]),
                "mean_propensity_treated": float(g[9] / max(g[1], 1)),
                "mean_propensity_control": float(g[10] / max(g[0] - g[1], 1)),
            },
            "folds": {
                "n_folds": design.n_folds,
                "assignment": "data.fold column"
                if design.fold_column
                else "hash of data.key, stratified by treatment",
                "rows_by_fold_and_arm": prepared.fold_rows,
            },
        }
        truth_metrics = None
        if prepared.tau is not None or prepared.truth is not None:
            truth_metrics = rep.truth_recovery(prepared.truth, s, table, effects, design)
            out["truth"] = truth_metrics
        write_json(run.file("effects.json"), out)
        if spec.outputs.scores:
            self._write_scores(spec, prepared, bundle, run)
        rep.plots(table, overlap, run)
        fit = bundle.config["fit"]
        metrics: dict[str, Any] = {
            # out-of-fold nuisance loss (log loss; squared error for a continuous outcome)
            "val_loss": float(fit["val_loss"]),
            "global": out["global"],
            "naive": naive,
            "nuisance": {
                "propensity_auc": float(
                    metrics_table.loc[metrics_table.model == "propensity", "roc_auc"].mean()
                ),
                "outcome_log_loss": float(
                    metrics_table.loc[metrics_table.model == "outcome", "log_loss"].mean()
                ),
                "newton_passes": int(fit["iterations"]),
                "converged": bool(fit["converged"]),
                "fit_seconds": float(fit["fit_seconds"]),
                "num_workers": int(fit["num_workers"]),
            },
            "segments_reported": len(table),
            "segments_filtered": len(filtered),
            "report_seconds": time.perf_counter() - t0,
        }
        if truth_metrics:
            metrics["truth"] = truth_metrics
        write_json(run.file("metrics.json"), metrics)
        return metrics

    def _write_scores(
        self, spec: AipwSegmentsSpec, prepared: AipwPrepared, bundle: ModelBundle, run: RunDir
    ) -> None:
        import shutil

        design, betas = load_model(bundle)
        target = run.file("scores.parquet")
        if target.exists():
            shutil.rmtree(target)
        write_predictions(
            read_parquet(prepared.path, design.columns()).map_batches(
                score_rows,
                batch_format="numpy",
                batch_size=65_536,
                fn_kwargs={"design": design, "betas": betas, "clip": spec.estimate.clip},
            ),
            target,
        )

    # -- predict ----------------------------------------------------------------------
    def predict(self, run_dir: Path, data_path: str, out_path: Path) -> dict[str, Any]:
        """Per-row out-of-fold ê, μ̂1, μ̂0 and AIPW score of ``data_path`` (its rows need the
        key, treatment, outcome and features; each row's fold comes from its key)."""
        bundle = load_bundle(run_dir, self.name)
        design, betas = load_model(bundle)
        check_schema(
            data_path,
            [ColumnRequirement(c, "data", "numeric") for c in (design.treatment, design.outcome)]
            + [ColumnRequirement(design.key, "data.key", "id")],
        )
        scored = read_parquet(data_path, design.columns()).map_batches(
            score_rows,
            batch_format="numpy",
            batch_size=65_536,
            fn_kwargs={"design": design, "betas": betas, "clip": float(bundle.config["clip"])},
        )
        return write_predictions(scored, out_path)


# Up to this many rows the key column is checked in the driver (8 bytes a row: 40 MB);
# above it by a Ray Data shuffle, in partitions of this many rows.
KEY_CHECK_IN_DRIVER_ROWS = 5_000_000


def check_unique_key(path: str, key: str, n_rows: int, examples: int = 3) -> None:
    """``data.key`` must identify rows: its hash places a row in its fold, and per-row
    scores are keyed by it. A duplicated key would put copies of a row in one fold and
    make ``scores.parquet`` ambiguous, so it is an error (exit 2). Exact either way: a
    small table's key column is counted in the driver (pyarrow ``value_counts``); a large
    one by Ray Data's hash-shuffled ``groupby(key).count()`` (the key column only, in
    partitions of ``KEY_CHECK_IN_DRIVER_ROWS`` rows), so memory stays flat in rows. The
    shuffle costs tens of seconds even for a few rows, hence the driver path."""
    if n_rows <= KEY_CHECK_IN_DRIVER_ROWS:
        import pyarrow.compute as pc

        from distributed_hte.data.schema import open_dataset

        column = open_dataset(path).to_table(columns=[key]).column(key)
        counts = pc.value_counts(column)
        values, n = counts.field("values"), counts.field("counts")
        repeated = pc.filter(values, pc.greater(n, 1))
        dup = [
            {key: v, "count()": c}
            for v, c in zip(
                repeated.to_pylist()[:examples],
                pc.filter(n, pc.greater(n, 1)).to_pylist()[:examples],
                strict=True,
            )
        ]
    else:
        partitions = -(-n_rows // KEY_CHECK_IN_DRIVER_ROWS)
        counts = read_parquet(path, [key]).groupby(key, num_partitions=partitions).count()
        dup = counts.filter(lambda row: row["count()"] > 1).take(examples)
    if dup:
        shown = ", ".join(f"{row[key]!r} ({row['count()']} rows)" for row in dup)
        raise DataError(
            f"column {key!r} (named by data.key) must identify rows, but some values repeat, "
            f"e.g. {shown}; deduplicate the rows, or name a unique column as data.key"
        )


def _num(x: float) -> str:
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    return f"{x:g}"


# ----------------------------------------------------------------------------- preprocessing


def fit_encoders(
    stats: dict[str, Any], lo: np.ndarray, hi: np.ndarray, min_frequency: int, n_folds: int
) -> list[FoldEncoder]:
    """Fold k's preprocessing from the other folds' sums (``total − fold k``).

    Medians come from a ``MEDIAN_BINS``-bin histogram between the column's minimum and
    maximum: exact for integer columns whose range is under ``MEDIAN_BINS``, otherwise
    within one bin width ((max − min) / MEDIAN_BINS) of the exact median.
    """
    out = []
    width = np.where(hi > lo, hi - lo, 1.0)
    for k in range(n_folds):
        other = [j for j in range(n_folds) if j != k]
        n = float(stats["n"][other].sum())
        cnt = stats["cnt"][other].sum(axis=0)
        s = stats["sum"][other].sum(axis=0)
        ss = stats["ssq"][other].sum(axis=0)
        hist = stats["hist"][other].sum(axis=0)  # (p, bins)
        med = np.zeros(len(lo))
        for j in range(len(lo)):
            cum = np.cumsum(hist[j])
            b = int(np.searchsorted(cum, cum[-1] / 2.0, side="left"))
            med[j] = lo[j] + (b + 0.5) * width[j] / MEDIAN_BINS
            if hi[j] - lo[j] < MEDIAN_BINS and float(lo[j]).is_integer():
                # integer column: a bin narrower than 1 holds one value, the first integer
                # at or above the bin's lower edge (exact medians)
                med[j] = np.ceil(lo[j] + b * width[j] / MEDIAN_BINS - 1e-9)
        missing = n - cnt
        mean = (s + missing * med) / n
        var = (ss + missing * med**2) / n - mean**2
        scale = np.sqrt(np.maximum(var, 0.0))
        scale = np.where(scale < 1e-12 * np.maximum(np.abs(mean), 1.0), 1.0, scale)
        t = float(stats["t"][other].sum())
        t_mean = t / n
        t_scale = float(np.sqrt(max(t_mean - t_mean**2, 0.0))) or 1.0
        levels, infrequent, fill = [], [], []
        for counts in stats["levels"]:
            train = {v: float(c[other].sum()) for v, c in counts.items() if v != ""}
            frequent = sorted(v for v, c in train.items() if c >= min_frequency)
            levels.append(np.asarray(frequent, dtype=str))
            infrequent.append(any(0 < c < min_frequency for c in train.values()))
            fill.append(max(sorted(train), key=lambda v: train[v]) if train else "")
        out.append(FoldEncoder(med, mean, scale, t_mean, t_scale, levels, infrequent, fill))
    return out


def design_config(design: Design) -> dict[str, Any]:
    """The JSON part of a design (arrays go to the bundle's npz)."""
    return {
        "key": design.key,
        "treatment": design.treatment,
        "outcome": design.outcome,
        "numeric": design.numeric,
        "categorical": design.categorical,
        "n_folds": design.n_folds,
        "fold_salt": design.fold_salt,
        "fold_column": design.fold_column,
        "outcome_model": design.outcome_model,
        "link": design.link,
        "segments": [asdict(s) for s in design.segments],
        "encoders": [
            {
                "t_mean": e.t_mean,
                "t_scale": e.t_scale,
                "levels": [lv.tolist() for lv in e.levels],
                "infrequent": e.infrequent,
                "fill": e.fill,
            }
            for e in design.encoders
        ],
    }


def design_arrays(design: Design) -> dict[str, np.ndarray]:
    out = {}
    for k, e in enumerate(design.encoders):
        out[f"median:{k}"], out[f"mean:{k}"], out[f"scale:{k}"] = e.median, e.mean, e.scale
    if design.fold_cuts is not None:
        out["fold_cuts"] = design.fold_cuts
    return out


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def load_model(bundle: ModelBundle) -> tuple[Design, dict[tuple[str, int], np.ndarray]]:
    """The design and the coefficients ``{(role, fold): β}`` of a bundle."""
    c = bundle.config["design"]
    with np.load(bundle.path("coefficients"), allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    encoders = [
        FoldEncoder(
            a[f"median:{k}"], a[f"mean:{k}"], a[f"scale:{k}"], e["t_mean"], e["t_scale"],
            [np.asarray(lv, dtype=str) for lv in e["levels"]], list(e["infrequent"]), list(e["fill"]),
        )
        for k, e in enumerate(c["encoders"])
    ]  # fmt: skip
    segments = [
        SegmentRule(**{**s, **{f: tuple(s[f]) for f in ("labels", "edges", "levels")}})
        for s in c["segments"]
    ]
    design = Design(
        key=c["key"],
        treatment=c["treatment"],
        outcome=c["outcome"],
        numeric=list(c["numeric"]),
        categorical=list(c["categorical"]),
        n_folds=int(c["n_folds"]),
        fold_salt=int(c["fold_salt"]),
        fold_cuts=a.get("fold_cuts"),
        fold_column=c["fold_column"],
        encoders=encoders,
        outcome_model=c["outcome_model"],
        link=c["link"],
        segments=segments,
    )
    betas = {}
    for name, v in a.items():
        if name.startswith("beta:"):
            _, role, k = name.split(":")
            betas[(role, int(k))] = v
    return design, betas


KIND = AipwSegmentsKind
