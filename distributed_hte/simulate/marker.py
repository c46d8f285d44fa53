"""The marker a simulator writes beside its ``data/`` folder: ``simulation.json``.

Ground truth is read only from data that carries this marker (producer, kind, schema
version) or from a path the spec names; see :mod:`distributed_hte.kinds.toolkit`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PRODUCER = "distributed_hte"
SIMULATION_SCHEMA_VERSION = 1
SIMULATION_MARKER = "simulation.json"


def simulation_marker(kind: str, config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The ``simulation.json`` a simulator writes beside its ``data/`` folder."""
    return {
        "producer": PRODUCER,
        "kind": kind,
        "schema_version": SIMULATION_SCHEMA_VERSION,
        "config": json.loads(json.dumps(config)),  # tuples → lists, as stored
        **extra,
    }


def read_simulation_marker(data_path: str, kind: str) -> dict[str, Any] | None:
    """This project's simulation marker for ``data_path``, or None if there is none.

    A ``simulation.json`` from anything else (another producer, kind or schema version)
    counts as none.
    """
    if "://" in data_path:
        return None
    meta = Path(data_path).expanduser().resolve().parent / SIMULATION_MARKER
    if not meta.is_file():
        return None
    try:
        found = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ok = (
        isinstance(found, dict)
        and found.get("producer") == PRODUCER
        and found.get("kind") == kind
        and found.get("schema_version") == SIMULATION_SCHEMA_VERSION
    )
    return found if ok else None
