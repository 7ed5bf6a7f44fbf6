"""Storage units: Ray actors that hold the store's payloads, one chunk per `put`.

A producer sends its columns straight to a unit (`unit.put.remote(chunk_id, batch)`): Ray moves
the Batch through its shared-memory object store, and because a Batch pickles its tensors as
numpy arrays the unit keeps numpy-backed, zero-copy columns (read-only: nothing here writes into
them). A `take` makes the unit `gather` the wanted rows and fields into a new Batch whose object
reference goes to the consumer; the driver and the controller only ever see references.

Rows are freed individually (a sample is cleared once every task consumed it); a chunk is dropped
once none of its rows is live, which bounds a long run's memory by the store's capacity plus the
chunks that still hold a live row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray

from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch


@ray.remote(num_cpus=0)
class StorageUnit:
    def __init__(self) -> None:
        self.chunks: dict[str, Batch] = {}
        self.live: dict[str, set[int]] = {}

    def put(self, chunk_id: str, batch: Batch) -> int:
        if chunk_id in self.chunks:
            raise ValueError(f"chunk {chunk_id!r} is already stored")
        self.chunks[chunk_id] = Batch(batch.tensors, batch.non_tensors)  # meta is not per-sample data
        self.live[chunk_id] = set(range(len(batch)))
        return len(batch)

    def put_distributed(self, chunk_id: str, batch: DistributedBatch) -> list[str]:
        """Store rows that live in the object store (a stage's output), fetched here rather than by
        the caller; returns their columns (the caller never saw them)."""
        rows = batch.fetch()
        self.put(chunk_id, rows)
        return rows.keys()

    def gather(self, rows: Sequence[tuple[str, int]], fields: Sequence[str]) -> Batch:
        """Rows (chunk id, row) in the given order, restricted to `fields`, as one new Batch."""
        pieces, start = [], 0
        while start < len(rows):
            chunk_id, stop = rows[start][0], start
            while stop < len(rows) and rows[stop][0] == chunk_id:
                stop += 1
            chunk = self.chunks.get(chunk_id)
            if chunk is None:
                raise KeyError(f"chunk {chunk_id!r} is not (or no longer) stored here")
            pieces.append(chunk.select(*fields).index([row for _, row in rows[start:stop]]))
            start = stop
        return pieces[0] if len(pieces) == 1 else Batch.concat(pieces)

    def free(self, rows: Sequence[tuple[str, int]]) -> None:
        for chunk_id, row in rows:
            live = self.live.get(chunk_id)
            if live is None:
                continue
            live.discard(row)
            if not live:
                del self.live[chunk_id], self.chunks[chunk_id]

    def stats(self) -> dict[str, int]:
        return {"chunks": len(self.chunks), "live_rows": sum(len(v) for v in self.live.values())}

    def state_dict(self) -> dict[str, Any]:
        """Every chunk that still holds a live row, with its live rows (checkpointed with the job)."""
        return {cid: (self.chunks[cid], sorted(self.live[cid])) for cid in self.chunks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chunks = {cid: batch for cid, (batch, _) in state.items()}
        self.live = {cid: set(rows) for cid, (_, rows) in state.items()}
