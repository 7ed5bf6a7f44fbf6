"""Samplers: which ready samples a `take` gets, and how they are shared among data-parallel ranks.

A sampler is a pure function of metadata only (ids, groups, lengths, versions), so it runs inside
the controller without touching a payload and is tested without Ray. It sees the samples that are
ready for the taking task (every requested field produced, not yet consumed by that task) in
admission order, and answers one list of ids per rank, or None when the ready set cannot yet
satisfy the request (the caller then waits for more producers).

Two steps make every sampler: *selection* (which `n` samples: the oldest `n`, or whole GRPO groups
only) and *assignment* (how they are cut into per-rank shares: contiguous, count-balanced, or
token-balanced). The registry names the combinations the issue asks for.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from tidal.dataflow.batch import even_split_sizes

SampleId = Hashable


@dataclass(frozen=True)
class SampleMeta:
    """What a sampler may look at: no payload, only bookkeeping recorded at `put` time."""

    id: SampleId
    group: Hashable | None = None  # GRPO group (e.g. prompt uid); None: the sample stands alone
    group_size: int = 1  # members the group will have once complete
    length: int = 0  # tokens (for length balancing)
    version: int | None = None  # oldest policy version that produced any of its tokens


Selector = Callable[[Sequence[SampleMeta], int], list[SampleMeta] | None]
Assigner = Callable[[list[SampleMeta], int], list[list[SampleMeta]]]


# ---------------------------------------------------------------------------------- selection
def select_fifo(ready: Sequence[SampleMeta], n: int) -> list[SampleMeta] | None:
    """The `n` oldest ready samples; groups are ignored (a group may be split across takes)."""
    return list(ready[:n]) if len(ready) >= n else None


def complete_groups(ready: Sequence[SampleMeta]) -> list[list[SampleMeta]]:
    """Units that may be taken under the whole-group rule, in order of their first member.

    A sample without a group is a unit of one. A grouped sample is only part of a unit once all
    `group_size` members of its group are ready; until then none of them may be taken.
    """
    units: dict[Hashable, list[SampleMeta]] = {}
    for meta in ready:
        key = ("solo", meta.id) if meta.group is None else ("group", meta.group)
        units.setdefault(key, []).append(meta)
    return [members for members in units.values() if len(members) >= members[0].group_size]


def select_groups(ready: Sequence[SampleMeta], n: int) -> list[SampleMeta] | None:
    """Exactly `n` samples made of whole groups, oldest first; a group that does not fit is skipped.

    Never returns part of a group: either all its members or none. None when the complete groups
    ready now cannot add up to `n` (e.g. groups of 4 and n=6 never can; the take times out saying so).
    """
    chosen: list[SampleMeta] = []
    for unit in complete_groups(ready):
        if len(chosen) + len(unit) <= n:
            chosen.extend(unit)
        if len(chosen) == n:
            return chosen
    return None


# ---------------------------------------------------------------------------------- assignment
def assign_contiguous(chosen: list[SampleMeta], num_ranks: int) -> list[list[SampleMeta]]:
    """Consecutive pieces, sizes differing by at most one (like `Batch.split`)."""
    out, start = [], 0
    for size in even_split_sizes(len(chosen), num_ranks):
        out.append(chosen[start : start + size])
        start += size
    return out


def assign_count_balanced(chosen: list[SampleMeta], num_ranks: int) -> list[list[SampleMeta]]:
    """Each rank its own share of equal count (±1), whole groups kept on one rank where possible.

    Groups are dealt out largest first to the rank with the fewest samples so far, so that members
    of one GRPO group (whose advantages are computed together) land on the same rank; the counts
    then differ by at most the size of one group, and by at most one without groups.
    """
    units: dict[Hashable, list[SampleMeta]] = {}
    for meta in chosen:
        units.setdefault(("solo", meta.id) if meta.group is None else ("group", meta.group), []).append(meta)
    ranks: list[list[SampleMeta]] = [[] for _ in range(num_ranks)]
    heap = [(0, r) for r in range(num_ranks)]
    for unit in sorted(units.values(), key=len, reverse=True):
        count, r = heapq.heappop(heap)
        ranks[r].extend(unit)
        heapq.heappush(heap, (count + len(unit), r))
    return ranks


def assign_length_balanced(chosen: list[SampleMeta], num_ranks: int) -> list[list[SampleMeta]]:
    """Equal sample counts (±1) per rank with the tokens per rank as even as the lengths allow.

    Longest-processing-time greedy under a count cap: samples in decreasing length each go to the
    rank with the fewest tokens among those not yet holding their share. The token spread is then
    at most the longest sample, which is within 10% whenever a rank holds ten or more samples of
    similar size. Groups are not kept whole here: balancing tokens matters more to the trainer
    than group locality (advantages are computed before the take).
    """
    caps = even_split_sizes(len(chosen), num_ranks)
    ranks: list[list[SampleMeta]] = [[] for _ in range(num_ranks)]
    tokens = [0] * num_ranks
    for meta in sorted(chosen, key=lambda m: m.length, reverse=True):
        open_ranks = [r for r in range(num_ranks) if len(ranks[r]) < caps[r]]
        r = min(open_ranks, key=lambda i: (tokens[i], i))
        ranks[r].append(meta)
        tokens[r] += meta.length
    return ranks


# ---------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Sampler:
    name: str
    select: Selector
    assign: Assigner
    whole_groups: bool  # staleness is then judged per complete group, not per sample

    def __call__(self, ready: Sequence[SampleMeta], n: int, num_ranks: int = 1) -> list[list[SampleId]] | None:
        if n < 1 or num_ranks < 1:
            raise ValueError(f"sampler {self.name!r} needs n >= 1 and num_ranks >= 1, got {n}, {num_ranks}")
        chosen = self.select(ready, n)
        if chosen is None:
            return None
        return [[m.id for m in share] for share in self.assign(chosen, num_ranks)]


SAMPLERS: dict[str, Sampler] = {
    "fifo": Sampler("fifo", select_fifo, assign_contiguous, whole_groups=False),
    "group": Sampler("group", select_groups, assign_contiguous, whole_groups=True),
    "rank_balanced": Sampler("rank_balanced", select_groups, assign_count_balanced, whole_groups=True),
    "length_balanced": Sampler("length_balanced", select_groups, assign_length_balanced, whole_groups=True),
}


def get_sampler(name: str | Sampler) -> Sampler:
    if isinstance(name, Sampler):
        return name
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}") from None
