"""Stage: one step of making experience or training, with the columns it reads and writes declared.

A stage is a small object built once per job from exactly what it uses (its config sections, the
role handles it calls, the trainer state it reads); it is never handed the whole job. It reads
named columns of a DistributedBatch and returns new ones; payload tensors never come to the
driver. The sync runner calls the stages in order; the streaming runner wires the same stages to
the store through the same declarations (a sample is ready for training once every column the
generate and score stages always write is in: `ready_columns`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from tidal.dataflow.distributed_batch import DistributedBatch

# The model's view of a sample: what every log-prob, value and update computation reads.
SEQUENCE_COLUMNS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")


class Stage:
    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()  # columns it needs
    optional_reads: ClassVar[tuple[str, ...]] = ()  # columns it uses when the batch has them
    writes: ClassVar[tuple[str, ...]] = ()  # columns it always adds
    optional_writes: ClassVar[tuple[str, ...]] = ()  # columns it adds with some settings

    def inputs(self, batch: DistributedBatch) -> DistributedBatch:
        """`batch` narrowed to what this stage reads: all its workers or task fetch."""
        return batch.select(*self.reads, optional=self.optional_reads)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reads={self.reads}, writes={self.writes})"


def ready_columns(*stages: Stage) -> tuple[str, ...]:
    """Every column the given stages always write, once each, in order."""
    return tuple(dict.fromkeys(column for stage in stages for column in stage.writes))


def take_rows(batches: Sequence[DistributedBatch], keeps: Sequence[Sequence[bool]]) -> DistributedBatch:
    """The kept rows of several batches with the same columns, as one batch (in one Ray task)."""
    from tidal.controller.dispatch import run_task
    from tidal.controller.stages.batch_tasks import keep_rows

    return run_task(keep_rows, batches[0], list(batches[1:]), [list(k) for k in keeps])
