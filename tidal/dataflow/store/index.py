"""The store's pure bookkeeping: `StoreIndex`, testable without Ray (the controller actor wraps it).

It knows, per sample, which fields have been produced and where each lives (storage unit, chunk,
row), which tasks have consumed it, its GRPO group, its length and its oldest policy version. It
never holds a payload. Its invariants (each sample consumed at most once per task, whole groups,
capacity) are property-tested in tests/unit/test_stream_store.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tidal.dataflow.store.samplers import SampleId, SampleMeta, complete_groups, get_sampler

Location = tuple[int, str, int]  # (storage unit index, chunk id, row in chunk)


class StoreTimeout(TimeoutError):
    """A put or take waited longer than its timeout; the message names what it waited for."""


@dataclass
class _Sample:
    meta: SampleMeta
    fields: dict[str, Location] = field(default_factory=dict)
    consumed: set[str] = field(default_factory=set)


@dataclass
class TakePlan:
    shares: list[list[SampleId]] | None  # per rank; None: not enough ready samples yet
    stale: list[SampleId]  # refused for being older than min_version (now consumed by the task)
    freed: list[Location]  # payload rows no longer needed by anyone (auto-clear)
    locations: dict[SampleId, dict[str, Location]] = field(default_factory=dict)  # of the taken ones
    versions: list[int | None] = field(default_factory=list)  # of the taken ones, in share order


class StoreIndex:
    """Readiness, consumption, groups, versions and capacity of the samples in the store.

    `tasks` are the consumers every sample waits for (e.g. reward, log-prob, trainer); a sample
    consumed by all of them is *finished*: it no longer counts against `capacity` and `clear`
    drops it. Admission order is kept (dicts are ordered) and is the order samplers see.
    """

    def __init__(self, tasks: Sequence[str], capacity: int, auto_clear: bool = True):
        if not tasks:
            raise ValueError("a store needs at least one consuming task")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.tasks = tuple(tasks)
        self.capacity = int(capacity)
        self.auto_clear = auto_clear
        self.samples: dict[SampleId, _Sample] = {}
        self.unfinished = 0
        self.counters: dict[str, int] = {"admitted": 0, "cleared": 0, "stale": 0, "peak_unfinished": 0}
        self.counters.update({f"taken/{t}": 0 for t in self.tasks})

    # ------------------------------------------------------------------ admission (producers)
    def new_ids(self, ids: Sequence[SampleId]) -> list[SampleId]:
        return [i for i in dict.fromkeys(ids) if i not in self.samples]

    def can_admit(self, k: int) -> bool:
        return self.unfinished + k <= self.capacity

    def admit(self, metas: Sequence[SampleMeta]) -> None:
        """Enter new samples (no field ready yet). Raises if that would exceed the capacity."""
        new = [m for m in metas if m.id not in self.samples]
        if len(new) > self.capacity:
            raise ValueError(f"one put of {len(new)} new samples can never fit a store of capacity {self.capacity}")
        if not self.can_admit(len(new)):
            raise RuntimeError(f"admitting {len(new)} samples would exceed capacity {self.capacity}")
        for meta in new:
            self.samples[meta.id] = _Sample(meta)
        self.unfinished += len(new)
        self.counters["admitted"] += len(new)
        self.counters["peak_unfinished"] = max(self.counters["peak_unfinished"], self.unfinished)

    def commit(
        self, ids: Sequence[SampleId], fields: Sequence[str], locations: Sequence[Location],
        versions: Sequence[int | None] | None = None,
    ) -> None:
        """Mark `fields` of `ids` produced, stored at `locations`; a version lowers the sample's min."""
        unknown = [i for i in ids if i not in self.samples]
        if unknown:
            raise KeyError(f"samples {unknown[:5]} were never admitted (or were already cleared)")
        for sid in ids:  # validate all first: a refused commit changes nothing
            twice = [f for f in fields if f in self.samples[sid].fields]
            if twice:
                raise ValueError(f"fields {twice} of sample {sid!r} were already produced")
        for k, sid in enumerate(ids):
            sample = self.samples[sid]
            for f in fields:
                sample.fields[f] = locations[k]
            v = None if versions is None else versions[k]
            if v is not None and (sample.meta.version is None or v < sample.meta.version):
                sample.meta = SampleMeta(**{**sample.meta.__dict__, "version": int(v)})

    # ------------------------------------------------------------------ consumption (tasks)
    def ready(self, task: str, fields: Sequence[str]) -> list[SampleMeta]:
        """Samples with every field in `fields` produced and not yet consumed by `task`."""
        self._check_task(task)
        return [
            s.meta for s in self.samples.values()
            if task not in s.consumed and all(f in s.fields for f in fields)
        ]

    def take(
        self, task: str, fields: Sequence[str], n: int, sampler: str = "fifo", num_ranks: int = 1,
        min_version: int | None = None, all_fields: bool = False, partial: bool = False,
    ) -> TakePlan:
        """Choose and consume `n` ready samples for `task`, or consume nothing (`shares` None).

        Samples older than `min_version` are refused: marked consumed by this task (so they do not
        block it or the store) and reported in `stale`. Whole-group samplers judge a complete group
        by its oldest member and refuse it whole. `all_fields`: serve every field the chosen
        samples have (they must have the same ones), `fields` only deciding readiness. `partial`:
        take up to `n` (whole groups, oldest first) as soon as at least one unit is ready.
        """
        spec = get_sampler(sampler)
        ready = self.ready(task, fields)
        stale: list[SampleId] = []
        if min_version is not None:
            units = complete_groups(ready) if spec.whole_groups else [[m] for m in ready]
            for unit in units:
                if any(m.version is not None and m.version < min_version for m in unit):
                    stale.extend(m.id for m in unit)
            if stale:
                gone = set(stale)
                ready = [m for m in ready if m.id not in gone]
        if partial:
            n = _servable(ready, n, spec.whole_groups)
        shares = spec(ready, n, num_ranks) if n > 0 else None
        chosen = list(stale) + ([i for share in shares for i in share] if shares is not None else [])
        self.counters["stale"] += len(stale)
        for sid in chosen:
            self._consume(sid, task)
        plan = TakePlan(shares, stale, [])
        if shares is not None:
            self.counters[f"taken/{task}"] += n
            for share in shares:
                for sid in share:
                    sample = self.samples[sid]
                    plan.locations[sid] = dict(sample.fields) if all_fields else {f: sample.fields[f] for f in fields}
                    plan.versions.append(sample.meta.version)
        plan.freed = self.clear() if self.auto_clear else []
        return plan

    def _consume(self, sid: SampleId, task: str) -> None:
        sample = self.samples[sid]
        if task in sample.consumed:  # the invariant the property tests guard
            raise AssertionError(f"sample {sid!r} consumed twice by {task!r}")
        sample.consumed.add(task)
        if len(sample.consumed) == len(self.tasks):
            self.unfinished -= 1

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this store's consumers are {list(self.tasks)}")

    def describe_missing(self, task: str, fields: Sequence[str], n: int, sampler: str) -> str:
        """Why a take of `n` cannot be served yet: what is ready, what each field still lacks."""
        pending = [s for s in self.samples.values() if task not in s.consumed]
        lacking = {f: sum(f not in s.fields for s in pending) for f in fields}
        ready = self.ready(task, fields)
        incomplete = len(ready) - sum(len(u) for u in complete_groups(ready))
        return (
            f"task {task!r} wants {n} samples with fields {list(fields)} (sampler {sampler!r}); "
            f"{len(ready)} ready ({incomplete} in incomplete groups), {len(pending)} not yet consumed by it; "
            f"samples still lacking each field: {lacking}"
        )

    def waiting_on(self) -> dict[str, int]:
        """Per task, how many unfinished samples it has not consumed (what backpressure waits for)."""
        live = [s for s in self.samples.values() if len(s.consumed) < len(self.tasks)]
        return {t: sum(t not in s.consumed for s in live) for t in self.tasks}

    # ------------------------------------------------------------------ memory
    def clear(self) -> list[Location]:
        """Drop samples every task has consumed; returns their payload rows so storage can free them."""
        done = [sid for sid, s in self.samples.items() if len(s.consumed) == len(self.tasks)]
        freed = sorted({loc for sid in done for loc in self.samples.pop(sid).fields.values()})
        self.counters["cleared"] += len(done)
        return freed

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks), "capacity": self.capacity, "counters": dict(self.counters),
            "samples": [(sid, s.meta.__dict__, dict(s.fields), sorted(s.consumed)) for sid, s in self.samples.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["tasks"]) != list(self.tasks):
            raise ValueError(f"checkpoint is for tasks {state['tasks']}, this store has {list(self.tasks)}")
        self.counters = dict(state["counters"])
        self.samples = {
            sid: _Sample(SampleMeta(**meta), {f: tuple(loc) for f, loc in fields.items()}, set(consumed))
            for sid, meta, fields, consumed in state["samples"]
        }
        self.unfinished = sum(len(s.consumed) < len(self.tasks) for s in self.samples.values())


def _servable(ready: Sequence[SampleMeta], n: int, whole_groups: bool) -> int:
    """The most samples, up to `n`, that the oldest ready units make up (0: none ready)."""
    if not whole_groups:
        return min(n, len(ready))
    total = 0
    for unit in complete_groups(ready):
        if total + len(unit) > n:
            break
        total += len(unit)
    return total
