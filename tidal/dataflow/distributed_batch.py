"""DistributedBatch: a batch whose rows live in Ray's object store, described by references only.

A worker group returns its per-rank results as object references; the driver keeps those
references and their row counts and hands them to the next group. Each receiving worker fetches
only the shards that overlap its own row range, so payload tensors go from worker to worker (over
shared memory on one node) and never through the driver.

Columns added by different stages arrive sharded differently (rollout by its ranks, rewards by a
task, log-probs by the actor's ranks). Rather than re-shard, a DistributedBatch keeps one *part*
per producer: each part is a list of (ref, num_rows) shards covering all rows in order, and every
part has the same total. `union` just appends parts; `materialize` slices each part to the wanted
rows and joins the columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import ray

from tidal.dataflow.batch import Batch, even_split_sizes


class Shard(NamedTuple):
    """One object in the store: a Batch of `num_rows` consecutive rows."""

    ref: ray.ObjectRef  # ObjectRef[Batch]
    num_rows: int


def row_ranges(num_rows: int, num_chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of each of `num_chunks` contiguous chunks, sized like `Batch.split`."""
    ranges, start = [], 0
    for size in even_split_sizes(num_rows, num_chunks):
        ranges.append((start, start + size))
        start += size
    return ranges


def shard_spans(shard_sizes: Sequence[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """Which shards hold rows [start, stop): (shard index, local start, local stop) in row order.

    An empty range still names one shard (sliced to nothing) so the result keeps its columns:
    a zero-row shard at `start` when there is one (nothing to fetch), else the shard around `start`.
    """
    total = sum(shard_sizes)
    if not shard_sizes:
        raise ValueError("a part needs at least one shard")
    if not 0 <= start <= stop <= total:
        raise ValueError(f"row range [{start}, {stop}) is outside [0, {total})")
    offsets, offset = [], 0
    for size in shard_sizes:
        offsets.append(offset)
        offset += size
    if start == stop:
        for i, (off, size) in enumerate(zip(offsets, shard_sizes)):
            if size == 0 and off == start:
                return [(i, 0, 0)]
        for i, (off, size) in enumerate(zip(offsets, shard_sizes)):
            if off <= start < off + size:
                return [(i, start - off, start - off)]
        last = len(shard_sizes) - 1
        return [(last, shard_sizes[last], shard_sizes[last])]
    spans = []
    for i, (off, size) in enumerate(zip(offsets, shard_sizes)):
        lo, hi = max(start, off), min(stop, off + size)
        if lo < hi:
            spans.append((i, lo - off, hi - off))
    return spans


class DistributedBatch:
    """Rows of a batch held as object references, grouped in parts that each cover every row.

    `parts[i]` is a list of Shards (ref, num_rows) in row order; `part_keys[i]` the columns kept
    from that part when it is materialised (None: all of them), which makes `select` lazy;
    `required` the selected columns that must turn up in some part.
    """

    def __init__(
        self,
        parts: Sequence[Sequence[Shard | tuple[ray.ObjectRef, int]]],
        part_keys: Sequence[tuple[str, ...] | None] | None = None,
        required: Sequence[str] = (),
    ):
        self.parts: list[list[Shard]] = [[Shard(ref, int(n)) for ref, n in part] for part in parts]
        self.part_keys = list(part_keys) if part_keys is not None else [None] * len(self.parts)
        self.required = tuple(required)
        if not self.parts or any(not part for part in self.parts):
            raise ValueError("a DistributedBatch needs at least one part, each with at least one shard")
        if len(self.part_keys) != len(self.parts):
            raise ValueError(f"got {len(self.part_keys)} key filters for {len(self.parts)} parts")
        totals = [sum(s.num_rows for s in part) for part in self.parts]
        if len(set(totals)) != 1:
            raise ValueError(f"parts of a DistributedBatch must have the same number of rows, got {totals}")
        self._num_rows = totals[0]

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_batch(cls, batch: Batch, num_shards: int = 1) -> DistributedBatch:
        """Put a local batch into the object store as `num_shards` contiguous shards (driver side)."""
        return cls([[Shard(ray.put(share), len(share)) for share in batch.split(num_shards)]])

    @classmethod
    def from_refs(cls, refs: Sequence[ray.ObjectRef], sizes: Sequence[int]) -> DistributedBatch:
        """One part from per-shard references and their row counts, in row order."""
        if len(refs) != len(sizes):
            raise ValueError(f"got {len(refs)} refs but {len(sizes)} sizes")
        return cls([list(zip(refs, sizes))])

    # ------------------------------------------------------------------ metadata (no payload moves)
    def __len__(self) -> int:
        return self._num_rows

    def __repr__(self) -> str:
        shards = [[s.num_rows for s in part] for part in self.parts]
        return f"DistributedBatch(n={self._num_rows}, shard_rows={shards}, part_keys={self.part_keys})"

    @property
    def refs(self) -> list[ray.ObjectRef]:
        return [s.ref for part in self.parts for s in part]

    def union(self, other: DistributedBatch | Batch) -> DistributedBatch:
        """Columns of both, by reference: `other`'s parts are appended (a local Batch is put first)."""
        if isinstance(other, Batch):
            if len(other) != len(self):
                raise ValueError(
                    f"cannot union a DistributedBatch of {len(self)} rows with a Batch of {len(other)}"
                )
            other = DistributedBatch.from_batch(other)
        if len(other) != len(self):
            raise ValueError(f"cannot union DistributedBatches of {len(self)} and {len(other)} rows")
        return DistributedBatch(
            self.parts + other.parts, self.part_keys + other.part_keys, self.required + other.required
        )

    def select(self, *keys: str) -> DistributedBatch:
        """Keep only `keys` when materialised. Lazy: nothing is fetched now, missing keys raise then."""
        narrowed = [
            tuple(keys) if old is None else tuple(k for k in keys if k in old) for old in self.part_keys
        ]
        return DistributedBatch(self.parts, narrowed, keys)

    def row_ranges(self, num_chunks: int) -> list[tuple[int, int]]:
        """[start, stop) per data-parallel rank: contiguous, sizes differ by at most one, earlier larger."""
        return row_ranges(self._num_rows, num_chunks)

    # ------------------------------------------------------------------ payload (worker side)
    def materialize(self, start: int, stop: int) -> Batch:
        """Rows [start, stop) as a local Batch, fetching only the shards that overlap them."""
        # Parts that a select emptied are not fetched at all (unless nothing else is left).
        active = [i for i, keys in enumerate(self.part_keys) if keys != ()] or [0]
        parts = [self.parts[i] for i in active]
        plans = [shard_spans([s.num_rows for s in part], start, stop) for part in parts]
        refs = [part[i].ref for part, spans in zip(parts, plans) for i, _, _ in spans]
        fetched = iter(ray.get(refs))  # one call: the shards are pulled in parallel
        pieces = []
        for part, spans, keys in zip(parts, plans, [self.part_keys[i] for i in active]):
            slices = []
            for i, lo, hi in spans:
                shard = next(fetched)
                if len(shard) != part[i].num_rows:
                    raise RuntimeError(
                        f"shard {i} holds {len(shard)} rows but was recorded with {part[i].num_rows}"
                    )
                slices.append(shard if (lo, hi) == (0, len(shard)) else shard.slice(lo, hi))
            piece = slices[0] if len(slices) == 1 else Batch.concat(slices)
            if keys is not None:
                piece = piece.select(*[k for k in keys if k in piece])
            pieces.append(piece)
        kept = [p for p in pieces if p.keys()] or pieces[:1]
        joined = kept[0]
        for piece in kept[1:]:
            joined = joined.union(piece)
        missing = [k for k in self.required if k not in joined]
        if missing:
            raise KeyError(f"selected columns {missing} are in no part of this batch; it has {joined.keys()}")
        return joined

    def fetch(self) -> Batch:
        """Every row as one local Batch (for evaluation and tests; the training path never calls it)."""
        return self.materialize(0, self._num_rows)
