"""Job specs: YAML → one frozen, validated pydantic object.

The sections every kind shares live here (`scaling`, `train`, `tune`, `outputs`,
`runtime`). A kind adds its own `data`, `model`, `simulate` and `estimate` sections by
subclassing :class:`JobSpec` and registering itself in :mod:`distributed_hte.kinds`.

Errors name the field path (``train.lr``), the value found and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from distributed_hte.errors import SpecError


class StrictModel(BaseModel):
    """Base for every spec section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NetSpec(StrictModel):
    """A network's hidden widths and activation; kinds subclass it to set defaults."""

    hidden: list[int] = Field(default_factory=list)
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"

    def config(self):
        """The :class:`~distributed_hte.models.config.MLPConfig` it describes."""
        from distributed_hte.models.config import MLPConfig

        extra = self.model_dump(exclude={"hidden", "activation"})
        return MLPConfig(tuple(self.hidden), activation=self.activation, **extra)


class ScalingSpec(StrictModel):
    """How many Ray Train workers, and what each one gets."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    max_failures: int = Field(
        2,
        ge=-1,
        description="worker-group restarts Ray Train makes after a worker dies (from the last "
        "checkpoint); -1: unlimited, 0: a dead worker fails the run",
    )


def _is_positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


class TrainSpec(StrictModel):
    """Optimisation settings shared by every neural kind.

    Early stopping respects the LR schedule (``distributed_hte/train/schedule.py``): with
    ``lr_schedule: cosine``, a plateau of ``early_stopping_patience`` epochs while the LR
    is still high starts a compressed cosine decay to the schedule's floor over
    ``early_stopping_patience`` epochs; the run stops only once the LR has decayed and the
    loss has not improved for ``early_stopping_patience`` epochs. With ``constant`` it is
    plain patience. The best epoch's weights are kept either way.
    """

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(4096, ge=1)
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    early_stopping_patience: int | None = Field(3, ge=1)
    amp: bool = False
    seed: int = 0
    log_every_s: float = Field(10.0, gt=0)
    shuffle: bool = Field(
        True,
        description="fresh seeded row order every epoch: file/block order plus a local buffer",
    )
    shuffle_buffer_rows: int = Field(
        100_000,
        ge=0,
        description="rows in each worker's local shuffle buffer (0: file/block order only)",
    )
    reproducible: bool = Field(
        True,
        description="Ray Data keeps block order, so shards and their order depend only on "
        "the seed (false: blocks go to whichever worker asks first; faster, not repeatable)",
    )
    convergence_tol: float = Field(
        1e-3,
        gt=0,
        description="the loss still falls if it improved by more than this (relative, per "
        "epoch) over the last epochs",
    )
    require_convergence: bool = Field(
        False,
        description="a run whose convergence verdict is negative exits with code 3 "
        "(its outputs are kept)",
    )
    checkpoint_every: int | str = Field(
        "60s",
        description="checkpoint every N epochs (an integer) or every N seconds ('60s'); "
        "the last epoch is always checkpointed. A restarted run resumes from the last "
        "checkpoint and trains the epochs after it again, with the same row order",
    )

    @field_validator("checkpoint_every")
    @classmethod
    def _checkpoint_every(cls, value: int | str) -> int | str:
        if isinstance(value, int):
            if value < 1:
                raise ValueError("checkpoint_every must be ≥ 1 epochs, or seconds like '60s'")
            return value
        text = str(value).strip().lower()
        if text.isdigit():
            return cls._checkpoint_every(int(text))
        if not (text.endswith("s") and _is_positive_number(text[:-1])):
            raise ValueError(
                f"checkpoint_every {value!r} is neither epochs (an integer ≥ 1) nor "
                "seconds like '60s'"
            )
        return text


class AshaSpec(StrictModel):
    """Asynchronous successive halving: stop poor trials early (per epoch)."""

    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)


class ParamSpace(StrictModel):
    """One swept parameter: exactly one of the fields is given."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ParamSpace:
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of grid, choice, uniform, loguniform, randint (found {given or 'none'})"
            )
        return self


class TuneSpec(StrictModel):
    """Ray Tune sweep over spec fields addressed by dotted path (e.g. ``train.lr``)."""

    params: dict[str, ParamSpace] = Field(min_length=1)
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    search: Literal["grid", "random"] = "grid"
    num_samples: int = Field(1, ge=1)
    scheduler: Literal["fifo", "asha"] = "fifo"
    asha: AshaSpec = AshaSpec()
    max_concurrent_trials: int | None = Field(None, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _grid_only_in_grid_search(self) -> TuneSpec:
        for path, space in self.params.items():
            if self.search == "random" and space.grid is not None:
                raise ValueError(f"params.{path}: 'grid' needs search: grid (use 'choice')")
        return self


class OutputsSpec(StrictModel):
    """Where run directories go: ``<dir>/<name>/<run-id>/``."""

    dir: str = "runs"

    @model_validator(mode="after")
    def _filesystem_path(self) -> OutputsSpec:
        if "://" in self.dir:
            raise ValueError(
                f"outputs.dir must be a filesystem path every node can see (local disk, NFS, a mounted bucket); found URI {self.dir!r}"
            )
        return self


class RuntimeSpec(StrictModel):
    """Which Ray to use. No address: an embedded local Ray sized for this machine."""

    address: str | None = None
    runtime_env: dict[str, Any] | None = None
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of an embedded Ray")
    object_store_gb: float | None = Field(
        None, gt=0, description="object store of an embedded Ray (default: Ray's, 30% of RAM)"
    )


class RegistrySpec(StrictModel):
    """Where complete runs are registered as model versions (MLflow)."""

    uri: str | None = Field(
        None,
        description="MLflow tracking/registry URI (http://host:5000, postgresql://...); "
        "null: an embedded SQLite registry at <outputs.dir>/mlflow.db",
    )
    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="registered model name")


class HoldoutSpec(StrictModel):
    """The rows champion and challenger are both scored on: a fixed dataset (``path``,
    recommended) or the rows of ``data.path`` with ``column`` in ``[from, to)``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    path: str | None = None
    column: str | None = None
    from_: Any = Field(None, alias="from")
    to: Any = None

    @model_validator(mode="after")
    def _path_or_column(self) -> HoldoutSpec:
        if (self.path is None) == (self.column is None):
            raise ValueError("give exactly one of path (a fixed evaluation set) or column")
        if self.column is None and (self.from_ is not None or self.to is not None):
            raise ValueError("from/to select rows by column; they need column")
        if self.column is not None and self.from_ is None and self.to is None:
            raise ValueError("column needs from and/or to (the holdout rows are [from, to))")
        return self


class GateSpec(StrictModel):
    """Promote when the challenger beats the champion on the holdout by ``min_delta``."""

    metric: str = Field(
        "val_r2",
        description="a metric the kind's evaluate reports (r2, rmse, ...); a val_ or "
        "holdout_ prefix is accepted",
    )
    mode: Literal["min", "max"] = "max"
    min_delta: float = Field(0.0, ge=0.0)


class RetrainSpec(StrictModel):
    """Champion/challenger retrains (needs ``registry``)."""

    holdout: HoldoutSpec
    gate: GateSpec = GateSpec()
    init_from: str | None = Field(
        None, description="warm start: 'champion' or a complete run directory; null: cold"
    )
    max_psi: float | None = Field(
        None,
        gt=0,
        description="refuse to train when a feature's PSI against the champion's data "
        "exceeds this (null: report the shift, never refuse)",
    )


class JobSpec(StrictModel):
    """The sections every kind shares. Kinds subclass this and add theirs."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: str
    scaling: ScalingSpec = ScalingSpec()
    train: TrainSpec = TrainSpec()
    tune: TuneSpec | None = None
    outputs: OutputsSpec = OutputsSpec()
    runtime: RuntimeSpec = RuntimeSpec()
    registry: RegistrySpec | None = None
    retrain: RetrainSpec | None = None

    @model_validator(mode="after")
    def _kind_checks(self) -> JobSpec:
        if self.retrain is not None and self.registry is None:
            raise ValueError("retrain needs a registry section (where the champion lives)")
        if self.retrain is not None and self.tune is not None:
            raise ValueError(
                "retrain and tune cannot be combined yet: sweep first, then retrain the "
                "chosen configuration"
            )
        self.check_kind()
        return self

    def check_kind(self) -> None:
        """A kind's cross-field checks (raise ValueError); none by default."""

    def check_data_columns(self, used: list[str], roles: str) -> None:
        """For a kind's validator: ``data.path`` unless simulated; no column named twice.

        ``used``: every column the ``data`` section names; ``roles``: how the error lists
        the fields that name them.
        """
        if getattr(self.data, "path", None) is None and getattr(self, "simulate", None) is None:
            raise ValueError("data.path is required unless a simulate section generates the data")
        dupes = sorted({c for c in used if used.count(c) > 1})
        if dupes:
            raise ValueError(f"data: column(s) {dupes} are named more than once across {roles}")

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain JSON-able data (what a run directory stores)."""
        return self.model_dump(mode="json", by_alias=True)

    def fingerprint(self, section: str) -> str:
        """Short stable hash of one section, used to cache simulated data."""
        blob = json.dumps(self.to_dict().get(section), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a", "b", "c"], value); the value is read as YAML."""
    if "=" not in text:
        raise SpecError(
            f"override {text!r} is not of the form key.path=value (e.g. train.epochs=2)"
        )
    key, _, raw = text.partition("=")
    path = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in path):
        raise SpecError(f"override {text!r} has an empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise SpecError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b=value`` override set (sections created)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(out, path, value, where=text)
    return out


def set_dotted(tree: dict[str, Any], path: list[str], value: Any, where: str = "") -> None:
    """Set ``tree[path[0]][path[1]]... = value``, creating missing sections."""
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            dotted = ".".join(path[: i + 1])
            raise SpecError(f"override {where!r}: {dotted} is a value ({child!r}), not a section")
        node = child
    node[path[-1]] = value


def _format_validation_error(exc: ValidationError, source: str, spec_cls: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(spec_cls, err["loc"][:-1])
            hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"{loc}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"{loc}: required field is missing")
        else:
            found = err.get("input")
            shown = (
                f"{found!r} ({type(found).__name__})"
                if not isinstance(found, dict)
                else "a mapping"
            )
            lines.append(f"{loc}: found {shown}; {err['msg']}")
    return f"invalid job spec {source}: " + "; ".join(lines)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the spec section at ``loc`` (best effort for error messages)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _first_model_type(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return []


def _first_model_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _first_model_type(arg)
        if found is not None:
            return found
    return None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a spec file into a mapping; YAML syntax errors become SpecError."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"job spec {path} does not exist (or is not a file)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"job spec {path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(raw, dict):
        raise SpecError(
            f"job spec {path} must be a mapping of sections, found {type(raw).__name__}"
        )
    return raw


def validate_spec(raw: dict[str, Any], source: str = "<spec>") -> JobSpec:
    """Validate a raw mapping against the spec class of its ``kind``."""
    from distributed_hte.kinds import kind_names, spec_class

    kind = raw.get("kind")
    if kind is None:
        raise SpecError(
            f"invalid job spec {source}: kind: required field is missing; allowed: {', '.join(kind_names())}"
        )
    if not isinstance(kind, str) or kind not in kind_names():
        raise SpecError(
            f"invalid job spec {source}: kind: found {kind!r}; allowed kinds: {', '.join(kind_names())}"
        )
    spec_cls = spec_class(kind)
    try:
        return spec_cls.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(exc, source, spec_cls)) from exc


AS_OF_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z_.:+-]*$"


def fill_as_of(raw: Any, as_of: str) -> Any:
    """``raw`` with ``{as_of}`` replaced by ``as_of`` in every string (a scheduled tick)."""
    import re

    if not re.match(AS_OF_PATTERN, as_of):
        raise SpecError(
            f"--as-of {as_of!r} must be a date or timestamp (letters, digits, - _ . : +), "
            "e.g. 2026-11-24 or 2026-11-24T02:00:00Z"
        )
    if isinstance(raw, str):
        return raw.replace("{as_of}", as_of)
    if isinstance(raw, dict):
        return {k: fill_as_of(v, as_of) for k, v in raw.items()}
    if isinstance(raw, list):
        return [fill_as_of(v, as_of) for v in raw]
    return raw


def load_spec(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), as_of: str | None = None
) -> JobSpec:
    """Load, override and validate a job spec file (``as_of``: fill ``{as_of}`` first)."""
    raw = apply_overrides(read_yaml(path), overrides)
    if as_of is not None:
        raw = fill_as_of(raw, as_of)
    return validate_spec(raw, source=str(path))


def with_overrides(spec: JobSpec, values: dict[str, Any]) -> JobSpec:
    """Return ``spec`` with dotted-path ``values`` set (used by Tune trials)."""
    raw = spec.to_dict()
    for dotted, value in values.items():
        set_dotted(raw, dotted.split("."), value, where=dotted)
    return validate_spec(raw, source=f"(tune overrides {values})")
