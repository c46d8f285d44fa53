"""Kind ``mmm``: a deep marketing mix model on a region × week panel.

prepare: read and check the long table (:mod:`distributed_hte.kinds.mmm.data`), build
the dense panel (ragged regions masked), fit the scalers once on the fit weeks and
initialise Hill's ``K`` from data percentiles. fit: Ray Train DDP through the generic
loop, one sample per region (regions sharded across workers; ``train.batch_size`` is
the global batch, so any worker count takes the same steps), the last
``data.holdout_weeks`` of each region never seen → model bundle with the scalers and the
history (for predict); with ``uncertainty:``, region-bootstrap replicas through the same
fit (:mod:`distributed_hte.kinds.mmm.replicas`). evaluate / report: decompose the panel
with the fitted model (driver side: a panel is small) → metrics.json,
channels.csv/.parquet (with ``_low``/``_high`` intervals from the replicas),
contributions.parquet, response_curves.parquet, budget.json (with ``optimize:``) and
plots. predict: a media plan's weeks, carrying on from the history.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distributed_hte.errors import DataError, SpecError
from distributed_hte.kinds import Kind, toolkit
from distributed_hte.kinds.mmm.data import Columns, Panel, Scalers, fit_scalers, read_panel, scaled
from distributed_hte.kinds.mmm.spec import MmmSpec
from distributed_hte.kinds.toolkit import ModelBundle, RowFilter
from distributed_hte.rundir import RunDir, write_json
from distributed_hte.simulate import mmm as sim

log = logging.getLogger(__name__)

FIT_FILE = "fit.json"
TRUTH_KEYS = ("channels", "media_share", "region_size", "media_scale")


@dataclass
class MmmPrepared:
    """The checked panel, its scalers and what the model is initialised from."""

    columns: Columns
    panel: Panel
    scalers: Scalers
    hill_k_init: list[float]
    truth: dict | None
    prepare_seconds: float

    @property
    def week(self) -> np.ndarray:
        return np.arange(self.panel.kpi.shape[1], dtype=np.float64)


def columns_of(spec: MmmSpec, expected: str | None = None) -> Columns:
    d = spec.data
    return Columns(
        region=d.region,
        week=d.week,
        kpi=d.kpi,
        media=spec.media(),
        spend=spec.spend(),
        controls=spec.controls(),
        holdout_weeks=d.holdout_weeks,
        expected=expected,
    )


def hill_k_init(panel: Panel, scalers: Scalers, percentile: float, max_lag: int) -> list[float]:
    """Per channel: ``percentile`` of the positive adstocked scaled activity (θ = 0.5)."""
    x = panel.media / scalers.media_scale[:, None, :]
    out = []
    for c in range(x.shape[2]):
        a = sim.geometric_adstock(x[:, :, c], 0.5, max_lag)[panel.fit]
        pos = a[a > 0]
        out.append(float(np.percentile(pos, percentile)) if len(pos) else 1.0)
    return out


def per_worker_batch(spec: MmmSpec) -> MmmSpec:
    """``spec`` with ``train.batch_size`` per worker, as the generic loop reads it.

    For mmm, ``train.batch_size`` is the global batch (regions per optimiser step, all
    workers together). DDP averages the workers' mean gradients, so with equal per-worker
    batches of ``batch_size / num_workers`` a step of W workers is a step over
    ``batch_size`` regions, and an epoch has the same number of steps (and the LR schedule
    the same length) for any W. With ``batch_size`` per worker, as before, two workers
    took half the steps of one at twice the batch and gave ROIs up to 15 % apart on the
    40-region test panel.
    """
    w = spec.scaling.num_workers
    if w == 1:
        return spec
    per = max(1, math.ceil(spec.train.batch_size / w))
    return spec.model_copy(update={"train": spec.train.model_copy(update={"batch_size": per})})


class MmmKind(Kind):
    name = "mmm"
    spec_class = MmmSpec
    warm_start = (
        "the source model's weights and its scalers for the regions it knew, so a refresh "
        "stays on the source's scale; regions new to it get fresh scalers and the initial "
        "baseline. Same channels, controls and first week required"
    )
    artefacts = [
        "channels.csv",
        "channels.parquet",
        "contributions.parquet",
        "response_curves.parquet",
        "history.parquet",
        "model",
        "plots",
    ]

    def simulation(self, spec: MmmSpec):
        return spec.simulate.config(), sim.simulate_mmm

    # -- check / prepare --------------------------------------------------------------
    def requirements(self, spec: MmmSpec) -> list[Any]:
        """Metadata checks before Ray starts. The KPI and week columns are checked in
        prepare: a region without KPI and an unparseable week get their own messages."""
        from distributed_hte.data.schema import ColumnRequirement

        req = [ColumnRequirement(spec.data.region, "data.region", "id")]
        req += [ColumnRequirement(c, "data.media", "numeric") for c in spec.media()]
        req += [
            ColumnRequirement(c, "data.spend", "numeric")
            for ch, c in spec.spend().items()
            if c != ch
        ]
        req += [ColumnRequirement(c, "data.controls", "numeric") for c in spec.controls()]
        return req

    def prepare(self, spec: MmmSpec) -> MmmPrepared:
        t0 = time.perf_counter()
        d = spec.data
        assert d.path is not None
        truth, _ = toolkit.read_truth_json(d.truth, d.path, self.name, TRUTH_KEYS)
        expected = None
        if toolkit.read_simulation_marker(d.path, self.name) is not None:
            expected = (truth or {}).get("kpi_expected_column")
        panel = read_panel(d.path, columns_of(spec, expected))
        if truth is not None:
            names = truth.get("channel_names", [])
            if names != spec.media():
                raise toolkit.truth_error(
                    "data.truth", Path(d.truth or d.path), f"is for channels {names}, not "
                    f"data.media {spec.media()}"
                )  # fmt: skip
        scalers = fit_scalers(panel)
        k_init = hill_k_init(panel, scalers, spec.model.hill_init_percentile, spec.model.max_lag)
        prepared = MmmPrepared(
            columns_of(spec, expected), panel, scalers, k_init, truth, time.perf_counter() - t0
        )
        log.info(
            "[prepare] %s: %d regions × %d weeks (%d rows), %d channels, %d controls; "
            "holdout: last %d weeks of each region; %.1fs",
            d.path, len(panel.regions), len(panel.week_labels), int(panel.observed.sum()),
            len(spec.media()), len(spec.controls()), d.holdout_weeks, prepared.prepare_seconds,
        )  # fmt: skip
        return prepared

    def model_config(self, spec: MmmSpec, prepared: MmmPrepared):
        from distributed_hte.models.mmm import MmmConfig

        m = spec.model
        fit_weeks = int(np.flatnonzero(prepared.panel.fit.any(0)).max()) + 1
        return MmmConfig(
            n_regions=len(prepared.panel.regions),
            channels=spec.media(),
            controls=spec.controls(),
            fit_weeks=fit_weeks,
            adstock=m.adstock,
            max_lag=m.max_lag,
            hidden=m.hidden,
            fourier=m.fourier,
            season_period=m.season_period,
            hill_k_init=prepared.hill_k_init,
            hill_slope_init=m.hill_slope_init,
            hill_slope_min=m.hill_slope_min,
            huber_delta=m.huber_delta,
            tv_penalty=m.tv_penalty,
        )

    # -- fit --------------------------------------------------------------------------
    def fit(
        self, spec: MmmSpec, prepared: MmmPrepared, run: RunDir, callbacks: list | None = None
    ) -> None:
        import ray.data
        import torch

        from distributed_hte.kinds.mmm.plugin import MmmPlugin, region_rows
        from distributed_hte.train.trainer import fit, training_summary, warm_started

        if warm_started(run.path) and run.file("init", "source.json").exists():
            # A warm start's scalers (the life cycle maps the weights before the fit; on a
            # resume it does not, so apply them here too: idempotent).
            source = json.loads(run.file("init", "source.json").read_text())["run_dir"]
            reuse_scalers(prepared, toolkit.load_bundle(source, self.name))
        plugin = MmmPlugin(self.model_config(spec, prepared))
        p = prepared.panel
        rows = region_rows(scaled(p, prepared.scalers), p.fit, prepared.week)
        passes = spec.train.region_passes
        n_train = len(rows) * passes
        # Each pass is its own block, so shuffled block order mixes the passes.
        ds = ray.data.from_items(rows * passes, override_num_blocks=passes).materialize()
        log.info(
            "[fit] %d regions × %d passes per epoch, %d workers%s, %d epochs, %d regions per step",
            len(rows), passes, spec.scaling.num_workers,
            " on GPU" if spec.scaling.use_gpu else "", spec.train.epochs, spec.train.batch_size,
        )  # fmt: skip
        t0 = time.perf_counter()
        result = fit(
            per_worker_batch(spec), plugin, {"train": ds}, n_train, run.path, callbacks=callbacks
        )
        summary = training_summary(result, time.perf_counter() - t0, spec.scaling.num_workers)
        summary.update(prepare_seconds=prepared.prepare_seconds, regions=len(rows))
        state = torch.load(result.best_model_path, map_location="cpu", weights_only=True)
        write_json(run.file(FIT_FILE), {"training": summary, "history": result.history})
        arrays = prepared.scalers.to_arrays()

        def save_scalers(path: Path) -> None:
            with open(path, "wb") as f:
                np.savez(f, **arrays)

        p = prepared.panel

        def save_history(path: Path) -> None:
            # What predict needs to carry a plan on from the history: the media (adstock)
            # and the controls and calendar the GRU has run over.
            with open(path, "wb") as f:
                np.savez_compressed(f, media=p.media, controls=p.controls,
                                    observed=p.observed, holdout=p.holdout)  # fmt: skip

        toolkit.save_bundle(
            run.path,
            self.name,
            spec,
            {
                "plugin": plugin.to_config(),
                "columns": asdict(prepared.columns),
                "regions": prepared.panel.regions,
                "week_labels": prepared.panel.week_labels,
            },
            {
                "state.pt": lambda path: torch.save(state, path),
                "scalers.npz": save_scalers,
                "history.npz": save_history,
            },
        )
        if spec.uncertainty is not None:
            from distributed_hte.kinds.mmm.replicas import fit_replicas

            fit_replicas(spec, prepared, plugin, run.path)

    # -- warm start -------------------------------------------------------------------
    def warm_start_state(
        self, spec: MmmSpec, prepared: MmmPrepared, source: ModelBundle
    ) -> dict[str, Any]:
        """The source's weights mapped onto this spec's model (baselines by region id);
        ``prepared.scalers`` take the source's scalers (see :func:`reuse_scalers`)."""
        import torch

        from distributed_hte.models.mmm import DeepMMM

        src_state = reuse_scalers(prepared, source)
        model = DeepMMM(self.model_config(spec, prepared))
        state = model.state_dict()
        pos = {r: i for i, r in enumerate(source.config["regions"])}
        known = [(i, pos[r]) for i, r in enumerate(prepared.panel.regions) if r in pos]
        for k, v in src_state.items():
            if k == "baseline.weight":
                if known:
                    new_i, old_i = (torch.as_tensor(x) for x in zip(*known, strict=True))
                    state[k][new_i] = v[old_i].to(state[k].dtype)
            elif k in state and state[k].shape == v.shape:
                state[k] = v.clone()
            else:
                raise SpecError(
                    f"retrain.init_from: the source model's {k} has shape {tuple(v.shape)}, "
                    f"this spec's {tuple(state[k].shape) if k in state else 'none'}; a warm "
                    "start needs the same model settings (model.hidden, model.fourier, "
                    "model.adstock)"
                )
        log.info(
            "[warm start] from %s: %d of %d regions known (their scalers and baselines kept)",
            source.run_dir, len(known), len(prepared.panel.regions),
        )  # fmt: skip
        return state

    # -- evaluate / report ------------------------------------------------------------
    @staticmethod
    def _bundle_parts(bundle: ModelBundle):
        from distributed_hte.kinds.mmm.plugin import MmmPlugin, load_model

        plugin = MmmPlugin.from_config(bundle.config["plugin"])
        model = load_model(plugin.model, bundle.state_dict())
        with np.load(bundle.path("scalers"), allow_pickle=False) as z:
            scalers = Scalers.from_arrays(dict(z))
        return plugin, model, scalers

    def evaluate(
        self, bundle: ModelBundle, data_path: str, rows: RowFilter | None = None
    ) -> dict[str, Any]:
        """Train and holdout fit of the bundle's model on ``data_path`` (same regions and
        week grid), with the bundle's own scalers."""
        from distributed_hte.kinds.mmm.report import panel_metrics

        if rows is not None:
            raise SpecError(
                "mmm evaluates whole region series (its holdout is the last data.holdout_weeks "
                "of each region): write the panel to evaluate as its own dataset"
            )
        _, model, scalers = self._bundle_parts(bundle)
        cols = Columns(**bundle.config["columns"])
        cols.expected = None
        panel = read_panel(data_path, cols)
        panel = _align(panel, bundle)
        from distributed_hte.kinds.mmm.plugin import decompose

        week = np.arange(len(panel.week_labels), dtype=np.float64)
        dec = decompose(model, scaled(panel, scalers), scalers.kpi_scale, week)
        m = panel_metrics(panel, dec["pred"])
        out = {f"{split}_{k}": v for split in ("train", "holdout") for k, v in m[split].items()
               if not isinstance(v, dict)}  # fmt: skip
        # Unprefixed: the holdout figures, what a retrain gate (default val_r2) compares.
        out.update({k: v for k, v in m["holdout"].items() if not isinstance(v, dict)})
        return out

    def report(
        self, spec: MmmSpec, prepared: MmmPrepared, run: RunDir, bundle: ModelBundle
    ) -> dict[str, Any]:
        from distributed_hte.kinds.mmm import report as rep

        plugin, model, scalers = self._bundle_parts(bundle)
        fitted = json.loads((run.path / FIT_FILE).read_text())
        metrics = rep.write_outputs(spec, prepared, run, plugin.model, model, scalers)
        metrics["training"] = fitted["training"]
        write_json(run.file("metrics.json"), metrics)
        toolkit.write_history(run, fitted["history"], spec.name, "loss (Huber + penalty)")
        return metrics

    # -- predict ----------------------------------------------------------------------
    def predict(self, run_dir: Path, data_path: str, out_path: Path) -> dict[str, Any]:
        """KPI and every component for the weeks of a plan, carrying on from the history.

        ``data_path``: region, week, media and control columns (a KPI column is ignored)
        for consecutive weeks of some of the model's regions. The plan replaces the
        history from its first week, which is at most the week after the history; the
        history before it gives the carry-over (adstock) and runs the GRU up to it. So a
        plan of future weeks is a forecast, and a plan equal to history weeks gives the
        in-sample decomposition. Output per region-week: ``prediction``, one column per
        component, ``future`` (after the history) and ``holdout`` (one of the fit's
        held-out weeks).
        """
        import ray.data

        from distributed_hte.kinds.mmm.data import grid_labels, read_plan
        from distributed_hte.kinds.mmm.plugin import decompose

        bundle = toolkit.load_bundle(run_dir, self.name)
        toolkit.check_new_output(out_path)
        if "history" not in bundle.files:
            raise DataError(
                f"{run_dir} was fitted before mmm runs kept their history (model/history.npz); "
                "predict needs it for the carry-over: fit the run again"
            )
        plugin, model, scalers = self._bundle_parts(bundle)
        cols = Columns(**bundle.config["columns"])
        labels = bundle.config["week_labels"]
        plan = read_plan(data_path, cols, bundle.config["regions"], labels)
        with np.load(bundle.path("history"), allow_pickle=False) as z:
            hist = {k: z[k] for k in ("media", "controls", "holdout")}
        r, s, w = plan.region_index, plan.start, plan.weeks
        media = np.concatenate([hist["media"][r, :s], plan.media], axis=1)
        controls = np.concatenate([hist["controls"][r, :s], plan.controls], axis=1)
        inputs = {
            "y": np.zeros(media.shape[:2]),
            "media": media / scalers.media_scale[r, None, :],
            "controls": (controls - scalers.control_mean) / scalers.control_sd,
        }
        week = np.arange(s + w, dtype=np.float64)
        dec = decompose(model, inputs, scalers.kpi_scale[r], week, region=r)
        cfg = plugin.model
        cols_out: dict[str, np.ndarray] = {
            "prediction": dec["pred"][:, s:],
            "baseline": dec["baseline"][:, s:],
            "trend": dec["trend"][:, s:],
            "seasonality": dec["seasonality"][:, s:],
        }
        for k, name in enumerate(cfg.controls):
            cols_out[name] = dec["controls"][:, s:, k]
        for c, name in enumerate(cfg.channels):
            cols_out[name] = dec["media"][:, s:, c]
        t_hist = len(labels)
        idx = np.arange(s, s + w)
        held = np.zeros((len(r), w), dtype=bool)
        inside = idx < t_hist
        held[:, inside] = hist["holdout"][r][:, idx[inside]]
        regions = np.asarray(bundle.config["regions"], dtype=object)[r]
        import pandas as pd

        frame = pd.DataFrame(
            {
                "region": np.repeat(regions, w),
                "week": np.tile(np.asarray(grid_labels(labels, s + w)[s:], dtype=object), len(r)),
                **{k: v.ravel() for k, v in cols_out.items()},
                "future": np.tile(idx >= t_hist, len(r)),
                "holdout": held.ravel(),
            }
        )
        log.info(
            "[predict] %d region(s) × %d week(s) from %s (%d after the history)",
            len(r), w, frame["week"].iloc[0], int((idx >= t_hist).sum()),
        )  # fmt: skip
        return toolkit.write_predictions(ray.data.from_pandas(frame), out_path)


def reuse_scalers(prepared: MmmPrepared, source: ModelBundle) -> dict[str, Any]:
    """Give ``prepared`` the source bundle's scalers (idempotent); return its state.

    Regions the source knew keep its ``kpi_scale`` and ``media_scale``; the controls keep
    its mean and SD. Regions new to it keep the scalers fitted on this data. DataError
    when the channels, controls or the week grid's first week differ.
    """
    cols = Columns(**source.config["columns"])
    if cols.media != prepared.columns.media or cols.controls != prepared.columns.controls:
        raise DataError(
            f"retrain.init_from: the source model has channels {cols.media} and controls "
            f"{cols.controls}; this data has {prepared.columns.media} and "
            f"{prepared.columns.controls}: a warm start needs the same ones"
        )
    first = source.config["week_labels"][0]
    if prepared.panel.week_labels[0] != first:
        raise DataError(
            f"retrain.init_from: the source model's weeks start at {first}, this data's at "
            f"{prepared.panel.week_labels[0]}; seasonality and trend count weeks from the "
            "first one, so a refresh keeps the source's first week (append weeks, do not drop)"
        )
    with np.load(source.path("scalers"), allow_pickle=False) as z:
        old = Scalers.from_arrays(dict(z))
    pos = {r: i for i, r in enumerate(source.config["regions"])}
    s = prepared.scalers
    for i, r in enumerate(prepared.panel.regions):
        if r in pos:
            s.kpi_scale[i] = old.kpi_scale[pos[r]]
            s.media_scale[i] = old.media_scale[pos[r]]
    s.control_mean[:] = old.control_mean
    s.control_sd[:] = old.control_sd
    return source.state_dict()


def _align(panel: Panel, bundle: ModelBundle) -> Panel:
    """``panel`` re-indexed to the bundle's regions; DataError for regions or weeks the
    model does not know."""
    regions = bundle.config["regions"]
    labels = bundle.config["week_labels"]
    pos = {r: i for i, r in enumerate(regions)}
    unknown = [r for r in panel.regions if r not in pos]
    if unknown:
        raise DataError(
            f"{len(unknown)} region(s) of the data are not in the fitted model, e.g. "
            f"{unknown[:5]}; the model scores the regions it was fitted on"
        )
    if panel.week_labels[0] != labels[0] or len(panel.week_labels) > len(labels):
        raise DataError(
            f"the data's weeks ({panel.week_labels[0]} to {panel.week_labels[-1]}) are not the "
            f"model's week grid ({labels[0]} to {labels[-1]})"
        )
    r_n, t_n = len(regions), len(labels)
    idx = np.array([pos[r] for r in panel.regions])

    def place(a: np.ndarray) -> np.ndarray:
        out = np.zeros((r_n, t_n) + a.shape[2:], dtype=a.dtype)
        out[idx, : a.shape[1]] = a
        return out

    return Panel(
        regions=list(regions),
        week_labels=list(labels),
        kpi=place(panel.kpi),
        media=place(panel.media),
        spend=place(panel.spend),
        controls=place(panel.controls),
        observed=place(panel.observed),
        holdout=place(panel.holdout),
        has_spend=panel.has_spend,
        ragged=panel.ragged,
    )


KIND = MmmKind
