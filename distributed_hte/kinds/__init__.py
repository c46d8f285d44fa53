"""Model-kind registry: ``kind:`` in a spec selects one of these.

A kind is a package ``kinds/<name>/``: ``spec.py`` (its spec sections; imports neither
torch nor Ray, so ``dhte validate`` stays light), ``plugin.py`` (what Ray Train workers
and Ray Data tasks run), ``report.py`` (artefacts, plots, tables) and ``__init__.py``
(the :class:`Kind`). The runner, the CLI and Tune only ever talk to this interface, so a
new family plugs in by adding a package and one line in ``_REGISTRY``.

Stages: ``fit`` writes a model bundle into the run directory → ``evaluate`` scores any
model bundle on any dataset → ``report`` writes metrics and artefacts. ``execute`` runs
them and skips ``fit`` when the run directory already holds a complete bundle fitted
from the same spec, so a failed report is redone without training again.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from distributed_hte.errors import RunDirError, SpecError
from distributed_hte.rundir import RunDir
from distributed_hte.spec import JobSpec

if TYPE_CHECKING:
    from distributed_hte.kinds.toolkit import ModelBundle, RowFilter

log = logging.getLogger(__name__)

# kind name -> package; its spec module is "<package>.spec" with SPEC (the spec class) and
# the package itself defines KIND (the Kind subclass). Imported lazily.
_REGISTRY: dict[str, str] = {
    "fe_hte": "distributed_hte.kinds.fe_hte",
    "segments": "distributed_hte.kinds.segments",
    "interference": "distributed_hte.kinds.interference",
    "interference_coverage": "distributed_hte.kinds.interference_coverage",
    "aipw_segments": "distributed_hte.kinds.aipw_segments",
    "mmm": "distributed_hte.kinds.mmm",
}


class Kind(ABC):
    """One model family's stages. Methods orchestrate; numbers happen elsewhere."""

    name: ClassVar[str]
    spec_class: ClassVar[type[JobSpec]]
    # Run-directory entries the kind documents and writes (besides spec/status/metrics);
    # a sweep promotes them from the best trial.
    artefacts: ClassVar[list[str]] = []
    # A study has no model: nothing to evaluate or predict, no sweep over it.
    is_study: ClassVar[bool] = False

    # What a warm start (``retrain.init_from``) means for this kind; None: it cannot, and
    # ``cannot_warm_start`` says why (the run then fails at once with exit 2).
    warm_start: ClassVar[str | None] = None
    cannot_warm_start: ClassVar[str] = "it has no trained weights a new fit could start from"

    # -- hooks with defaults ---------------------------------------------------------
    def warm_start_state(self, spec: JobSpec, prepared: Any, source: ModelBundle) -> Any:
        """The initial ``state_dict`` of this spec's model, mapped from ``source`` (a
        complete model of the same kind), or None when a warm start changes nothing for
        this spec. The life cycle writes it to ``<run>/init/state.pt``; the training loop
        starts from it (never over a checkpoint it resumes from)."""
        raise SpecError(
            f"kind {self.name!r} cannot warm start: {self.cannot_warm_start}; set "
            "retrain.init_from: null"
        )

    def report_iterations(self, spec: JobSpec) -> int:
        """How many intermediate results one ``fit`` reports (ASHA's time axis)."""
        return spec.train.epochs

    def after_sweep(self, spec: JobSpec, run: RunDir, table: Any) -> None:
        """Kind-specific summaries of a finished sweep (``table``: one row per trial)."""
        return None

    def simulation(self, spec: JobSpec) -> tuple[Any, Callable[..., Any]] | None:
        """The simulator config of the spec's ``simulate`` section and its writer
        ``write(config, out, progress=...)``; None for a kind without a simulator."""
        return None

    def simulate(self, spec: JobSpec, progress: bool = True) -> Path:
        """Generate the dataset the spec's ``simulate`` section describes; return its path.

        Simulates once: a folder whose marker records the same section is reused.
        """
        from distributed_hte.kinds.toolkit import simulate_once

        found = self.simulation(spec) if getattr(spec, "simulate", None) is not None else None
        if found is None:
            raise SpecError(f"kind {self.name!r} has no simulator")
        cfg, write = found
        return simulate_once(
            self.name, spec, asdict(cfg), lambda out: write(cfg, out, progress=progress)
        )

    # -- stages ----------------------------------------------------------------------
    def requirements(self, spec: JobSpec) -> list[Any]:
        """The columns ``data.path`` must have (``ColumnRequirement`` s)."""
        return []

    def check(self, spec: JobSpec) -> None:
        """Metadata-only checks of ``data.path`` (exists, non-empty, columns, types, nulls).

        Needs no Ray, so bad data fails in a second, before any cluster work.
        """
        from distributed_hte.data.schema import check_schema

        check_schema(spec.data.path, self.requirements(spec))

    @abstractmethod
    def prepare(self, spec: JobSpec) -> Any:
        """Check the data (schema, nulls, NaN, empty, truth files) and compute what fitting needs.

        Runs before the run directory exists, so bad data writes nothing.
        """

    @abstractmethod
    def fit(self, spec: JobSpec, prepared: Any, run: RunDir, callbacks: list | None = None) -> None:
        """Train and write a complete model bundle into ``run`` (``model/``)."""

    @abstractmethod
    def evaluate(
        self, bundle: ModelBundle, data_path: str, rows: RowFilter | None = None
    ) -> dict[str, Any]:
        """Score the model of ``bundle`` on ``data_path`` (optionally only ``rows``).

        The same metric code the run's own report uses, so a champion and a challenger
        are compared on equal terms.
        """

    @abstractmethod
    def report(
        self, spec: JobSpec, prepared: Any, run: RunDir, bundle: ModelBundle
    ) -> dict[str, Any]:
        """Write ``metrics.json`` and the kind's artefacts from a fitted bundle; return the metrics."""

    @abstractmethod
    def predict(self, run_dir: Path, data_path: str, out_path: Path) -> dict[str, Any]:
        """Score ``data_path`` with the model of a complete run, writing parquet to ``out_path``."""

    def execute(
        self, spec: JobSpec, prepared: Any, run: RunDir, callbacks: list | None = None
    ) -> dict[str, Any]:
        """fit (unless ``run`` already holds this spec's fitted bundle) → report."""
        from distributed_hte.kinds.toolkit import load_bundle, spec_fingerprint

        wanted = spec_fingerprint(spec)
        try:
            bundle = load_bundle(run.path, self.name, require_complete_run=False)
        except RunDirError:
            bundle = None
        if bundle is not None and bundle.spec_fingerprint != wanted:
            log.info("[fit] the model in %s was fitted from another spec: fitting again", run.path)
            bundle = None
        if bundle is None:
            self.fit(spec, prepared, run, callbacks)
            bundle = load_bundle(run.path, self.name, require_complete_run=False)
            run.stage_done("fit")
        else:
            log.info("[fit] %s already holds the fitted model: not training again", run.path)
        metrics = self.report(spec, prepared, run, bundle)
        run.stage_done("report")
        return metrics


def kind_names() -> list[str]:
    """Registered kind names."""
    return sorted(_REGISTRY)


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise SpecError(f"unknown kind {name!r}; allowed kinds: {', '.join(kind_names())}")


def spec_class(name: str) -> type[JobSpec]:
    """The spec class of kind ``name``, importing neither torch nor Ray."""
    _check_name(name)
    return importlib.import_module(f"{_REGISTRY[name]}.spec").SPEC


def get_kind(name: str) -> Kind:
    """Instantiate the kind registered under ``name``."""
    _check_name(name)
    return importlib.import_module(_REGISTRY[name]).KIND()
