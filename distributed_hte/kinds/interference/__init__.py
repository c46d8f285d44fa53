"""Kind ``interference``: the global treatment effect of a ranking algorithm tested by
creator-side randomisation, with the debiased (DB) estimator and every benchmark.

prepare: check the long-format data (one row per query × item): exactly one exposure per
query, treatment constant per item, 0/1 columns, finite values; reshape to one row per
query, padded to the largest set with a mask (Ray Data ``groupby(query).map_groups``,
materialised once). fit: one Ray Train DDP run of all F cross-fitting members of the
choice, response and PDL nets (member f never sees fold f) → model bundle. evaluate /
report: one estimation pass of stateless Ray Data tasks (every query's DB influence
values with its own fold's member, plug-in and benchmark terms, written to
``influence/``) → ``estimates.json``, ``metrics.json``, a log table and a plot. See
:mod:`distributed_hte.estimators.interference`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.dataset as pads

from distributed_hte.data.profile import profile_dataset
from distributed_hte.data.schema import ColumnRequirement, check_schema
from distributed_hte.errors import DataError, SpecError
from distributed_hte.kinds import Kind, toolkit
from distributed_hte.kinds.interference.data import (
    Layout,
    flag_sums,
    item_summary,
    merge_rows,
    query_row,
    query_summary,
    split_side,
)
from distributed_hte.kinds.interference.spec import InterferenceSpec
from distributed_hte.kinds.toolkit import ModelBundle, RowFilter, read_parquet
from distributed_hte.rundir import RunDir, write_json
from distributed_hte.simulate import interference as sim

if TYPE_CHECKING:
    from distributed_hte.estimators import interference as est

log = logging.getLogger(__name__)

MAX_SUBGROUPS = 50
CACHE_BYTES = 1 << 30
# Rows per hash-shuffle partition of the groupbys (Ray's default is 200 partitions,
# which turns small data into hundreds of tiny tasks).
ROWS_PER_PARTITION = 200_000
FIT_FILE = "fit.json"


def shuffle_partitions(n_rows: int) -> int:
    """Partitions of a groupby over ``n_rows`` long rows."""
    return int(min(max(math.ceil(n_rows / ROWS_PER_PARTITION), 1), 200))


@dataclass
class InterferencePrepared:
    """Validated data, reshaped to one row per query (a materialised Ray Dataset)."""

    path: str
    queries: Any
    n_queries: int
    n_rows: int
    layout: Layout
    binary: bool
    x_mean: list[float]
    x_scale: list[float]
    z_mean: list[float]
    z_scale: list[float]
    items: int
    val_queries: int
    treated_items: int
    truth: dict | None
    prepare_seconds: float


class InterferenceKind(Kind):
    name = "interference"
    cannot_warm_start = (
        "its choice and response networks are cross-fitted per fold; starting them from a "
        "model that saw every fold would leak each fold's held-out rows into its own fit"
    )
    spec_class = InterferenceSpec
    artefacts = ["estimates.json", "influence", "history.parquet", "model", "plots"]

    # -- simulate ---------------------------------------------------------------------
    def simulation(self, spec: InterferenceSpec):
        return spec.simulate.config(), sim.simulate_interference

    # -- check / prepare --------------------------------------------------------------
    def requirements(self, spec: InterferenceSpec) -> list[ColumnRequirement]:
        d = spec.data
        req = [
            ColumnRequirement(d.query, "data.query", "id"),
            ColumnRequirement(d.item, "data.item", "id"),
            ColumnRequirement(d.treated, "data.treated", "binary"),
            ColumnRequirement(d.exposed, "data.exposed", "binary"),
        ]
        req += [ColumnRequirement(c, "data.viewer_features", "numeric") for c in d.viewer_features]
        req += [ColumnRequirement(c, "data.item_features", "numeric") for c in d.item_features]
        if d.item_subgroup:
            req.append(ColumnRequirement(d.item_subgroup, "data.item_subgroup", "id"))
        return req

    def check(self, spec: InterferenceSpec) -> None:
        assert spec.data.path is not None
        summary = check_schema(spec.data.path, self.requirements(spec))
        self._check_outcome_column(spec, summary.schema)

    @staticmethod
    def _check_outcome_column(spec: InterferenceSpec, schema: pa.Schema) -> None:
        # The outcome is read on exposed rows only, so nulls elsewhere are fine and it
        # is not part of the null-statistics check.
        d = spec.data
        if d.outcome not in schema.names:
            raise DataError(
                f"the dataset at {d.path} has no column {d.outcome!r} (named by data.outcome); "
                f"its columns are: {', '.join(schema.names)}"
            )
        t = schema.field(d.outcome).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
            raise DataError(
                f"column {d.outcome!r} (named by data.outcome) has type {t}; it must be numeric"
            )

    def prepare(self, spec: InterferenceSpec) -> InterferencePrepared:
        from ray.data.aggregate import Count, Max, Min, Sum

        t0 = time.perf_counter()
        d = spec.data
        assert d.path is not None
        req = self.requirements(spec)
        summary = check_schema(d.path, req)
        self._check_outcome_column(spec, summary.schema)
        names = summary.schema.names
        simulated = toolkit.read_simulation_marker(d.path, self.name) is not None
        truth_cols = []
        for f in ("tau_true", "mu_true"):
            col = getattr(d, f)
            if col is None:  # the simulator's column, on data this project simulated
                if simulated and f in names:
                    truth_cols.append(f)
            elif col in names:
                truth_cols.append(col)
            else:
                raise DataError(f"data.{f} names column {col!r}, which the data lacks")
        numeric = [d.treated, d.exposed, *d.viewer_features, *d.item_features]
        ids = [d.item_subgroup] if d.item_subgroup else []
        layout = Layout(
            d.query, d.item, d.treated, d.exposed, d.outcome, list(d.viewer_features),
            list(d.item_features), k_max=0, subgroup=d.item_subgroup, truth=truth_cols,
        )  # fmt: skip
        ds = read_parquet(d.path, layout.long_columns())
        profile = profile_dataset(ds, numeric, ids, {r.name: r.field for r in req})
        if d.item_subgroup:
            vocab = profile.vocab[d.item_subgroup]
            if len(vocab) > MAX_SUBGROUPS:
                raise DataError(
                    f"data.item_subgroup column {d.item_subgroup!r} has {len(vocab)} distinct values; "
                    f"subgroup effects allow at most {MAX_SUBGROUPS}"
                )
            layout.subgroup_vocab = vocab

        for col, field_name in ((d.treated, "data.treated"), (d.exposed, "data.exposed")):
            mc = profile.moments[col]
            if mc.lo < 0 or mc.hi > 1:
                raise DataError(
                    f"column {col!r} (named by {field_name}) must hold only 0 and 1; "
                    f"found values from {mc.lo:g} to {mc.hi:g}"
                )
        parts = shuffle_partitions(profile.n_rows)
        # Exactly one exposure per query, and the largest consideration set.
        q = merge_rows(
            ds.groupby(d.query, num_partitions=parts)
            .aggregate(Count(), Sum(d.exposed))
            .map_batches(
                query_summary, fn_kwargs={"query": d.query, "exposed": d.exposed},
                batch_format="numpy", batch_size=None,
            )
            .take_all()
        )  # fmt: skip
        n_queries, sizes = int(q["queries"]), int(q["max_size"])
        if q["not_one"]:
            raise DataError(
                f"{int(q['not_one'])} of {n_queries} queries do not have exactly one exposed item "
                f"(column {d.exposed!r}, named by data.exposed); e.g. query {q['example']} has "
                f"{q['example_exposures']:g} exposure(s). Each query must expose exactly one item"
            )
        # Treatment is assigned per item: it must not vary across the item's rows.
        it = merge_rows(
            ds.groupby(d.item, num_partitions=parts)
            .aggregate(Min(d.treated), Max(d.treated))
            .map_batches(
                item_summary, fn_kwargs={"item": d.item, "treated": d.treated},
                batch_format="numpy", batch_size=None,
            )
            .take_all()
        )  # fmt: skip
        items, treated_items = int(it["items"]), int(it["treated"])
        if it["varying"]:
            raise DataError(
                f"column {d.treated!r} (named by data.treated) varies within {int(it['varying'])} of "
                f"{items} items (e.g. item {it['example']}); treatment is assigned once per item "
                "and must be the same on every row of an item"
            )

        layout.k_max = int(sizes)
        queries = (
            ds.groupby(d.query, num_partitions=parts)
            .map_groups(query_row, fn_kwargs={"layout": layout}, batch_format="numpy")
            .materialize()
        )
        flags = merge_rows(
            queries.map_batches(
                flag_sums, fn_kwargs={"val_fraction": spec.train.val_fraction}, batch_format="numpy"
            ).take_all()
        )
        if flags.get("bad_binary", 0):
            raise DataError(
                f"columns {d.treated!r} (data.treated) and {d.exposed!r} (data.exposed) must hold "
                f"only 0 and 1; found {flags['bad_binary']} other value(s)"
            )
        if flags.get("viewer_varies", 0):
            raise DataError(
                f"viewer features {d.viewer_features} vary within {flags['viewer_varies']} queries; "
                "they describe the query's viewer and must be the same on all its rows"
            )
        if flags.get("y_not_finite", 0):
            raise DataError(
                f"column {d.outcome!r} (named by data.outcome) is null, NaN or infinite on "
                f"{flags['y_not_finite']} exposed row(s); the outcome of the exposed item is required"
            )
        binary = self._outcome_binary(spec, flags.get("y_not_binary", 0))
        m = profile.moments
        prepared = InterferencePrepared(
            path=d.path,
            queries=queries,
            n_queries=int(n_queries),
            n_rows=profile.n_rows,
            layout=layout,
            binary=binary,
            x_mean=[m[c].mean for c in d.viewer_features],
            x_scale=[m[c].std or 1.0 for c in d.viewer_features],
            z_mean=[m[c].mean for c in d.item_features],
            z_scale=[m[c].std or 1.0 for c in d.item_features],
            items=int(items),
            val_queries=int(flags["val_queries"]),
            treated_items=treated_items,
            truth=sim.read_truth(d.path),
            prepare_seconds=time.perf_counter() - t0,
        )
        log.info(
            "[prepare] %s: %d rows, %d queries (sets of up to %d items), %d items (%d treated), "
            "%s outcome, %.1fs",
            d.path, profile.n_rows, n_queries, layout.k_max, items, treated_items,
            "binary" if binary else "continuous", prepared.prepare_seconds,
        )  # fmt: skip
        return prepared

    @staticmethod
    def _outcome_binary(spec: InterferenceSpec, n_not_binary: int) -> bool:
        kind = spec.data.outcome_type
        if kind == "binary" and n_not_binary:
            raise DataError(
                f"data.outcome_type is binary but column {spec.data.outcome!r} has "
                f"{n_not_binary} exposed value(s) other than 0 and 1"
            )
        if kind == "auto":
            return n_not_binary == 0
        return kind == "binary"

    def make_plugin(self, spec: InterferenceSpec, prepared: InterferencePrepared):
        from distributed_hte.kinds.interference.plugin import InterferencePlugin

        return InterferencePlugin(
            d_x=len(spec.data.viewer_features),
            d_z=len(spec.data.item_features),
            k_max=prepared.layout.k_max,
            folds=spec.estimate.folds,
            val_fraction=spec.train.val_fraction,
            binary=prepared.binary,
            choice_net=spec.model.choice_net.config(),
            response_net=spec.model.response_net.config(),
            pdl_net=spec.model.pdl_net.config(),
            x_mean=prepared.x_mean,
            x_scale=prepared.x_scale,
            z_mean=prepared.z_mean,
            z_scale=prepared.z_scale,
            cache_in_memory=self._cache(spec, prepared),
        )

    @staticmethod
    def _cache(spec: InterferenceSpec, prepared: InterferencePrepared) -> bool:
        if spec.data.cache != "auto":
            return spec.data.cache == "always"
        d_z, d_x = len(spec.data.item_features), len(spec.data.viewer_features)
        per_query = prepared.layout.k_max * (4 * d_z + 9) + 4 * d_x + 24
        return prepared.n_queries * per_query < CACHE_BYTES

    def db_settings(self, spec: InterferenceSpec, prepared: InterferencePrepared) -> est.DBSettings:
        from distributed_hte.estimators import interference as est

        e = spec.estimate
        return est.DBSettings(
            p=spec.p_treat,
            outcome="binary" if prepared.binary else "continuous",
            hessian=e.hessian,
            hessian_draws=e.hessian_draws,
            exact_max_k=e.exact_max_set_size,
            policy_q=tuple(e.policy_q),
            n_groups=0
            if prepared.layout.subgroup_vocab is None
            else len(prepared.layout.subgroup_vocab),
            seed=e.seed,
        )

    # -- fit --------------------------------------------------------------------------
    def fit(
        self,
        spec: InterferenceSpec,
        prepared: InterferencePrepared,
        run: RunDir,
        callbacks: list | None = None,
    ) -> None:
        import torch

        from distributed_hte.train.trainer import fit, training_summary

        plugin = self.make_plugin(spec, prepared)
        vf = spec.train.val_fraction
        queries = prepared.queries
        datasets = {"train": queries.map_batches(split_side, fn_kwargs={"vf": vf, "keep": "train"})}
        if vf > 0:
            datasets["val"] = queries.map_batches(split_side, fn_kwargs={"vf": vf, "keep": "val"})
        n_train = prepared.n_queries - (prepared.val_queries if vf > 0 else 0)
        log.info(
            "[fit] %d cross-fitting members × (choice, response, PDL) nets, %d workers%s, "
            "%d epochs, %d training queries",
            plugin.folds, spec.scaling.num_workers, " on GPU" if spec.scaling.use_gpu else "",
            spec.train.epochs, n_train,
        )  # fmt: skip
        t0 = time.perf_counter()
        result = fit(spec, plugin, datasets, n_train, run.path, callbacks=callbacks)
        summary = training_summary(result, time.perf_counter() - t0, spec.scaling.num_workers)
        final = result.final_metrics
        summary.update(
            {k: final.get(k) for k in ("val_choice_loss", "val_response_loss", "val_pdl_loss")},
            prepare_seconds=prepared.prepare_seconds,
            queries=prepared.n_queries,
            training_queries=n_train,
        )
        state = torch.load(result.best_model_path, map_location="cpu", weights_only=True)
        write_json(run.file(FIT_FILE), {"training": summary, "history": result.history})
        toolkit.save_bundle(
            run.path,
            self.name,
            spec,
            {"plugin": plugin.to_config(), "layout": layout_config(prepared.layout)},
            {"state.pt": lambda p: torch.save(state, p)},
        )

    # -- evaluate / report ------------------------------------------------------------
    def _estimate(
        self,
        spec: InterferenceSpec,
        prepared: InterferencePrepared,
        bundle: ModelBundle,
        out_dir: Path,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The estimation pass (per-query values to ``out_dir``) and its reduction."""
        from distributed_hte.estimators import interference_summary as summ
        from distributed_hte.kinds.interference.plugin import InterferencePlugin, estimation_batch

        plugin = InterferencePlugin.from_config(bundle.config["plugin"])
        settings = self.db_settings(spec, prepared)
        if out_dir.exists():
            shutil.rmtree(out_dir)  # a resumed run recomputes it
        prepared.queries.map_batches(
            estimation_batch,
            fn_kwargs={
                "plugin": plugin,
                "state": bundle.state_bytes(),
                "settings": settings,
                "truth": prepared.layout.truth,
            },
            batch_format="numpy",
            batch_size=spec.estimate.batch_queries,
        ).write_parquet(str(out_dir))
        sums = summ.QuerySums()
        for rb in pads.dataset(str(out_dir), format="parquet").to_batches(batch_size=262_144):
            sums.add({c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names})
        level = spec.estimate.ci_level
        estimates = summ.estimates_from(sums, settings, level, prepared.layout.subgroup_vocab)
        if settings.n_groups:
            estimates["DB"]["subgroups_column"] = spec.data.item_subgroup
        exact = settings.use_exact(prepared.layout.k_max)
        estimates["diagnostics"] = summ.diagnostics(
            sums,
            settings,
            list(spec.data.viewer_features),
            {
                "rows": prepared.n_rows,
                "max_set_size": prepared.layout.k_max,
                "outcome_type": "binary" if prepared.binary else "continuous",
                "folds": spec.estimate.folds,
                "hessian": "exact" if exact else "monte_carlo",
                "hessian_draws": None if exact else settings.hessian_draws,
                "items": prepared.items,
                "treated_items": prepared.treated_items,
            },
        )
        extra: dict[str, Any] = {}
        if prepared.truth and "gte" in prepared.truth:
            extra["truth"] = summ.truth_errors(estimates, prepared.truth, level)
        rec = summ.recovery(sums, prepared.layout.truth)
        if rec:
            extra["recovery"] = rec
        return estimates, extra

    def evaluate(
        self, bundle: ModelBundle, data_path: str, rows: RowFilter | None = None
    ) -> dict[str, Any]:
        """Every estimator on ``data_path`` (long format) with the bundle's nuisance nets."""
        import tempfile

        from distributed_hte.spec import load_spec, with_overrides

        if rows is not None:
            raise SpecError(
                "interference evaluates whole experiments: a row filter would cut queries apart; "
                "write the rows to evaluate as their own dataset"
            )
        spec = load_spec(bundle.run_dir / "spec.yaml")
        spec = with_overrides(spec, {"data.path": data_path, "simulate": None})
        prepared = self.prepare(spec)
        with tempfile.TemporaryDirectory() as tmp:
            estimates, extra = self._estimate(spec, prepared, bundle, Path(tmp) / "influence")
        return {**estimates, **extra}

    def report(
        self,
        spec: InterferenceSpec,
        prepared: InterferencePrepared,
        run: RunDir,
        bundle: ModelBundle,
    ) -> dict[str, Any]:
        from distributed_hte.kinds.interference.report import format_table, plot_estimates

        t1 = time.perf_counter()
        estimates, extra = self._estimate(spec, prepared, bundle, run.file("influence"))
        write_json(run.file("estimates.json"), estimates)
        log.info("[estimate] %s", format_table(estimates, prepared.truth))
        fitted = json.loads((run.path / FIT_FILE).read_text())
        training = {**fitted["training"], "estimate_seconds": time.perf_counter() - t1}
        metrics: dict[str, Any] = {
            # The nets' held-out loss: what a sweep over training settings compares.
            "val_loss": training.get("best_val_loss"),
            "estimates": {k: v for k, v in estimates.items() if k != "diagnostics"},
            "truth": extra.get("truth", {}),
            "recovery": extra.get("recovery", {}),
            "training": training,
        }
        for k in ("DB", "plug_in"):
            metrics["estimates"][k] = {
                kk: vv for kk, vv in estimates[k].items() if not isinstance(vv, dict | list)
            }
        write_json(run.file("metrics.json"), metrics)
        toolkit.write_history(run, fitted["history"], spec.name)
        plot_estimates(spec, estimates, prepared.truth, run)
        return metrics

    def export_legacy(self, run_dir: Path) -> ModelBundle:
        return export_legacy(run_dir)

    # -- predict ----------------------------------------------------------------------
    def predict(self, run_dir: Path, data_path: str, out_path: Path) -> dict[str, Any]:
        """Score long-format rows: b̂, τ̂, μ̂ and exposure probabilities per query.

        ``p_control`` / ``p_treatment``: probability that the row's item is exposed when
        every item is in control / treated; ``p_observed`` under the rows' own
        ``treated`` values when that column is present. Averaged over the cross-fitting
        members (b̂ centred within each query first: it is identified only up to a
        constant per query).
        """
        from distributed_hte.kinds.interference.plugin import InterferencePlugin, predict_group

        bundle = toolkit.load_bundle(run_dir, self.name)
        plugin = InterferencePlugin.from_config(bundle.config["plugin"])
        layout = layout_from_config(bundle.config["layout"])
        req = [ColumnRequirement(layout.query, "the trained model", "id")]
        req += [
            ColumnRequirement(c, "the trained model", "numeric")
            for c in [*layout.viewer_features, *layout.item_features]
        ]
        summary = check_schema(data_path, req)
        cols = [layout.query, *layout.viewer_features, *layout.item_features]
        keep = [c for c in (layout.item, layout.treated) if c in summary.schema.names]
        cols = list(dict.fromkeys(cols + keep))
        scored = (
            read_parquet(data_path, cols)
            .groupby(layout.query, num_partitions=shuffle_partitions(summary.n_rows))
            .map_groups(
                predict_group,
                fn_kwargs={
                    "plugin": plugin,
                    "state": bundle.state_bytes(),
                    "layout": layout,
                    "keep": keep,
                },
                batch_format="numpy",
            )
        )
        return toolkit.write_predictions(scored, out_path)


def export_legacy(run_dir: Path) -> ModelBundle:
    """Write ``model/bundle.json`` for a run saved as a pickled ``model/predictor.pt``."""
    import io
    import sys

    import torch

    from distributed_hte.kinds.interference import data
    from distributed_hte.spec import load_spec

    # The pickle names the module this one was before kinds became packages.
    sys.modules.setdefault("distributed_hte.kinds.interference_data", data)
    old = torch.load(Path(run_dir) / "model" / "predictor.pt", weights_only=False)
    state = torch.load(io.BytesIO(old["state"]), map_location="cpu", weights_only=False)
    return toolkit.save_bundle(
        Path(run_dir),
        "interference",
        load_spec(Path(run_dir) / "spec.yaml"),
        {"plugin": old["plugin"].to_config(), "layout": layout_config(old["layout"])},
        {"state.pt": lambda p: torch.save(state, p)},
    )


def __getattr__(name: str) -> Any:
    # Pickles of older runs name distributed_hte.kinds.interference.InterferencePlugin.
    if name == "InterferencePlugin":
        from distributed_hte.kinds.interference.plugin import InterferencePlugin

        return InterferencePlugin
    raise AttributeError(name)


def layout_config(layout: Layout) -> dict[str, Any]:
    """The layout as plain JSON (subgroup values as a list)."""
    out = asdict(layout)
    if layout.subgroup_vocab is not None:
        out["subgroup_vocab"] = layout.subgroup_vocab.tolist()
    return out


def layout_from_config(raw: dict[str, Any]) -> Layout:
    import numpy as np

    raw = dict(raw)
    if raw.get("subgroup_vocab") is not None:
        raw["subgroup_vocab"] = np.asarray(raw["subgroup_vocab"])
    return Layout(**raw)


KIND = InterferenceKind
