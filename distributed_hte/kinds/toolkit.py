"""What every kind shares: simulate-once, the truth convention, parquet reading, the
model bundle, the per-process model cache of ``map_batches`` tasks, atomic predictions,
the training summary and the plot helper.

Nothing here imports torch or Ray at module level: kind packages import this from their
``__init__`` and their spec must stay importable without either.

Ground truth
------------
Truth is read only (a) from a path the spec names, or (b) when the data folder was
written by this project's simulator: ``<data>/../simulation.json`` names the producer
(``distributed_hte``), the kind and the schema version (:mod:`distributed_hte.simulate.marker`). Files that merely
sit beside user data (a colleague's ``truth/`` or ``truth.json``) are never guessed.

Model bundle
------------
``<run>/model/bundle.json`` (plain JSON: format, kind, the spec fingerprint, the kind's
config) plus the weights it names (``state.pt``: a torch ``state_dict`` loadable with
``weights_only=True``; or ``arrays.npz``). ``bundle.json`` is written last, atomically:
its presence means the fit is complete.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads

from distributed_hte.errors import DataError, RunDirError, SpecError
from distributed_hte.rundir import COMPLETE, write_json
from distributed_hte.simulate.marker import (
    SIMULATION_MARKER,
    SIMULATION_SCHEMA_VERSION,
    read_simulation_marker,
)

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "distributed_hte.model_bundle"
BUNDLE_VERSION = 1
BUNDLE_FILE = "bundle.json"
# Spec sections that do not change what is fitted (where it runs, where it is written).
_NOT_FITTED = ("outputs", "runtime", "tune", "name")


# ----------------------------------------------------------------------------- data


def read_parquet(path: str, columns: list[str] | None = None, train=None):
    """A Ray Dataset over the ``*.parquet`` files under ``path`` (other files ignored).

    ``train``: the spec's ``train`` section when the rows feed SGD: files are then read in
    a fresh seeded order every epoch (``train.shuffle``), not in their stored order.
    """
    import ray.data

    shuffle = None
    if train is not None:
        from distributed_hte.train.ingest import file_shuffle

        shuffle = file_shuffle(train)
    return ray.data.read_parquet(
        path, columns=columns, file_extensions=["parquet"], shuffle=shuffle
    )


# A pass over at most this many rows runs in the driver (pyarrow batches, one at a time)
# instead of a Ray Data pipeline, whose start-up costs seconds on a small job.
DRIVER_PASS_MAX_ROWS = 1_000_000


def local_parquet_dataset(path: str) -> pads.Dataset:
    """A pyarrow dataset over the same rows and columns as :func:`read_parquet`.

    ``*.parquet`` files only, none whose path under ``path`` starts with ``_`` or ``.``,
    in sorted order; hive partition columns (``date=...``) as strings, as Ray Data reads
    them.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    if "://" in path:
        fs, root = pafs.FileSystem.from_uri(path)
    else:
        fs, root = pafs.LocalFileSystem(), os.path.abspath(path)
    if fs.get_file_info(root).type == pafs.FileType.File:
        files, keys = [root], []
    else:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
        files, keys = [], []
        for info in sorted(infos, key=lambda i: i.path):
            relative = os.path.relpath(info.path, root)
            # Ray Data's rule: skip paths whose part under the root starts with "." or "_"
            if (
                info.is_file
                and info.path.endswith(".parquet")
                and not relative.startswith((".", "_"))
            ):
                files.append(info.path)
                keys += [p.split("=", 1)[0] for p in relative.split("/")[:-1] if "=" in p]
    keys = list(dict.fromkeys(keys))
    partitioning = (
        pads.partitioning(pa.schema([(k, pa.string()) for k in keys]), flavor="hive")
        if keys
        else None
    )
    return pads.dataset(
        files,
        filesystem=fs,
        format="parquet",
        partitioning=partitioning,
        partition_base_dir=root,
    )


def driver_sized(path: str) -> pads.Dataset | None:
    """:func:`local_parquet_dataset` when it holds at most :data:`DRIVER_PASS_MAX_ROWS`
    rows (a pass over it belongs in the driver), else None (use Ray Data)."""
    local = local_parquet_dataset(path)
    return local if local.count_rows() <= DRIVER_PASS_MAX_ROWS else None


def read_parquet_head(path: str, columns: list[str], rows: int):
    """The first ``rows`` rows (pandas, ``(≤ rows, len(columns))``) of the data under
    ``path`` (as :func:`local_parquet_dataset` sees it), read in this process.

    For plots and spot checks: a Ray Data pipeline costs seconds of start-up for what
    pyarrow reads in milliseconds.
    """
    return local_parquet_dataset(path).head(rows, columns=columns).to_pandas()


@dataclass(frozen=True, slots=True)
class RowFilter:
    """Rows whose ``column`` lies in ``[low, high)`` (either bound optional)."""

    column: str
    low: Any = None
    high: Any = None

    def mask(self, batch: dict[str, Any]):
        """``(n,)`` bool of the batch's selected rows."""
        import numpy as np

        values = np.asarray(batch[self.column])
        keep = np.ones(len(values), dtype=bool)
        if self.low is not None:
            keep &= values >= self.low
        if self.high is not None:
            keep &= values < self.high
        return keep


_SUMS_BATCH_ROWS = 65_536


def batch_sums(
    path: str, columns: list[str], fn: Callable[..., Any], **kwargs: Any
) -> dict[str, float]:
    """Run ``fn(batch, **kwargs)`` (one row of additive sums per batch) over ``path`` and
    add the rows up.

    ``take_all`` of one row per batch, not ``Dataset.sum``: an aggregation shuffles, and its
    tasks cannot be placed inside a Tune trial's placement group. Data of at most
    :data:`DRIVER_PASS_MAX_ROWS` rows is summed in the driver, one batch at a time, with
    the batches Ray Data would have made (same rows, same numpy conversion).
    """
    out: dict[str, float] = {}

    def add(row: dict[str, Any]) -> None:
        for k, v in row.items():
            out[k] = out.get(k, 0.0) + float(v)

    local = driver_sized(path)
    if local is not None:
        import pyarrow as pa
        from ray.data.block import BlockAccessor

        for record_batch in local.to_batches(columns=columns, batch_size=_SUMS_BATCH_ROWS):
            if record_batch.num_rows:
                block = BlockAccessor.for_block(pa.Table.from_batches([record_batch]))
                add({k: v[0] for k, v in fn(block.to_batch_format("numpy"), **kwargs).items()})
        return out
    for row in (
        read_parquet(path, columns)
        .map_batches(fn, fn_kwargs=kwargs, batch_format="numpy", batch_size=_SUMS_BATCH_ROWS)
        .take_all()
    ):
        add(row)
    return out


# ----------------------------------------------------------------------------- simulation


def simulated_data_path(spec) -> Path | None:
    """Where the spec's ``simulate`` section puts its data (None: no simulate section).

    ``simulate.out`` if given, else ``<outputs.dir>/data/<name>-<hash>``; the hash covers
    the section and the marker's schema version.
    """
    section = getattr(spec, "simulate", None)
    if section is None:
        return None
    if getattr(section, "out", None):
        return Path(section.out).expanduser()
    blob = json.dumps([SIMULATION_SCHEMA_VERSION, spec.to_dict().get("simulate")], sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return Path(spec.outputs.dir).expanduser() / "data" / f"{spec.name}-{digest}"


def simulate_once(kind: str, spec, config: dict[str, Any], write: Callable[[Path], Any]) -> Path:
    """Run ``write(out)`` unless ``out`` already holds this simulation; return ``out/data``.

    A folder whose marker records the same ``config`` is reused; any other existing folder
    is an error (never overwritten). ``write`` must create ``out`` atomically with a
    marker made by :func:`simulation_marker`.
    """
    out = simulated_data_path(spec)
    assert out is not None
    meta = out / SIMULATION_MARKER
    wanted = json.loads(json.dumps(config))
    if meta.exists():
        found = read_simulation_marker(str(out / "data"), kind)
        if found is not None and found.get("config") == wanted:
            log.info("[simulate] reusing %s (same simulate section)", out)
            return out / "data"
        raise SpecError(
            f"simulate.out {out} already holds a different simulation; choose another "
            "simulate.out or delete that folder"
        )
    if out.exists():
        raise SpecError(
            f"simulate.out {out} exists and is not a finished simulation; delete it or choose another"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write(out)
    log.info("[simulate] %s in %.1fs → %s", kind, time.perf_counter() - t0, out)
    return out / "data"


def truth_location(
    explicit: str | None, data_path: str, kind: str, default: str, field: str
) -> Path | None:
    """Where this run's ground truth is: the spec's path, or the simulator's, or None.

    ``default`` is the truth's place relative to the marker's folder (e.g. ``truth``).
    A path the spec names must exist (DataError naming ``field`` otherwise).
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise DataError(f"{field} names {path}, which does not exist")
        return path
    if read_simulation_marker(data_path, kind) is None:
        return None
    path = Path(data_path).expanduser().resolve().parent / default
    return path if path.exists() else None


def truth_error(field: str, path: Path, problem: str) -> DataError:
    """The prepare-time error for a truth file that does not fit the expected schema."""
    return DataError(
        f"the ground truth at {path} ({field}) {problem}; fix it, or drop {field} to run "
        "without recovery metrics"
    )


def read_truth_json(
    explicit: str | None, data_path: str, kind: str, keys: Sequence[str]
) -> tuple[dict | None, Path | None]:
    """A kind's ``truth.json`` (``data.truth`` or its simulator's), checked for ``keys``.

    Returns ``(truth, path)``, ``(None, None)`` when there is no truth to read; raises
    :func:`truth_error` for a file that is not JSON or lacks a key.
    """
    path = truth_location(explicit, data_path, kind, "truth.json", "data.truth")
    if path is None:
        return None, None
    try:
        truth = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise truth_error("data.truth", path, f"is not readable JSON ({exc})") from exc
    missing = [k for k in keys if not isinstance(truth, dict) or k not in truth]
    if missing:
        raise truth_error("data.truth", path, f"lacks the key(s) {missing} of a {kind} simulation")
    return truth, path


# ----------------------------------------------------------------------------- bundle


def spec_fingerprint(spec) -> str:
    """Hash of the spec sections that determine the fitted model.

    Where the model is registered, how it is gated and how often a dead worker is
    restarted do not change it; a warm start (``retrain.init_from``) does.
    """
    raw = {k: v for k, v in spec.to_dict().items() if k not in _NOT_FITTED}
    raw.pop("registry", None)
    retrain = raw.pop("retrain", None)
    if retrain and retrain.get("init_from"):
        raw["init_from"] = retrain["init_from"]
    if isinstance(raw.get("scaling"), dict):
        raw["scaling"] = {k: v for k, v in raw["scaling"].items() if k != "max_failures"}
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelBundle:
    """A fitted model as written in a run directory: plain config plus weights files."""

    run_dir: Path
    kind: str
    config: dict[str, Any]
    files: dict[str, str]  # role -> file name under model/
    spec_fingerprint: str

    def path(self, role: str) -> Path:
        return self.run_dir / "model" / self.files[role]

    def state_dict(self, role: str = "state") -> dict[str, Any]:
        """The torch ``state_dict`` saved under ``role`` (no pickled classes)."""
        import torch

        return torch.load(self.path(role), map_location="cpu", weights_only=True)

    def state_bytes(self, role: str = "state") -> bytes:
        """The raw file, to ship to Ray Data tasks (cheap to pickle, hashable)."""
        return self.path(role).read_bytes()


def save_bundle(
    run_path: Path,
    kind: str,
    spec,
    config: dict[str, Any],
    files: dict[str, Callable[[Path], Any]],
) -> ModelBundle:
    """Write the bundle: each ``files[role](path)`` writes one file, then ``bundle.json``.

    ``files`` maps a role to a writer, e.g. ``{"state.pt": lambda p: torch.save(sd, p)}``;
    the role is the file name.
    """
    model_dir = Path(run_path) / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    marker = model_dir / BUNDLE_FILE
    if marker.exists():
        marker.unlink()  # a refit replaces the bundle: incomplete until rewritten
    names = {}
    for name, writer in files.items():
        tmp = model_dir / f".{name}.tmp"
        writer(tmp)
        os.replace(tmp, model_dir / name)
        names[name.split(".")[0]] = name
    meta = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "kind": kind,
        "spec_fingerprint": spec_fingerprint(spec),
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "files": names,
        "config": json.loads(json.dumps(config, default=_plain_json)),
    }
    write_json(marker, meta)
    return ModelBundle(Path(run_path), kind, meta["config"], names, meta["spec_fingerprint"])


def load_bundle(run_dir: Path | str, kind: str, require_complete_run: bool = True) -> ModelBundle:
    """The model bundle of ``run_dir``; RunDirError if it is missing, partial or foreign.

    ``require_complete_run``: refuse a run without its ``COMPLETE`` marker (what
    ``predict`` and the life cycle want); the runner itself resumes from a bundle whose
    run failed later, in ``report``.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    if require_complete_run and not (run_dir / COMPLETE).exists():
        raise RunDirError(
            f"{run_dir} is not a complete run (no COMPLETE marker); finish it with "
            f"`dhte run {run_dir / 'spec.yaml'} --run-dir {run_dir}` or use a complete run"
        )
    marker = run_dir / "model" / BUNDLE_FILE
    if not marker.exists():
        if (run_dir / "model" / "predictor.pt").exists():
            raise RunDirError(
                f"{run_dir} was written by an older distributed_hte (a pickled model/predictor.pt). "
                f"Convert it once with `dhte export-bundle {run_dir}`, which writes "
                "model/bundle.json beside it"
            )
        raise RunDirError(f"{run_dir} holds no fitted model (no model/{BUNDLE_FILE})")
    meta = json.loads(marker.read_text())
    if meta.get("format") != BUNDLE_FORMAT or meta.get("version") != BUNDLE_VERSION:
        raise RunDirError(f"{marker} is not a model bundle this version reads")
    if meta.get("kind") != kind:
        raise RunDirError(f"{run_dir} holds a {meta.get('kind')!r} model, not a {kind!r} one")
    missing = [n for n in meta["files"].values() if not (run_dir / "model" / n).exists()]
    if missing:
        raise RunDirError(f"{run_dir}/model is incomplete: missing {', '.join(missing)}")
    return ModelBundle(run_dir, kind, meta["config"], meta["files"], meta["spec_fingerprint"])


def _plain_json(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# One model per worker process and weights: Ray reuses task processes, so a
# map_batches function builds its model once instead of once per batch.
_CACHE: dict[tuple[str, int], Any] = {}


def cached(tag: str, key: bytes, build: Callable[[], Any]) -> Any:
    """``build()`` once per process for (``tag``, ``key``); the previous entry is dropped."""
    k = (tag, hash(key))
    if k not in _CACHE:
        value = build()
        for old in [c for c in _CACHE if c[0] == tag]:
            del _CACHE[old]
        _CACHE[k] = value
    return _CACHE[k]


def cached_torch_model(tag: str, state: bytes, build: Callable[[], Any]) -> Any:
    """``build()`` with the weights of ``state`` (``torch.save`` of a state_dict), in eval
    mode, once per process and weights; one thread, as Ray Data tasks share the cores."""
    import io

    import torch

    def load() -> Any:
        torch.set_num_threads(1)
        model = build()
        model.load_state_dict(torch.load(io.BytesIO(state), map_location="cpu", weights_only=True))
        return model.eval()

    return cached(tag, state, load)


# ----------------------------------------------------------------------------- predictions


def check_new_output(out_path: Path | str) -> Path:
    """``out_path`` resolved; RunDirError if something is already there."""
    out = Path(out_path).expanduser().resolve()
    if out.exists():
        raise RunDirError(f"--out {out} already exists; predictions never overwrite a path")
    return out


def write_predictions(dataset, out_path: Path | str) -> dict[str, Any]:
    """Write ``dataset`` as parquet to ``out_path`` atomically (temp folder + rename).

    Returns ``{"rows", "seconds", "out"}``. Nothing is left behind on failure.
    """
    out = check_new_output(out_path)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    try:
        dataset.write_parquet(str(tmp))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n = pads.dataset(str(out), format="parquet").count_rows()
    return {"rows": n, "seconds": time.perf_counter() - t0, "out": str(out)}


# ----------------------------------------------------------------------------- reporting


@contextlib.contextmanager
def figure(path: Path, figsize: tuple[float, float] = (5.0, 3.5), **subplots: Any) -> Iterator:
    """``with figure(path) as (fig, ax):`` draw; saved as PNG (headless) and closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize, **subplots)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def write_history(run, history: list[dict[str, Any]], title: str, loss_label: str = "loss") -> None:
    """``history.parquet`` and ``plots/training_curve.png`` from per-epoch metrics."""
    if not history:
        return
    import pandas as pd

    pd.DataFrame(history).to_parquet(run.file("history.parquet"))
    with figure(run.file("plots", "training_curve.png")) as (_, ax):
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
        if "val_loss" in history[0]:
            ax.plot(epochs, [h.get("val_loss") for h in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(loss_label)
        if all(h["train_loss"] > 0 for h in history):
            ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"{title}: training curve")
