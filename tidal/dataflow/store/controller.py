"""The store's metadata actor: the `StoreIndex` bookkeeping inside one *async* Ray actor.

Producers and consumers block in it (a full store, not enough ready samples): each blocked call is
a coroutine waiting on one `asyncio.Condition`, so waits cost nothing and never stop the actor from
serving the `commit` or `take` that will wake them (a plain actor runs one call at a time and would
deadlock; client-side polling would add latency and load). All methods run on the actor's single
event-loop thread, so the index needs no locks. The controller also issues the storage units'
`gather` and `free` calls itself: Ray runs one caller's calls to an actor in order, so a sample's
payload is never freed before a take that chose it has copied it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import ray

from tidal.dataflow.distributed_batch import DistributedBatch, Shard
from tidal.dataflow.store.index import Location, StoreIndex, StoreTimeout, TakePlan
from tidal.dataflow.store.samplers import SampleId, SampleMeta

__all__ = ["ControllerCore", "StoreController", "StoreTimeout"]


class ControllerCore:
    """The metadata actor's logic as a plain class (`StoreController` is it as an async Ray actor).

    Kept undecorated so that its waiting logic (backpressure, take) runs under plain asyncio in
    the unit tests, with stand-in storage units, without starting Ray.
    """

    def __init__(self, tasks: Sequence[str], capacity: int, units: Sequence[Any], auto_clear: bool = True):
        self.index = StoreIndex(tasks, capacity, auto_clear)
        self.units = list(units)
        self._cond: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:  # made on the actor's event loop
            self._cond = asyncio.Condition()
        return self._cond

    async def _wait(self, predicate: Any, timeout_s: float, message: Any) -> None:
        cond, deadline = self._condition(), time.monotonic() + timeout_s
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreTimeout(message())
            try:
                await asyncio.wait_for(cond.wait(), remaining)
            except TimeoutError:
                pass

    async def admit(self, producer: str, metas: list[SampleMeta], timeout_s: float) -> None:
        """Block until the new samples among `metas` fit under the capacity, then enter them."""
        cond = self._condition()
        async with cond:
            k = len(self.index.new_ids([m.id for m in metas]))
            if k > self.index.capacity:
                raise ValueError(f"producer {producer!r}: {k} new samples can never fit capacity {self.index.capacity}")
            await self._wait(
                lambda: self.index.can_admit(len(self.index.new_ids([m.id for m in metas]))), timeout_s,
                lambda: (
                    f"producer {producer!r} waited {timeout_s:.1f}s to admit {k} samples: the store holds "
                    f"{self.index.unfinished} of capacity {self.index.capacity} unfinished samples; "
                    f"not yet consumed per task: {self.index.waiting_on()}"
                ),
            )
            self.index.admit(metas)

    async def commit(self, ids: list, fields: list[str], locations: list[Location], versions: list | None) -> None:
        cond = self._condition()
        async with cond:
            self.index.commit(ids, fields, locations, versions)
            cond.notify_all()

    async def take(
        self, task: str, fields: list[str], n: int, sampler: str, num_ranks: int,
        min_version: int | None, timeout_s: float, all_fields: bool = False, partial: bool = False,
    ) -> tuple[DistributedBatch, list[list[SampleId]], list[SampleId], list[int | None]]:
        """Block until `n` samples can be served, consume them, return their rows by reference."""
        if partial:
            n = min(n, self.index.capacity)
        if n > self.index.capacity:
            raise ValueError(f"task {task!r}: a take of {n} can never be served by a store of capacity {self.index.capacity}")
        cond = self._condition()
        async with cond:
            stale: list[SampleId] = []
            plans: list[TakePlan] = []

            def served() -> bool:
                plan = self.index.take(task, fields, n, sampler, num_ranks, min_version, all_fields, partial)
                stale.extend(plan.stale)
                plans.append(plan)
                if plan.shares is None and plan.stale:
                    self._free(plan.freed)  # refusals may finish samples: room for producers
                    cond.notify_all()  # (only then: waking the other waiters for nothing would spin)
                return plan.shares is not None

            await self._wait(served, timeout_s, lambda: (
                f"waited {timeout_s:.1f}s: " + self.index.describe_missing(task, fields, n, sampler)
                + (f"; refused {len(stale)} stale samples (version < {min_version}): {stale[:10]}" if stale else "")
            ))
            plan = plans[-1]
            ids = [i for share in plan.shares for i in share]
            if all_fields:
                fields = _common_fields(ids, plan.locations, task)
            batch = self._gather(ids, fields, plan.locations)
            self._free(plan.freed)  # after the gathers: a unit runs our calls in order
            cond.notify_all()  # consumption may have made room for producers
            return batch, plan.shares, stale, plan.versions

    def _gather(self, ids: list[SampleId], fields: list[str], locs: dict[SampleId, dict[str, Location]]) -> DistributedBatch:
        """One part per set of fields stored together; one shard per run of rows on one unit."""
        by_layout: dict[tuple, list[str]] = {}
        for f in fields:
            by_layout.setdefault(tuple(locs[i][f][:2] for i in ids), []).append(f)
        parts = []
        for layout, part_fields in by_layout.items():
            shards, start = [], 0
            while start < len(ids):
                unit, stop = layout[start][0], start
                while stop < len(ids) and layout[stop][0] == unit:
                    stop += 1
                rows = [locs[i][part_fields[0]][1:] for i in ids[start:stop]]
                shards.append(Shard(self.units[unit].gather.remote(rows, part_fields), stop - start))
                start = stop
            parts.append(shards)
        return DistributedBatch(parts)

    def _free(self, freed: list[Location]) -> None:
        by_unit: dict[int, list[tuple[str, int]]] = {}
        for unit, chunk, row in freed:
            by_unit.setdefault(unit, []).append((chunk, row))
        for unit, rows in by_unit.items():
            self.units[unit].free.remote(rows)

    async def clear(self) -> int:
        """Drop every finished sample now (for stores made with auto_clear=False)."""
        cond = self._condition()
        async with cond:
            before = self.index.counters["cleared"]
            self._free(self.index.clear())
            cond.notify_all()
            return self.index.counters["cleared"] - before

    def stats(self) -> dict[str, Any]:
        return {
            "size": len(self.index.samples), "unfinished": self.index.unfinished,
            "capacity": self.index.capacity, "waiting_on": self.index.waiting_on(), **self.index.counters,
        }

    def state_dict(self) -> dict[str, Any]:
        return self.index.state_dict()

    async def load_state_dict(self, state: dict[str, Any]) -> None:
        cond = self._condition()
        async with cond:
            self.index.load_state_dict(state)
            cond.notify_all()


def _common_fields(ids: list[SampleId], locs: dict[SampleId, dict[str, Location]], task: str) -> list[str]:
    """The fields every taken sample has, which must be all of each one's (one batch, one set of columns)."""
    fields = list(locs[ids[0]])
    for sid in ids[1:]:
        if set(locs[sid]) != set(fields):
            raise ValueError(
                f"task {task!r} took every field, but sample {sid!r} has {sorted(locs[sid])} and "
                f"{ids[0]!r} has {sorted(fields)}; producers must store the same columns for all samples"
            )
    return fields


StoreController = ray.remote(num_cpus=0)(ControllerCore)
