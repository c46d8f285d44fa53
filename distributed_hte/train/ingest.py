"""Ray Data side of shuffling and reproducibility (Ray 2.60, Train V2).

What makes a worker's rows and their order a function of the seed (measured, see
``benchmarks/README.md``, "Shuffling and reproducibility"):

* ``streaming_split(n, equal=True)`` (what ``ray.train.DataConfig`` uses) hands each
  block to the worker with the fewest rows so far, in the order blocks reach it.
  Without ``preserve_order`` that order is the read tasks' completion order, so two runs
  give different shards. With ``ExecutionOptions.preserve_order`` the splitter also drops
  its locality buffering, and the assignment depends only on the block sequence.
* File order: ``read_parquet(shuffle=FileShuffleConfig(seed, reseed_after_execution=True))``
  draws a new file order for every execution, and the split coordinator re-executes
  the dataset every epoch: a fresh, seeded order per epoch, streaming, no barrier. The
  seed combines with the dataset context's execution index, which this module resets to
  0 when the trainer starts, so epoch ``k`` of a run gets the same order every time.
  A kind passes ``shuffle=file_shuffle(spec.train)`` to its ``read_parquet``.
* Materialised (cached) datasets: their block list is in the order the blocks were
  produced, which is repeatable only if they were materialised with ``preserve_order``
  (``configure_ray_data`` sets it on the driver before a kind reads). The trainer then
  permutes the blocks once with ``randomize_block_order(seed)``: refs only, no copy.
  Ray 2.60 draws that permutation once per run, not per epoch (``reseed_after_execution``
  has no effect there), so each worker keeps the same blocks every epoch; the local
  shuffle buffer, seeded per epoch and rank, gives each epoch a new row order within them.
* ``randomize_block_order`` on a *lazy* dataset is an all-to-all barrier: every block is
  read into the object store before the first batch, breaking flat memory in rows. The
  trainer therefore never adds it to a streaming dataset.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.data import DataContext, FileShuffleConfig
from ray.data.dataset import MaterializedDataset
from ray.train import DataConfig

from distributed_hte.spec import TrainSpec

log = logging.getLogger("distributed_hte.train")


def file_shuffle(train: TrainSpec) -> FileShuffleConfig | None:
    """``read_parquet(shuffle=...)`` for training data: a new seeded file order per epoch."""
    if not train.shuffle:
        return None
    return FileShuffleConfig(seed=train.seed, reseed_after_execution=True)


def configure_ray_data(train: TrainSpec) -> None:
    """Set the driver's Ray Data context for a reproducible fit; call before reading.

    Datasets copy the current context when created, and ``materialize`` runs with it:
    with ``preserve_order`` a materialised dataset's blocks are in a repeatable order.
    """
    if train.reproducible:
        DataContext.get_current().execution_options.preserve_order = True


def reads_files_in_stored_order(ds: Any) -> bool | None:
    """Whether a lazy dataset reads its files unshuffled (None: cannot tell).

    Walks the logical plan to the read; relies on Ray internals, so any surprise means
    "cannot tell" rather than an error.
    """
    try:
        op = ds._logical_plan.dag
        while op.input_dependencies:
            op = op.input_dependencies[0]
        source = getattr(op, "datasource", None)
        if source is None or not hasattr(source, "_shuffle"):
            return None
        return source._shuffle is None
    except Exception:  # noqa: BLE001 - best effort on private structures
        return None


def shuffle_datasets(datasets: dict[str, Any], train: TrainSpec) -> dict[str, Any]:
    """The datasets the trainer hands to Ray Train, with the training data's block order
    permuted when it is materialised (see the module docstring). Validation data keeps
    its order: its metrics are sums."""
    out = dict(datasets)
    ds = out.get("train")
    if ds is None or not train.shuffle:
        return out
    if isinstance(ds, MaterializedDataset):
        if train.reproducible and not ds.context.execution_options.preserve_order:
            log.warning(
                "[train] the training data was materialised without preserve_order: its "
                "block order, and so the run, is not reproducible (call "
                "configure_ray_data(spec.train) before reading)"
            )
        out["train"] = ds.randomize_block_order(seed=train.seed)
    elif reads_files_in_stored_order(ds):
        log.warning(
            "[train] the training data streams its files in stored order; only the local "
            "shuffle buffer (%d rows) mixes them. Read with shuffle=file_shuffle(spec.train) "
            "for a fresh file order every epoch",
            train.shuffle_buffer_rows,
        )
    return out


class ReproducibleDataConfig(DataConfig):
    """``DataConfig`` that makes shards a function of the seed when ``reproducible``.

    Sets ``preserve_order`` on the shards' execution options and restarts the datasets'
    execution index at 0, so seeded file shuffles (``reseed_after_execution``) give epoch
    ``k`` the same order in every run, whatever the driver executed before.
    """

    def __init__(self, reproducible: bool) -> None:
        options = DataConfig.default_ingest_options()
        if reproducible:
            options.preserve_order = True
        super().__init__(execution_options=options)
        self._reproducible = reproducible

    def configure(
        self,
        datasets: dict[str, Any],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        """Ray Train's hook: reset the execution index, then split as usual."""
        if self._reproducible:
            for ds in datasets.values():
                # Private in Ray 2.60: the counter FileShuffleConfig reseeds from.
                if hasattr(ds.context, "_execution_idx"):
                    ds.context._execution_idx = 0
        return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
