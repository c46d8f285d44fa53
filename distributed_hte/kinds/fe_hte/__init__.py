"""Kind ``fe_hte``: y = beta(X_beta)·T + g(X_g) + Σ_f FE_f[id_f] + intercept.

fit: profile (vocabularies, moments) → Ray Train DDP over Ray Data shards → normalise
the fixed effects (zero mean per family, constant in the intercept) → model bundle.
evaluate: one distributed pass of R², RMSE and (where the data carries them) truth
correlations. report: metrics, fixed-effect tables, coefficients, plots.
See :mod:`distributed_hte.models.fe_hte` for identification.

Imports of torch and Ray happen inside the stages: importing this package (and its
``spec``) stays light.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed_hte.data.profile import DatasetProfile, profile_parquet
from distributed_hte.data.schema import ColumnRequirement, check_schema
from distributed_hte.errors import DataError
from distributed_hte.evaluation.metrics import correlation_from_sums, regression_metrics
from distributed_hte.kinds import Kind
from distributed_hte.kinds.fe_hte.spec import FeHteSpec
from distributed_hte.kinds.toolkit import (
    ModelBundle,
    RowFilter,
    batch_sums,
    load_bundle,
    read_parquet,
    read_parquet_head,
    read_simulation_marker,
    save_bundle,
    truth_location,
    write_history,
    write_predictions,
)
from distributed_hte.rundir import RunDir, write_json

if TYPE_CHECKING:
    from distributed_hte.kinds.fe_hte.plugin import FeHtePlugin

log = logging.getLogger(__name__)

FIT_FILE = "fit.json"
# rows of the beta recovery plot (read in the driver, not through Ray Data)
PLOT_ROWS = 20_000


@dataclass
class FeHtePrepared:
    path: str
    n_rows: int
    profile: DatasetProfile
    truth: dict[str, Any]  # fixed-effect column -> pd.Series of true effects (by id)
    beta_true: str | None  # truth columns to read (None: not used)
    g_true: str | None


class FeHteKind(Kind):
    name = "fe_hte"
    spec_class = FeHteSpec
    warm_start = (
        "SGD: the beta and g networks start from the previous model's weights and keep its "
        "input standardisation; fixed effects of known ids keep their values, new ids start "
        "at zero. The exact solver (linear nets) solves exactly: a warm start changes nothing"
    )
    artefacts = ["coefficients.json", "history.parquet", "fixed_effects", "model", "plots"]

    # -- simulate ---------------------------------------------------------------------
    def simulation(self, spec: FeHteSpec):
        from distributed_hte.simulate import fe_hte as sim

        cfg = sim.FeHteSimConfig(**spec.simulate.model_dump(exclude={"out"}))
        return cfg, sim.simulate_fe_hte

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

    def prepare(self, spec: FeHteSpec) -> FeHtePrepared:
        from distributed_hte.kinds.fe_hte.report import read_fixed_effect_truth

        d = spec.data
        assert d.path is not None
        req = self.requirements(spec)
        summary = check_schema(d.path, req)
        numeric = [d.outcome, d.treatment, *d.beta_features, *d.g_features]
        fields = {r.name: r.field for r in req}
        profile = profile_parquet(d.path, numeric, d.fixed_effects, fields)
        for c in d.beta_features + d.g_features:
            if profile.moments[c].std == 0:
                raise DataError(
                    f"feature {c!r} is constant over the whole dataset; drop it from the spec (a constant carries no signal)"
                )
        truth_dir = truth_location(d.truth_dir, d.path, self.name, "truth", "data.truth_dir")
        truth = {}
        for col in d.fixed_effects if truth_dir else []:
            series = read_fixed_effect_truth(truth_dir, col)
            if series is not None:
                truth[col] = series
        simulated = read_simulation_marker(d.path, self.name) is not None
        names = summary.schema.names

        def truth_column(field: str, default: str) -> str | None:
            col = getattr(d, field)
            if col is None:  # the simulator's column, on data this project simulated
                return default if simulated and default in names else None
            if col not in names:
                raise DataError(f"data.{field} names column {col!r}, which the data lacks")
            return col

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
            truth=truth,
            beta_true=truth_column("beta_true", "beta_true"),
            g_true=truth_column("g_true", "g_true"),
        )

    def make_plugin(self, spec: FeHteSpec, prepared: FeHtePrepared) -> FeHtePlugin:
        from distributed_hte.kinds.fe_hte.plugin import FeHtePlugin

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
            # A warm start from the linear fit needs a linear path beside hidden layers.
            beta_net=replace(spec.model.beta_net.config(), skip=spec.starts_from_linear_fit),
            g_net=replace(spec.model.g_net.config(), skip=spec.starts_from_linear_fit),
            fixed_effect_lr_multiplier=spec.model.fixed_effect_lr_multiplier,
        )

    @staticmethod
    def split_key(spec: FeHteSpec) -> list[str]:
        d = spec.data
        return list(
            d.split_key
            or [d.outcome, d.treatment, *d.fixed_effects, *d.beta_features, *d.g_features]
        )

    # -- fit --------------------------------------------------------------------------
    def fit(
        self, spec: FeHteSpec, prepared: FeHtePrepared, run: RunDir, callbacks: list | None = None
    ) -> None:
        import torch

        from distributed_hte.data.split import cache_if_small, split_datasets
        from distributed_hte.train.trainer import fit, training_summary, warm_started

        plugin = self.make_plugin(spec, prepared)
        # SGD reads files in a fresh seeded order every epoch; the exact solver needs none.
        train = None if spec.uses_exact_solver else spec.train
        ds = read_parquet(prepared.path, plugin.columns, train=train)
        datasets = split_datasets(ds, self.split_key(spec), spec.train.val_fraction)
        cached = cache_if_small(datasets, prepared.n_rows, len(plugin.columns), spec.data.cache)
        # Rows that fit the object store also fit the workers: keep them there, and
        # backfit the fixed effects on them between epochs.
        plugin.cache_in_memory = cached
        plugin.backfit_sweeps = spec.model.backfit_sweeps_used
        if spec.uses_exact_solver:
            self._fit_exact(spec, plugin, datasets["train"], run)
            return
        start: dict[str, Any] = {"init": "random"}
        if warm_started(run.path):
            # retrain.init_from: the loop starts from the previous model's weights.
            start = {"init": "warm start (retrain.init_from)"}
        elif spec.starts_from_linear_fit:
            from distributed_hte.kinds.fe_hte.exact import linear_start

            log.info("[fit] starting point: the exact linear fit (one pass over the data)")
            plugin.initial_state, start = linear_start(plugin, datasets["train"])
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
        summary = training_summary(result, time.perf_counter() - t0, spec.scaling.num_workers)
        summary["cached_in_object_store"] = cached
        summary.update(start)
        plugin.initial_state = None  # the trained weights are what the bundle holds

        model = plugin.build_model()
        model.load_state_dict(
            torch.load(result.best_model_path, map_location="cpu", weights_only=True)
        )
        counts = [
            torch.as_tensor(prepared.profile.id_counts[c].copy()) for c in plugin.fixed_effects
        ]
        model.normalize_(counts)
        if spec.model.finish_fixed_effects:
            from distributed_hte.kinds.fe_hte.exact import finish_fixed_effects

            log.info("[fit] fixed effects: exact least squares given the trained nets")
            summary.update(finish_fixed_effects(plugin, model, datasets["train"]))
        self._save(spec, run, plugin, model, {"training": summary, "history": result.history})

    def _fit_exact(self, spec: FeHteSpec, plugin: FeHtePlugin, train, run: RunDir) -> None:
        from distributed_hte.kinds.fe_hte.exact import fit_exact

        log.info("[fit] linear nets: the exact solver (feols), two passes over the data")
        t0 = time.perf_counter()
        model, summary = fit_exact(plugin, train, spec.model.cluster)
        summary["fit_seconds"] = time.perf_counter() - t0
        self._save(spec, run, plugin, model, {"training": summary, "history": []})

    def _save(self, spec: FeHteSpec, run: RunDir, plugin: FeHtePlugin, model, fitted: dict) -> None:
        """``fit.json`` (training summary, history), then the bundle (its marker last)."""
        import torch

        write_json(run.file(FIT_FILE), fitted)
        save_bundle(
            run.path,
            self.name,
            spec,
            {"plugin": plugin.to_config()},
            {
                "state.pt": lambda p: torch.save(model.state_dict(), p),
                "vocab.npz": plugin.save_vocab,
            },
        )

    # -- warm start -------------------------------------------------------------------
    def warm_start_state(self, spec: FeHteSpec, prepared: FeHtePrepared, source: ModelBundle):
        from distributed_hte.kinds.fe_hte.plugin import FeHtePlugin
        from distributed_hte.kinds.fe_hte.warm import map_state

        if spec.uses_exact_solver:
            log.info("[warm start] the exact solver solves exactly: nothing to start from")
            return None
        state, summary = map_state(
            self.make_plugin(spec, prepared), FeHtePlugin.from_bundle(source), source.state_dict()
        )
        log.info(
            "[warm start] from %s: %s",
            source.run_dir,
            ", ".join(
                f"{c} {v['known_ids']} known / {v['new_ids']} new" for c, v in summary.items()
            ),
        )
        return state

    # -- evaluate ---------------------------------------------------------------------
    def evaluate(
        self, bundle: ModelBundle, data_path: str, rows: RowFilter | None = None
    ) -> dict[str, Any]:
        """R², RMSE, MAE of y over ``rows`` of ``data_path`` (``{"n", "r2", ...}``)."""
        from distributed_hte.kinds.fe_hte.plugin import FeHtePlugin

        plugin = FeHtePlugin.from_bundle(bundle)
        sums = self._sums(plugin, bundle.state_bytes(), data_path, rows)
        return regression_metrics({k[6:]: v for k, v in sums.items() if k.startswith("train_")})

    def _sums(
        self,
        plugin: FeHtePlugin,
        state: bytes,
        data_path: str,
        rows: RowFilter | None = None,
        split_key: list[str] | None = None,
        val_fraction: float = 0.0,
        beta_true: str | None = None,
        g_true: str | None = None,
    ) -> dict[str, float]:
        from distributed_hte.kinds.fe_hte.plugin import evaluation_sums_batch

        cols = list(dict.fromkeys(plugin.columns + (split_key or [])))
        cols += [c for c in (beta_true, g_true) if c]
        if rows is not None and rows.column not in cols:
            cols.append(rows.column)
        return batch_sums(
            data_path,
            cols,
            evaluation_sums_batch,
            plugin=plugin,
            state=state,
            split_key=split_key,
            val_fraction=val_fraction,
            beta_true=beta_true,
            g_true=g_true,
            rows=rows,
        )

    # -- report -----------------------------------------------------------------------
    def report(
        self, spec: FeHteSpec, prepared: FeHtePrepared, run: RunDir, bundle: ModelBundle
    ) -> dict[str, Any]:
        import torch

        from distributed_hte.kinds.fe_hte.plugin import FeHtePlugin, predict_batch
        from distributed_hte.kinds.fe_hte.report import export_fixed_effects, plot_beta_recovery

        plugin = FeHtePlugin.from_bundle(bundle)
        state = bundle.state_bytes()
        log.info("[evaluate] evaluation pass over %d rows", prepared.n_rows)
        sums = self._sums(
            plugin,
            state,
            prepared.path,
            split_key=self.split_key(spec),
            val_fraction=spec.train.val_fraction,
            beta_true=prepared.beta_true,
            g_true=prepared.g_true,
        )
        metrics: dict[str, Any] = {}
        for side in ("train", "val"):
            side_sums = {k[len(side) + 1 :]: v for k, v in sums.items() if k.startswith(side + "_")}
            if side_sums.get("n", 0) > 0:
                metrics[side] = regression_metrics(side_sums)
        truth: dict[str, Any] = {}
        if prepared.beta_true:
            truth.update(correlation_from_sums(sums, "beta"))
        if prepared.g_true:
            truth.update(correlation_from_sums(sums, "g"))
        if truth:
            metrics["truth"] = truth
        fitted = json.loads((run.path / FIT_FILE).read_text())
        metrics["training"] = fitted["training"]

        model = plugin.build_model()
        model.load_state_dict(bundle.state_dict())
        metrics["fixed_effects"] = export_fixed_effects(
            model, plugin.vocab, prepared.profile.id_counts, prepared.truth, run
        )
        training = fitted["training"]
        if training.get("solver") == "exact":
            # float64 from the solver, with standard errors of every vcov type
            write_json(run.file("coefficients.json"), training["coefficients"])
            write_json(run.file("inference.json"), training["inference"])
        else:
            coefs = model.linear_coefficients(plugin.beta_features, plugin.g_features)
            if "beta" in coefs or "g" in coefs:
                write_json(run.file("coefficients.json"), coefs)
        write_json(run.file("metrics.json"), metrics)
        write_history(run, fitted["history"], spec.name, "MSE")
        if prepared.beta_true:
            sample = read_parquet_head(
                prepared.path, [*plugin.columns, prepared.beta_true], PLOT_ROWS
            )
            with torch.no_grad():
                pred = predict_batch(
                    {c: sample[c].to_numpy() for c in sample.columns}, plugin, state, []
                )
            plot_beta_recovery(sample[prepared.beta_true].to_numpy(), pred["beta_hat"], run)
        return metrics

    # -- predict ----------------------------------------------------------------------
    def predict(self, run_dir: Path, data_path: str, out_path: Path) -> dict[str, Any]:
        from distributed_hte.kinds.fe_hte.plugin import FeHtePlugin, predict_batch

        bundle = load_bundle(run_dir, self.name)
        plugin = FeHtePlugin.from_bundle(bundle)
        req = [
            ColumnRequirement(c, "the trained model", "numeric")
            for c in [plugin.treatment, *plugin.beta_features, *plugin.g_features]
        ]
        req += [ColumnRequirement(c, "the trained model", "id") for c in plugin.fixed_effects]
        check_schema(data_path, req)
        cols = [plugin.treatment, *plugin.beta_features, *plugin.g_features, *plugin.fixed_effects]
        scored = read_parquet(data_path, cols).map_batches(
            predict_batch,
            fn_kwargs={
                "plugin": plugin,
                "state": bundle.state_bytes(),
                "keep": plugin.fixed_effects,
            },
            batch_format="numpy",
            batch_size=65_536,
        )
        return write_predictions(scored, out_path)

    # -- old run directories ------------------------------------------------------------
    def export_legacy(self, run_dir: Path) -> ModelBundle:
        """Write ``model/bundle.json`` for a run saved as a pickled ``model/predictor.pt``."""
        import torch

        old = torch.load(Path(run_dir) / "model" / "predictor.pt", weights_only=False)
        plugin = old["plugin"]
        state = torch.load(io.BytesIO(old["state"]), map_location="cpu", weights_only=False)
        return save_bundle(
            Path(run_dir),
            self.name,
            _spec_of(run_dir),
            {"plugin": plugin.to_config()},
            {"state.pt": lambda p: torch.save(state, p), "vocab.npz": plugin.save_vocab},
        )


def _spec_of(run_dir: Path):
    from distributed_hte.spec import load_spec

    return load_spec(Path(run_dir) / "spec.yaml")


def __getattr__(name: str) -> Any:
    # Pickles of older runs name distributed_hte.kinds.fe_hte.FeHtePlugin.
    if name == "FeHtePlugin":
        from distributed_hte.kinds.fe_hte.plugin import FeHtePlugin

        return FeHtePlugin
    raise AttributeError(name)


KIND = FeHteKind
__all__ = ["KIND", "FeHteKind", "FeHtePrepared"]
