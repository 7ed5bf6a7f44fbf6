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

Selected columns are cut where the shard lives. A part narrowed by `select` whose shards sit on
another node is not fetched whole: one small Ray task per part (`_cut_part`, no CPU asked, default
scheduling, which places a task next to its largest arguments) receives that part's overlapping
shards, keeps only the selected columns and rows, and returns them as a new, small object; the
caller fetches that. So a worker that needs 2 columns of a shard holding 10 does not pull the
other 8 over the network (a plain `ray.get` transfers the whole object, then unpickles every text
column). When all of a part's shards are already on the caller's node (or small), the default
(`cut="auto"`) fetches them directly instead: tensor columns are then mapped from shared memory
without a copy, and the task round trip (~5-10 ms on a loaded 2-core box) costs more than it
saves; only text columns of such shards are unpickled needlessly. `cut="always"` forces the task,
`cut="never"` is the old path (whole shards fetched, cut here), kept as the reference;
benchmarks/select_columns.py measures bytes and time of both.

Why not store shards column-wise (one object per column, so a select fetches only those refs)?
Shards are the return values of worker endpoints and tasks (`(batch, num_rows)` per rank, see
tidal/controller/dispatch.py), so column-wise storage would change every producer and the
collect path, and multiply the objects per step by the number of columns; the task keeps the
change inside this module.
"""

from __future__ import annotations

import time
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


def _cut(shard: Batch, index: int, num_rows: int, lo: int, hi: int, keys: Sequence[str] | None) -> Batch:
    """Rows [lo, hi) and the columns `keys` (None: all; absent ones skipped) of one fetched shard."""
    if len(shard) != num_rows:
        raise RuntimeError(f"shard {index} holds {len(shard)} rows but was recorded with {num_rows}")
    if keys is not None:
        shard = shard.select(*[k for k in keys if k in shard])
    return shard if (lo, hi) == (0, len(shard)) else shard.slice(lo, hi)


def _join_part(slices: list[Batch]) -> Batch:
    return slices[0] if len(slices) == 1 else Batch.concat(slices)


# Below this size a whole shard costs less to fetch than a task round trip (a few ms) to cut it.
SMALL_SHARD_BYTES = 64 * 1024


def _near(refs: list[ray.ObjectRef]) -> dict[ray.ObjectRef, bool]:
    """Whether each object is cheap to fetch whole: held on this node, or small (size known).

    On a one-node cluster every object is here. Otherwise only this worker's own view (no RPC)
    is asked; an object it knows nothing of is not near. Never the owners: Ray 2.60's owner
    query (`get_object_locations`) aborted whole processes (SIGABRT, "Promise already
    satisfied" in the core worker) under load, even with each ref asked once and no timeout.
    """
    unique = list(dict.fromkeys(refs))
    if _one_node():
        return {ref: True for ref in unique}
    here = ray.get_runtime_context().get_node_id()
    found = ray.experimental.get_local_object_locations(unique)
    near = {
        ref: here in (loc.get("node_ids") or [])
        or (loc.get("object_size") is not None and loc["object_size"] <= SMALL_SHARD_BYTES)
        for ref, loc in found.items()
    }
    return {ref: near.get(ref, False) for ref in unique}


_NODES_TTL_S = 30.0  # nodes join and leave (autoscaling); ask again after this long
_nodes_seen: tuple[float, bool] = (float("-inf"), False)  # (when asked, one alive node)


def _one_node() -> bool:
    global _nodes_seen
    asked, one = _nodes_seen
    if time.monotonic() - asked > _NODES_TTL_S:
        one = sum(1 for node in ray.nodes() if node.get("Alive")) == 1
        _nodes_seen = (time.monotonic(), one)
    return one


@ray.remote(num_cpus=0)
def _cut_part(keys: tuple[str, ...], spans: list[tuple[int, int, int, int]], *shards: Batch) -> Batch:
    """Runs next to the shards: only the selected columns of the wanted rows go back to the caller.

    `spans` holds (shard index, recorded rows, local start, local stop) per shard in `shards`;
    Ray resolves the shard references (top-level arguments) on this task's node.
    """
    return _join_part([_cut(s, i, n, lo, hi, keys) for s, (i, n, lo, hi) in zip(shards, spans)])


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

    def select(self, *keys: str, optional: Sequence[str] = ()) -> DistributedBatch:
        """Keep only `keys` (and those of `optional` that some part has) when materialised.

        Lazy: nothing is fetched now; a missing key of `keys` raises then, a missing optional one
        is just absent from the result.
        """
        wanted = tuple(keys) + tuple(k for k in optional if k not in keys)
        narrowed = [wanted if old is None else tuple(k for k in wanted if k in old) for old in self.part_keys]
        return DistributedBatch(self.parts, narrowed, keys)

    def row_ranges(self, num_chunks: int) -> list[tuple[int, int]]:
        """[start, stop) per data-parallel rank: contiguous, sizes differ by at most one, earlier larger."""
        return row_ranges(self._num_rows, num_chunks)

    # ------------------------------------------------------------------ payload (worker side)
    def materialize(self, start: int, stop: int, cut: str = "auto") -> Batch:
        """Rows [start, stop) as a local Batch, fetching only the shards that overlap them.

        `cut` says where a part narrowed by `select` is cut to its columns: "auto" next to its
        shards (`_cut_part`) unless they are all on this node (mapped zero-copy, so a task round
        trip costs more than it saves) or small; "always" next to them; "never" here, after
        fetching whole shards (the old path, kept as the reference). Parts not narrowed are
        always fetched whole.
        """
        if cut not in ("auto", "always", "never"):
            raise ValueError(f"cut must be 'auto', 'always' or 'never', got {cut!r}")
        # Parts that a select emptied are not fetched at all (unless nothing else is left).
        active = [i for i, keys in enumerate(self.part_keys) if keys != ()] or [0]
        parts = [self.parts[i] for i in active]
        keys_of = [self.part_keys[i] for i in active]
        plans = [shard_spans([s.num_rows for s in part], start, stop) for part in parts]
        remote = [cut != "never" and keys is not None for keys in keys_of]
        if cut == "auto" and any(remote):
            candidates = [
                part[i].ref for part, spans, r in zip(parts, plans, remote) if r for i, _, _ in spans
            ]
            near = _near(candidates)
            remote = [
                r and not all(near[part[i].ref] for i, _, _ in spans)
                for part, spans, r in zip(parts, plans, remote)
            ]
        refs = []
        for part, spans, keys, is_cut in zip(parts, plans, keys_of, remote):
            if is_cut:
                cut_spans = [(i, part[i].num_rows, lo, hi) for i, lo, hi in spans]
                refs.append(_cut_part.remote(keys, cut_spans, *[part[i].ref for i, _, _ in spans]))
            else:
                refs.extend(part[i].ref for i, _, _ in spans)
        fetched = iter(ray.get(refs))  # one call: the shards (or their cuts) are pulled in parallel
        pieces = []
        for part, spans, keys, is_cut in zip(parts, plans, keys_of, remote):
            if is_cut:
                pieces.append(next(fetched))
            else:
                pieces.append(
                    _join_part(
                        [_cut(next(fetched), i, part[i].num_rows, lo, hi, keys) for i, lo, hi in spans]
                    )
                )
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
