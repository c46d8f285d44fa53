"""Schema checks that run before any training: cheap, metadata first.

A kind declares the columns it needs as :class:`ColumnRequirement`s. :func:`check_schema`
reads only parquet metadata (columns, types, row counts, null counts from row-group
statistics) and raises :class:`~distributed_hte.errors.DataError` naming the problem.
NaNs are not in parquet statistics; :func:`distributed_hte.data.profile.profile_dataset`
finds them in a streaming pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from distributed_hte.errors import DataError

ColumnRole = Literal["numeric", "id", "binary"]


@dataclass(frozen=True, slots=True)
class ColumnRequirement:
    """A column a kind needs: its name, what it is used for, and its role."""

    name: str
    field: str  # spec field that named it, e.g. "data.treatment"
    role: ColumnRole


@dataclass(frozen=True, slots=True)
class SchemaSummary:
    """What the metadata says about a dataset."""

    path: str
    n_rows: int
    n_files: int
    schema: pa.Schema


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, ValueError):
        return pafs.LocalFileSystem(), path


def open_dataset(path: str) -> pads.Dataset:
    """Open a parquet file or folder (local path or any pyarrow/fsspec URI)."""
    fs, inner = _filesystem(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"data path {path} does not exist")
    try:
        if info.type != pafs.FileType.Directory:
            return pads.dataset(inner, filesystem=fs, format="parquet")
        # What Ray Data reads (file_extensions=["parquet"], hive partitions): files that
        # sit beside the table (_SUCCESS, README.txt, a colleague's CSV) are not part of it.
        selector = pafs.FileSelector(inner, recursive=True)
        files = sorted(
            f.path
            for f in fs.get_file_info(selector)
            if f.type == pafs.FileType.File
            and f.path.endswith(".parquet")
            and not any(part.startswith((".", "_")) for part in f.path[len(inner) :].split("/"))
        )
        if not files:
            raise DataError(f"data path {path} holds no .parquet files")
        return pads.dataset(
            files, filesystem=fs, format="parquet", partitioning="hive", partition_base_dir=inner
        )
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"data path {path} is not readable as parquet: {exc}") from exc


def _role_ok(role: ColumnRole, dtype: pa.DataType) -> bool:
    if role == "id":
        return (
            pa.types.is_integer(dtype)
            or pa.types.is_string(dtype)
            or pa.types.is_large_string(dtype)
        )
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_boolean(dtype)


_ROLE_TEXT = {
    "numeric": "a numeric column (integer, float or boolean)",
    "binary": "a 0/1 column (integer, float or boolean)",
    "id": "an id column (integer or string)",
}


def check_schema(path: str, required: list[ColumnRequirement]) -> SchemaSummary:
    """Check that ``path`` holds non-empty parquet with every required column, typed right.

    Raises DataError for a missing path, no files, no rows, a missing column, a wrong
    type, or nulls recorded in row-group statistics.
    """
    dataset = open_dataset(path)
    files = list(dataset.files)
    if not files:
        raise DataError(f"data path {path} holds no parquet files")
    try:
        schema = dataset.schema
        n_rows = dataset.count_rows()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"data path {path} is not readable as parquet: {exc}") from exc
    if n_rows == 0:
        raise DataError(
            f"the dataset at {path} is empty ({len(files)} file(s), 0 rows); nothing to train on"
        )
    for req in required:
        if req.name not in schema.names:
            raise DataError(
                f"the dataset at {path} has no column {req.name!r} (named by {req.field}); "
                f"its columns are: {', '.join(schema.names)}"
            )
        dtype = schema.field(req.name).type
        if not _role_ok(req.role, dtype):
            raise DataError(
                f"column {req.name!r} (named by {req.field}) in {path} has type {dtype}; "
                f"it must be {_ROLE_TEXT[req.role]}"
            )
    _check_null_statistics(dataset, path, required)
    return SchemaSummary(path=path, n_rows=n_rows, n_files=len(files), schema=schema)


def _check_null_statistics(
    dataset: pads.Dataset, path: str, required: list[ColumnRequirement]
) -> None:
    wanted = {r.name: r for r in required}
    for fragment in dataset.get_fragments():
        meta = fragment.metadata
        names = meta.schema.names
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            for c in range(group.num_columns):
                col = group.column(c)
                name = names[c] if c < len(names) else col.path_in_schema
                stats = col.statistics
                if (
                    name in wanted
                    and stats is not None
                    and stats.has_null_count
                    and stats.null_count > 0
                ):
                    req = wanted[name]
                    raise DataError(
                        f"column {name!r} (named by {req.field}) has {stats.null_count} null value(s) "
                        f"in {fragment.path}; fill or drop them before training"
                    )
