"""The model registry: MLflow, as users already run it.

A registered model (``registry.model``) has one version per complete run with a
``registry:`` section. Aliases say which version is in production: ``champion`` (what
``models:/NAME@champion`` and ``dhte predict --model NAME@champion`` use) and
``challenger`` (the last version that was not promoted). Stages are deprecated in MLflow
and not used. The registry only points at complete runs: each version's tags hold its
lineage (run directory, spec hash, data fingerprint, package version, git commit,
convergence verdict), and its MLflow run holds the resolved spec as params, per-epoch
metrics and the run's files (metrics, plots, the model bundle) as artefacts.

Where: ``registry.uri`` (any MLflow tracking URI, e.g. ``http://mlflow:5000``), or by
default an embedded SQLite registry at ``<outputs.dir>/mlflow.db`` with artefacts in
``<outputs.dir>/mlartifacts``: nothing to run, and the same files every node sees.

``dhte.champion_history`` (a tag of the registered model, a JSON list of versions) records
the order in which versions became champion, so ``rollback`` moves the alias back to the
previous one without deleting anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distributed_hte.errors import ClusterError, UserError

log = logging.getLogger(__name__)

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "dhte.champion_history"
# MLflow's own limits (params: 6000 characters; a batch: 100 params, 1000 metrics).
_PARAM_CHARS = 6000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000


def _key(name: str) -> str:
    """A metric or param name MLflow accepts (alphanumerics, _ - . space : /; 250 chars)."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)[:250]


class RegistryError(UserError):
    """A registry request that cannot be served (no such model, version or alias)."""


def embedded_uri(outputs_dir: str) -> str:
    """The default registry of a spec: SQLite at ``<outputs.dir>/mlflow.db``."""
    path = Path(outputs_dir).expanduser().resolve() / EMBEDDED_DB
    return f"sqlite:///{path}"


def resolve_uri(uri: str | None, outputs_dir: str = "runs") -> str:
    """A registry URI: the spec's, else the embedded one; a plain folder means the
    embedded registry in that folder (what ``--registry runs`` on the CLI gives)."""
    if uri is None:
        return embedded_uri(outputs_dir)
    if "://" not in uri and not uri.startswith("sqlite:"):
        return embedded_uri(uri)
    return uri


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME@champion`` / ``NAME@3`` / ``models:/NAME@champion`` → (name, alias or version)."""
    text = ref.removeprefix("models:/")
    if "@" in text:
        name, _, which = text.partition("@")
    elif "/" in text:
        name, _, which = text.partition("/")
    else:
        raise RegistryError(
            f"model reference {ref!r} must be NAME@ALIAS or NAME@VERSION (e.g. ads@champion)"
        )
    if not name or not which:
        raise RegistryError(f"model reference {ref!r} must be NAME@ALIAS or NAME@VERSION")
    return name, which


def package_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("distributed_hte")
    except Exception:  # noqa: BLE001 - not installed: unknown, not an error
        return None


def git_commit() -> str | None:
    """The commit of the code that runs: ``$DHTE_GIT_COMMIT``, else the package's checkout."""
    if os.environ.get("DHTE_GIT_COMMIT"):
        return os.environ["DHTE_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _check_reachable(uri: str) -> None:
    """Fail in seconds when nothing answers at the tracking server's host and port."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=5):
            pass
    except OSError as exc:
        raise ClusterError(
            f"the MLflow registry at {uri} is unreachable ({exc.strerror or exc}); check "
            "registry.uri (or --registry) and that the tracking server runs"
        ) from exc


@dataclass(frozen=True)
class Version:
    """One registered model version as this project reads it."""

    name: str
    version: int
    aliases: tuple[str, ...]
    tags: dict[str, str]
    run_id: str | None
    created: int

    @property
    def run_dir(self) -> str | None:
        return self.tags.get("run_dir")

    @property
    def kind(self) -> str | None:
        return self.tags.get("kind")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "aliases": list(self.aliases),
            "run_id": self.run_id,
            "created": self.created,
            "tags": dict(sorted(self.tags.items())),
        }


class Registry:
    """An MLflow registry (tracking store too: versions point at their MLflow runs)."""

    def __init__(self, uri: str, artifact_root: str | None = None) -> None:
        self.uri = uri
        self.artifact_root = artifact_root
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            if artifact_root is None:
                self.artifact_root = str(
                    Path(uri.removeprefix("sqlite:///")).parent / EMBEDDED_ARTIFACTS
                )
        if _is_http(uri):
            # Fail in seconds, not after minutes of retries with backoff.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
            _check_reachable(uri)
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        try:
            self.client.search_registered_models(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any failure here means unusable
            raise ClusterError(
                f"the MLflow registry at {uri} cannot be used: {type(exc).__name__}: "
                f"{str(exc)[:300]}"
            ) from exc

    @classmethod
    def from_spec(cls, spec) -> Registry:
        return cls(resolve_uri(spec.registry.uri, spec.outputs.dir))

    # -- reading ---------------------------------------------------------------------
    def _model(self, name: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException:
            return None

    def _version(self, mv, aliases: dict[str, int]) -> Version:
        v = int(mv.version)
        return Version(
            name=mv.name,
            version=v,
            aliases=tuple(sorted(a for a, n in aliases.items() if int(n) == v)),
            tags=dict(mv.tags or {}),
            run_id=mv.run_id,
            created=int(mv.creation_timestamp or 0),
        )

    def _aliases(self, name: str) -> dict[str, int]:
        m = self._model(name)
        return {} if m is None else {a: int(v) for a, v in (m.aliases or {}).items()}

    def versions(self, name: str) -> list[Version]:
        """Every version of ``name``, oldest first; RegistryError if there is no such model."""
        if self._model(name) is None:
            raise RegistryError(f"the registry {self.uri} has no model {name!r}")
        aliases = self._aliases(name)
        found = self.client.search_model_versions(f"name='{name}'")
        return sorted((self._version(mv, aliases) for mv in found), key=lambda v: v.version)

    def get(self, name: str, which: str | int) -> Version:
        """Version ``which`` (a number or an alias) of ``name``; RegistryError if none."""
        if self._model(name) is None:
            raise RegistryError(f"the registry {self.uri} has no model {name!r}")
        aliases = self._aliases(name)
        text = str(which)
        if text.isdigit():
            number = int(text)
        elif text in aliases:
            number = aliases[text]
        else:
            known = ", ".join(sorted(aliases)) or "none"
            raise RegistryError(
                f"model {name!r} has no version with alias {text!r} (aliases: {known})"
                + (
                    "; no version has been promoted yet (dhte models promote NAME VERSION)"
                    if text == CHAMPION
                    else ""
                )
            )
        for v in self.versions(name):
            if v.version == number:
                return v
        raise RegistryError(f"model {name!r} has no version {number}")

    def champion(self, name: str) -> Version | None:
        """The champion of ``name``; None when the model or the alias does not exist yet."""
        if CHAMPION not in self._aliases(name):
            return None
        return self.get(name, CHAMPION)

    def find_run_version(self, name: str, run_dir: Path, spec_hash: str) -> Version | None:
        """The version already registered for this run directory and spec (a redone tick)."""
        if self._model(name) is None:
            return None
        for v in self.versions(name):
            if v.run_dir == str(run_dir) and v.tags.get("spec_hash") == spec_hash:
                return v
        return None

    def history(self, name: str) -> list[int]:
        m = self._model(name)
        return json.loads((m.tags or {}).get(HISTORY_TAG, "[]")) if m is not None else []

    def local_run(self, v: Version, cache_dir: Path | None = None) -> Path:
        """A folder holding ``v``'s model bundle: its run directory where this machine sees
        it, else a copy of its MLflow artefacts (``spec.yaml``, ``model/``) in ``cache_dir``."""
        if v.run_dir and (Path(v.run_dir) / "model" / "bundle.json").exists():
            return Path(v.run_dir)
        if v.run_id is None:
            raise RegistryError(f"{v.name} version {v.version}: no run directory and no run")
        cache = Path(cache_dir or Path.home() / ".cache" / "distributed_hte" / "models")
        out = cache / v.name / str(v.version)
        if not (out / "COMPLETE").exists():
            out.mkdir(parents=True, exist_ok=True)
            for item in ("model", "spec.yaml", "data_profile.json"):
                try:
                    self.client.download_artifacts(v.run_id, item, str(out))
                except Exception as exc:  # noqa: BLE001
                    if item == "model":
                        raise RegistryError(
                            f"{v.name} version {v.version}: its run directory {v.run_dir} is "
                            f"not on this machine and its artefacts cannot be read: {exc}"
                        ) from exc
            (out / "COMPLETE").write_text(json.dumps({"copied_from": self.uri}) + "\n")
        return out

    # -- writing ---------------------------------------------------------------------
    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.artifact_root is not None:
            location = Path(self.artifact_root).resolve().as_uri() + f"/{name}"
        return self.client.create_experiment(name, artifact_location=location)

    def log_run(
        self,
        name: str,
        run_name: str,
        params: dict[str, Any],
        metrics: dict[str, float],
        history: list[dict[str, Any]],
        artefacts: list[Path],
        run_path: Path,
        tags: dict[str, str],
    ) -> str:
        """One MLflow run: params, final and per-epoch metrics, artefacts; its id."""
        from mlflow.entities import Metric, Param

        run = self.client.create_run(self._experiment(name), run_name=run_name, tags=tags)
        rid = run.info.run_id
        try:
            plist = [Param(_key(k), str(v)[:_PARAM_CHARS]) for k, v in sorted(params.items())]
            for i in range(0, len(plist), _PARAMS_PER_BATCH):
                self.client.log_batch(rid, params=plist[i : i + _PARAMS_PER_BATCH])
            ts = 0
            mlist = [Metric(_key(k), float(v), ts, 0) for k, v in sorted(metrics.items())]
            for h in history:
                step = int(h.get("epoch", 0))
                for k, v in h.items():
                    if isinstance(v, int | float) and not isinstance(v, bool) and k != "epoch":
                        mlist.append(Metric(_key(f"epoch/{k}"), float(v), ts, step))
            mlist = [m for m in mlist if m.value == m.value]  # NaN is not storable everywhere
            for i in range(0, len(mlist), _METRICS_PER_BATCH):
                self.client.log_batch(rid, metrics=mlist[i : i + _METRICS_PER_BATCH])
            for path in artefacts:
                rel = path.relative_to(run_path)
                if path.is_dir():
                    self.client.log_artifacts(rid, str(path), str(rel))
                else:
                    parent = str(rel.parent) if str(rel.parent) != "." else None
                    self.client.log_artifact(rid, str(path), parent)
        except BaseException:
            self.client.set_terminated(rid, status="FAILED")
            raise
        self.client.set_terminated(rid)
        return rid

    def register(self, name: str, run_id: str, tags: dict[str, str], description: str) -> Version:
        """A new version of ``name`` (created on first use) pointing at ``run_id``'s model."""
        from mlflow.exceptions import MlflowException

        if self._model(name) is None:
            try:
                self.client.create_registered_model(name)
            except MlflowException:
                pass  # created meanwhile by another run
        mv = self.client.create_model_version(
            name,
            source=f"runs:/{run_id}/model",
            run_id=run_id,
            tags={k: str(v)[:5000] for k, v in tags.items() if v is not None},
            description=description,
        )
        return self.get(name, int(mv.version))

    def set_version_tags(self, v: Version, tags: dict[str, Any]) -> None:
        for k, val in tags.items():
            self.client.set_model_version_tag(v.name, str(v.version), k, str(val)[:5000])

    def log_file(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def promote(self, name: str, version: int) -> int | None:
        """Move ``champion`` to ``version`` (recorded in the history); the previous champion."""
        target = self.get(name, version)
        previous = self._aliases(name).get(CHAMPION)
        self.client.set_registered_model_alias(name, CHAMPION, str(target.version))
        if self._aliases(name).get(CHALLENGER) == target.version:
            self.client.delete_registered_model_alias(name, CHALLENGER)
        hist = self.history(name)
        if not hist or hist[-1] != target.version:
            hist.append(target.version)
        self.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(hist))
        return previous

    def set_challenger(self, name: str, version: int) -> None:
        self.client.set_registered_model_alias(name, CHALLENGER, str(version))

    def rollback(self, name: str) -> tuple[int, int]:
        """Champion back to the one before it; returns (from, to). Nothing is deleted."""
        current = self._aliases(name).get(CHAMPION)
        if current is None:
            raise RegistryError(f"model {name!r} has no champion to roll back")
        hist = self.history(name)
        if hist and hist[-1] == current:
            hist.pop()
        if not hist:
            raise RegistryError(
                f"model {name!r}: version {current} is the first champion; there is no "
                "previous one to roll back to"
            )
        previous = hist[-1]
        self.client.set_registered_model_alias(name, CHAMPION, str(previous))
        self.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(hist))
        self.client.set_model_version_tag(name, str(current), "rolled_back", "true")
        return current, previous
