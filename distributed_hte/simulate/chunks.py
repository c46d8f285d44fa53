"""Write a simulated dataset as parquet chunks from parallel Ray tasks, atomically.

Each chunk is one Ray task writing one file, so memory is flat in rows. The output folder
appears only when everything is written (temporary sibling, then a rename), so an
interrupted simulation never leaves a folder that looks finished.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def chunk_sizes(n_rows: int, chunk_rows: int) -> list[int]:
    """Split ``n_rows`` into chunks of at most ``chunk_rows``."""
    full, rest = divmod(n_rows, chunk_rows)
    return [chunk_rows] * full + ([rest] if rest else [])


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` when the block succeeds."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(out)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_chunk(
    make_chunk: Callable[[Any, int, int], pa.Table],
    world: Any,
    index: int,
    n_rows: int,
    out_dir: str,
) -> int:
    table = make_chunk(world, index, n_rows)
    pq.write_table(table, os.path.join(out_dir, f"part-{index:05d}.parquet"), compression="snappy")
    return n_rows


def write_chunks(
    make_chunk: Callable[[Any, int, int], pa.Table],
    world: Any,
    sizes: list[int],
    out_dir: Path,
    desc: str,
    progress: bool = True,
) -> None:
    """Run ``make_chunk(world, index, n_rows)`` for every chunk as a Ray task into ``out_dir``.

    ``make_chunk`` must seed its generator from ``index`` so the output does not depend
    on parallelism. Needs ``ray.init`` to have been called.
    """
    import ray
    from tqdm import tqdm

    world_ref = ray.put(world)
    write = ray.remote(num_cpus=1)(_write_chunk)
    pending = [write.remote(make_chunk, world_ref, i, n, str(out_dir)) for i, n in enumerate(sizes)]
    with tqdm(
        total=sum(sizes),
        unit="row",
        unit_scale=True,
        desc=desc,
        disable=not progress,
        mininterval=2.0,
    ) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(ray.get(done[0]))
