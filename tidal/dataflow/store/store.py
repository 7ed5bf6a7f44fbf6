"""StreamStore: the client of the streaming data store (one controller actor + storage units).

Any process holding a StreamStore (it pickles: it is only actor handles) may `put` or `take`.
`put` sends the payload from the producer's process straight to a storage unit and tells the
controller only ids, fields, locations, groups, lengths and versions; `take` gets back a
DistributedBatch whose shards are references produced by the storage units, so payloads go
producer -> unit -> consumer and never through the driver.

Backpressure: the first put of a sample *admits* it, and admission waits while the store holds
`capacity` samples that some task has not consumed yet (`StoreTimeout` after `timeout_s`, naming
the producer, the capacity and what each task still has to consume). A take waits for `n` ready
samples the same way. Both waits happen inside the async controller actor (see controller.py).
Size `capacity` to at least the largest take's `n` plus the largest put minus one: with less, a
full store can hold too few samples for a take while the put that would complete it waits for
room, and both time out (a take of more than `capacity` is refused at once).

Checkpoint: `state_dict()` holds the index (ids, groups, lengths, versions, per-task consumption,
counters) *and* the payloads of every sample not yet cleared, so a resumed job continues with the
same unconsumed samples instead of re-generating them. Take it at a quiet point (between steps).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch
from tidal.dataflow.store.controller import StoreController, StoreTimeout
from tidal.dataflow.store.samplers import SampleId, SampleMeta
from tidal.dataflow.store.storage import StorageUnit

DEFAULT_TIMEOUT_S = 300.0


@dataclass
class TakeResult:
    """What a take served: rows by reference, rank by rank (rank r's rows are contiguous)."""

    batch: DistributedBatch
    shares: list[list[SampleId]]  # sample ids per data-parallel rank
    stale: list[SampleId]  # refused as older than min_version (consumed by this task, not served)
    versions: list[int | None]  # oldest policy version per served sample, in row order

    @property
    def ids(self) -> list[SampleId]:
        return [i for share in self.shares for i in share]

    @property
    def rank_ranges(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for share in self.shares:
            out.append((start, start + len(share)))
            start += len(share)
        return out

    def for_rank(self, rank: int) -> Batch:
        """Rank `rank`'s rows as a local Batch (call it on that rank's worker)."""
        return self.batch.materialize(*self.rank_ranges[rank])

    def fetch(self) -> Batch:
        """All rows as one local Batch (tests, evaluation)."""
        return self.batch.fetch()


def _get(ref: Any) -> Any:
    """ray.get that re-raises the store's own errors as themselves (not wrapped in RayTaskError)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, (StoreTimeout, ValueError, KeyError)):
            raise err.cause from None
        raise


def _as_batch(columns: Batch | dict[str, Any]) -> Batch:
    if isinstance(columns, Batch):
        return columns
    tensors, others = {}, {}
    for key, value in columns.items():
        if isinstance(value, np.ndarray) and value.dtype != object:
            value = torch.from_numpy(value)
        (tensors if isinstance(value, torch.Tensor) else others)[key] = value
    return Batch.from_dict(tensors, others)


def _per_sample_min(values: Any, n: int) -> list[int | None]:
    """Per-sample ints, or per-token rows (a generation that spans weight updates): the row minimum."""
    if isinstance(values, int):
        return [values] * n
    if isinstance(values, (torch.Tensor, np.ndarray)):
        arr = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values).reshape(n, -1)
        return [int(v) for v in arr.min(axis=1)]
    return [None if v is None else int(np.min(v)) for v in values]


class StreamStore:
    """Client of one streaming store; see the module docstring. `tasks` are the consumers."""

    def __init__(self, tasks: Sequence[str], capacity: int, num_units: int = 1, auto_clear: bool = True):
        self.units = [StorageUnit.remote() for _ in range(num_units)]
        self.controller = StoreController.remote(list(tasks), capacity, self.units, auto_clear)

    def put(
        self,
        sample_ids: Sequence[SampleId],
        columns: Batch | DistributedBatch | dict[str, Any],
        *,
        groups: Sequence[Hashable] | None = None,
        group_size: int | Sequence[int] = 1,
        lengths: Sequence[int] | None = None,
        versions: int | Sequence[Any] | np.ndarray | torch.Tensor | None = None,
        producer: str = "producer",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """Store `columns` (row k belongs to `sample_ids[k]`); blocks while the store is full.

        New ids are admitted (with their group, group size and length); known ids just gain the
        fields (e.g. a reward for existing responses). A DistributedBatch (a stage's output, rows
        by reference) is fetched by the storage unit itself, never by this process; give its
        `lengths` and `versions` explicitly (they are not read from its columns here). A field may be produced once per sample.
        `versions` defaults to a `version` column when there is one; per-token versions count
        by their minimum. `lengths` defaults to the row sums of an `attention_mask` column.
        """
        remote = isinstance(columns, DistributedBatch)
        batch = columns if remote else _as_batch(columns)
        ids, n = list(sample_ids), len(batch)
        if len(ids) != n or len(set(ids)) != n:
            raise ValueError(f"need {n} distinct sample ids for {n} rows, got {len(ids)} ({len(set(ids))} distinct)")
        if versions is None and not remote and "version" in batch:
            versions = batch["version"]
        vers = None if versions is None else _per_sample_min(versions, n)
        if lengths is None and not remote and "attention_mask" in batch:
            lengths = batch["attention_mask"].reshape(n, -1).sum(dim=1).tolist()
        sizes = [group_size] * n if isinstance(group_size, int) else list(group_size)
        metas = [
            SampleMeta(
                ids[k], None if groups is None else groups[k], int(sizes[k]),
                0 if lengths is None else int(lengths[k]),
            )
            for k in range(n)
        ]
        _get(self.controller.admit.remote(producer, metas, timeout_s))
        unit, chunk_id = random.randrange(len(self.units)), uuid.uuid4().hex
        if remote:  # the unit fetches the rows from where they were produced
            keys = _get(self.units[unit].put_distributed.remote(chunk_id, batch))
        else:
            _get(self.units[unit].put.remote(chunk_id, batch))
            keys = batch.keys()
        locations = [(unit, chunk_id, row) for row in range(n)]
        try:
            _get(self.controller.commit.remote(ids, keys, locations, vers))
        except Exception:
            self.units[unit].free.remote([(chunk_id, row) for row in range(n)])  # do not leak the chunk
            raise

    def take(
        self,
        task: str,
        fields: Sequence[str],
        n: int,
        *,
        sampler: str = "fifo",
        num_ranks: int = 1,
        min_version: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        all_fields: bool = False,
        partial: bool = False,
    ) -> TakeResult:
        """`n` samples ready for `task` (all `fields` produced, not yet consumed by it), now consumed.

        Blocks until the sampler can serve `n`. Samples older than `min_version` are refused and
        reported in `TakeResult.stale` (they count as consumed by this task). `all_fields`: the
        batch holds every column the samples have, not only `fields`. `partial`: up to `n`, served
        as soon as one sample (or whole group, for group samplers) is ready.
        """
        batch, shares, stale, versions = _get(
            self.controller.take.remote(
                task, list(fields), n, sampler, num_ranks, min_version, timeout_s, all_fields, partial
            )
        )
        return TakeResult(batch, shares, stale, versions)

    def clear(self) -> int:
        """Drop samples every task has consumed (automatic after each take unless auto_clear=False)."""
        return _get(self.controller.clear.remote())

    def stats(self) -> dict[str, Any]:
        out = _get(self.controller.stats.remote())
        out["units"] = _get([u.stats.remote() for u in self.units])
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "index": _get(self.controller.state_dict.remote()),
            "units": _get([u.state_dict.remote() for u in self.units]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["units"]) != len(self.units):
            raise ValueError(f"checkpoint has {len(state['units'])} storage units, this store {len(self.units)}")
        _get([u.load_state_dict.remote(s) for u, s in zip(self.units, state["units"])])
        _get(self.controller.load_state_dict.remote(state["index"]))

    def shutdown(self) -> None:
        for actor in [self.controller, *self.units]:
            ray.kill(actor)
