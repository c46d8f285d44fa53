"""The run directory: the unit of output of ``dhte run``.

Layout::

    <run_dir>/
      spec.yaml          resolved spec (after overrides)
      status.json        {"state": "running" | "failed" | "complete", ...}
      COMPLETE           written last, only when the run succeeded
      run.log            driver log
      metrics.json       the kind's metrics
      train/             Ray Train checkpoints (resume from here)
      model/             the model bundle: bundle.json (written last) + weights
      ...                kind artefacts (parquet / JSON / PNG)

A run is complete only if ``COMPLETE`` exists. A failed run has ``status.json`` with
``state: failed`` and the error. Re-running into the same directory resumes training
from the last checkpoint; a complete directory is never overwritten.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import secrets
import traceback
from pathlib import Path
from typing import Any

import yaml

from distributed_hte.errors import RunDirError

COMPLETE = "COMPLETE"
STATUS = "status.json"


def new_run_id() -> str:
    """Sortable, unique run id: ``YYYYmmdd-HHMMSS-xxxx``."""
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename): a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default))
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class RunDir:
    """One run's output folder and its state machine (running → complete | failed)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._log_handler: logging.Handler | None = None

    @classmethod
    def open(
        cls, spec_dict: dict[str, Any], outputs_dir: str, name: str, run_dir: str | None
    ) -> RunDir:
        """Create a new run dir, or reopen ``run_dir`` to resume a failed/interrupted run."""
        if run_dir:
            path = cls.check_reusable(run_dir)
        else:
            path = (Path(outputs_dir).expanduser() / name / new_run_id()).resolve()
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        previous = run.status().get("state")
        (path / "spec.yaml").write_text(yaml.safe_dump(spec_dict, sort_keys=False))
        run.set_status("running", resumed=previous is not None)
        return run

    @staticmethod
    def check_reusable(run_dir: str) -> Path:
        """Raise RunDirError unless ``run_dir`` is new or an unfinished run (to resume)."""
        path = Path(run_dir).expanduser().resolve()
        if (path / COMPLETE).exists():
            raise RunDirError(
                f"run directory {path} holds a complete run; choose another --run-dir "
                "(a complete run is never overwritten)"
            )
        if path.exists() and any(path.iterdir()) and not (path / STATUS).exists():
            raise RunDirError(
                f"--run-dir {path} exists and is not a run directory; refusing to write into it"
            )
        return path

    def status(self) -> dict[str, Any]:
        """The current ``status.json`` (empty if none)."""
        f = self.path / STATUS
        return json.loads(f.read_text()) if f.exists() else {}

    def set_status(self, state: str, **extra: Any) -> None:
        data = {
            **self.status(),
            "state": state,
            "updated": dt.datetime.now().isoformat(timespec="seconds"),
            **extra,
        }
        if state == "running":
            data.setdefault("started", data["updated"])
        write_json(self.path / STATUS, data)

    def stage_done(self, stage: str) -> None:
        """Record that a stage (``fit``, ``report``) finished, in ``status.json``."""
        stages = dict(self.status().get("stages", {}))
        stages[stage] = dt.datetime.now().isoformat(timespec="seconds")
        write_json(self.path / STATUS, {**self.status(), "stages": stages})

    def attach_log(self) -> None:
        """Copy this process's log records into ``run.log``."""
        handler = logging.FileHandler(self.path / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        self._log_handler = handler

    def detach_log(self) -> None:
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def mark_complete(self, summary: dict[str, Any]) -> None:
        """Mark success: status first, then the COMPLETE marker, last of all writes."""
        self.set_status("complete", summary=summary)
        (self.path / COMPLETE).write_text(json.dumps(summary, default=_json_default) + "\n")

    def mark_failed(self, exc: BaseException) -> None:
        """Record the failure; the directory keeps its checkpoints for a resume."""
        self.set_status(
            "failed",
            error=f"{type(exc).__name__}: {exc}",
            traceback="".join(traceback.format_exception(exc))[-8000:],
        )

    def file(self, *parts: str) -> Path:
        """Path inside the run directory (parent folders created)."""
        p = self.path.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
