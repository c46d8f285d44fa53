"""Model-kind registry: ``kind:`` in a spec selects one of these.

A kind is a :class:`Kind` subclass: its spec class (the typed ``data``/``model``/
``simulate`` sections), a simulator, a data check, the training/estimation stages and
a predictor. The runner, the CLI and Tune only ever talk to this interface, so a new
family plugs in by adding a module and one line in ``_REGISTRY``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from distributed_hte.errors import SpecError
from distributed_hte.rundir import RunDir
from distributed_hte.spec import JobSpec

# kind name -> "module:Class"; imported lazily so `dhte validate` stays light.
_REGISTRY: dict[str, str] = {
    "fe_hte": "distributed_hte.kinds.fe_hte:FeHteKind",
    "segments": "distributed_hte.kinds.segments:SegmentsKind",
    "interference": "distributed_hte.kinds.interference:InterferenceKind",
    "interference_coverage": "distributed_hte.kinds.interference_coverage:InterferenceCoverageKind",
}


class Kind(ABC):
    """One model family's stages. Methods orchestrate; numbers happen elsewhere."""

    name: ClassVar[str]
    spec_class: ClassVar[type[JobSpec]]
    # Run-directory entries of the best trial that a sweep promotes, besides the common ones.
    artefacts: ClassVar[list[str]] = []

    def report_iterations(self, spec: JobSpec) -> int:
        """How many intermediate results one ``execute`` reports (ASHA's time axis)."""
        return spec.train.epochs

    def after_sweep(self, spec: JobSpec, run: RunDir, table: Any) -> None:
        """Kind-specific summaries of a finished sweep (``table``: one row per trial)."""
        return None

    def simulated_data_path(self, spec: JobSpec) -> Path | None:
        """Where the spec's ``simulate`` section puts its data (None: no simulate section)."""
        return None

    def simulate(self, spec: JobSpec, progress: bool = True) -> Path:
        """Generate the dataset the spec's ``simulate`` section describes; return its path."""
        raise SpecError(f"kind {self.name!r} has no simulator")

    @abstractmethod
    def check(self, spec: JobSpec) -> None:
        """Metadata-only checks of ``data.path`` (exists, non-empty, columns, types, nulls).

        Needs no Ray, so bad data fails in a second, before any cluster work.
        """

    @abstractmethod
    def prepare(self, spec: JobSpec) -> Any:
        """Check the data (schema, nulls, NaN, empty) and compute what training needs.

        Runs before the run directory exists, so bad data writes nothing.
        """

    @abstractmethod
    def execute(
        self, spec: JobSpec, prepared: Any, run: RunDir, callbacks: list | None = None
    ) -> dict[str, Any]:
        """Fit, estimate and write artefacts into ``run``; return the metrics."""

    @abstractmethod
    def predict(self, run_dir: Path, data_path: str, out_path: Path) -> dict[str, Any]:
        """Score ``data_path`` with the model of a complete run, writing parquet to ``out_path``."""


def kind_names() -> list[str]:
    """Registered kind names."""
    return sorted(_REGISTRY)


def get_kind(name: str) -> Kind:
    """Instantiate the kind registered under ``name``."""
    if name not in _REGISTRY:
        raise SpecError(f"unknown kind {name!r}; allowed kinds: {', '.join(kind_names())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()
