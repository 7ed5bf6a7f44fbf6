"""StreamStore bookkeeping without Ray: samplers and StoreIndex (readiness, per-task consumption,
groups, versions, capacity, clear, checkpoint), with hypothesis property tests."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.dataflow.store.controller import ControllerCore
from tidal.dataflow.store.index import StoreIndex, StoreTimeout
from tidal.dataflow.store.samplers import SAMPLERS, SampleMeta, get_sampler

TASKS = ("reward", "logprob", "train")
FAST = settings(max_examples=60, deadline=None)


def grouped(sizes: list[int], lengths: list[int] | None = None) -> list[SampleMeta]:
    """Samples of groups with the given sizes, ids 0.. in order."""
    out, k = [], 0
    for g, size in enumerate(sizes):
        for _ in range(size):
            out.append(SampleMeta(k, group=g, group_size=size, length=(lengths[k] if lengths else 1)))
            k += 1
    return out


def loc(i: int) -> tuple[int, str, int]:
    return (0, f"c{i}", 0)


def put(index: StoreIndex, metas: list[SampleMeta], fields=("x",), versions=None) -> None:
    index.admit(metas)
    index.commit([m.id for m in metas], list(fields), [loc(m.id) for m in metas], versions)


# ---------------------------------------------------------------------------------- samplers
def test_fifo_takes_oldest_and_waits_for_enough():
    ready = [SampleMeta(i) for i in range(5)]
    assert SAMPLERS["fifo"](ready, 3, 1) == [[0, 1, 2]]
    assert SAMPLERS["fifo"](ready, 5, 2) == [[0, 1, 2], [3, 4]]
    assert SAMPLERS["fifo"](ready, 6, 1) is None
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("nope")


@FAST
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=12),
    drop=st.sets(st.integers(0, 59)),
    n=st.integers(1, 20),
    ranks=st.integers(1, 4),
    name=st.sampled_from(["group", "rank_balanced", "length_balanced"]),
)
def test_group_samplers_never_split_a_group(sizes, drop, n, ranks, name):
    ready = [m for m in grouped(sizes) if m.id not in drop]  # some members not ready yet
    shares = SAMPLERS[name](ready, n, ranks)
    if shares is None:
        return
    chosen = [i for s in shares for i in s]
    assert len(chosen) == n == len(set(chosen)) and len(shares) == ranks
    by_id = {m.id: m for m in ready}
    for g, size in enumerate(sizes):
        members = [i for i in chosen if by_id[i].group == g]
        assert len(members) in (0, size)


def test_group_sampler_skips_incomplete_and_oversized_groups():
    ready = grouped([4, 2, 4])[1:]  # group 0 misses a member
    assert SAMPLERS["group"](ready, 6, 1) == [[4, 5, 6, 7, 8, 9]]
    assert SAMPLERS["group"](ready, 3, 1) is None  # groups of 2 and 4 never make 3


def test_rank_balanced_gives_equal_shares_and_keeps_groups_on_one_rank():
    shares = SAMPLERS["rank_balanced"](grouped([4] * 4), 16, 2)
    assert [len(s) for s in shares] == [8, 8]
    for share in shares:
        assert {i // 4 for i in share} == {i // 4 for i in share if i % 4 == 0}
    assert [len(s) for s in SAMPLERS["rank_balanced"]([SampleMeta(i) for i in range(7)], 7, 3)] == [3, 2, 2]


@FAST
@given(lengths=st.lists(st.integers(1, 2000), min_size=1, max_size=64), ranks=st.integers(1, 8))
def test_length_balanced_spread_is_at_most_one_sample(lengths, ranks):
    ready = [SampleMeta(i, length=n) for i, n in enumerate(lengths)]
    shares = SAMPLERS["length_balanced"](ready, len(ready), ranks)
    counts = sorted(len(s) for s in shares)
    assert counts[-1] - counts[0] <= 1
    tokens = [sum(lengths[i] for i in s) for s in shares]
    if len(lengths) >= ranks:
        assert max(tokens) - min(tokens) <= max(lengths)


def test_length_balanced_within_ten_percent_on_realistic_lengths():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(50, 1000) for _ in range(128)]
    shares = SAMPLERS["length_balanced"]([SampleMeta(i, length=n) for i, n in enumerate(lengths)], 128, 4)
    tokens = [sum(lengths[i] for i in s) for s in shares]
    assert max(tokens) <= 1.1 * min(tokens), tokens
    naive = [sum(lengths[i * 32 : (i + 1) * 32]) for i in range(4)]
    assert max(tokens) - min(tokens) <= max(naive) - min(naive)


# ---------------------------------------------------------------------------------- index
def test_readiness_needs_every_field_and_consumption_is_per_task():
    index = StoreIndex(TASKS, capacity=10)
    put(index, [SampleMeta(i) for i in range(3)], fields=("prompt", "response"))
    assert index.take("reward", ["response", "reward"], 1).shares is None  # no reward yet
    index.commit([0, 1, 2], ["reward"], [loc(9)] * 3)
    assert index.take("train", ["response", "reward"], 2).shares == [[0, 1]]
    assert index.take("reward", ["response"], 3).shares == [[0, 1, 2]]  # independent of train
    assert index.take("train", ["response", "reward"], 2).shares is None  # one left for train
    assert index.take("train", ["response"], 1).shares == [[2]]
    with pytest.raises(ValueError, match="already produced"):
        index.commit([0], ["reward"], [loc(0)])
    put(index, [SampleMeta(5)], fields=("prompt",))
    with pytest.raises(ValueError, match="already produced"):
        index.commit([5, 0], ["reward"], [loc(5), loc(0)])
    assert "reward" not in index.samples[5].fields  # a refused commit changes nothing
    with pytest.raises(KeyError, match="never admitted"):
        index.commit([99], ["reward"], [loc(0)])
    with pytest.raises(ValueError, match="unknown task"):
        index.ready("critic", ["x"])


def test_fully_consumed_samples_are_cleared_and_free_capacity():
    index = StoreIndex(("a", "b"), capacity=4)
    put(index, [SampleMeta(i) for i in range(4)])
    assert not index.can_admit(1)
    with pytest.raises(RuntimeError, match="exceed capacity"):
        index.admit([SampleMeta(9)])
    with pytest.raises(ValueError, match="can never fit"):
        index.admit([SampleMeta(i) for i in range(10, 15)])
    index.take("a", ["x"], 4)
    assert not index.can_admit(1) and len(index.samples) == 4
    plan = index.take("b", ["x"], 3)
    assert sorted(plan.freed) == sorted(loc(i) for i in range(3)) and len(index.samples) == 1
    assert index.can_admit(3) and not index.can_admit(4)


def test_min_version_refuses_and_reports_stale_samples_and_groups():
    index = StoreIndex(("train",), capacity=20)
    put(index, [SampleMeta(i) for i in range(4)], versions=[1, 3, 2, 5])
    plan = index.take("train", ["x"], 2, min_version=2)
    assert plan.stale == [0] and plan.shares == [[1, 2]] and plan.versions == [3, 2]
    # per-token versions: a group is judged by its oldest member and refused whole
    put(index, [SampleMeta(10 + k, group=k // 2, group_size=2) for k in range(4)], versions=[4, 1, 4, 4])
    plan = index.take("train", ["x"], 3, sampler="group", min_version=2)
    assert plan.stale == [10, 11] and plan.shares == [[3, 12, 13]]
    assert index.counters["stale"] == 3


def test_state_dict_roundtrip_keeps_consumption_groups_versions_counters():
    index = StoreIndex(TASKS, capacity=8)
    put(index, grouped([2, 2]), versions=[1, 2, 3, 4])
    index.take("reward", ["x"], 2, sampler="group")
    state = index.state_dict()
    other = StoreIndex(TASKS, capacity=8)
    other.load_state_dict(state)
    assert other.state_dict() == state and other.unfinished == index.unfinished == 4
    assert [m.id for m in other.ready("reward", ["x"])] == [2, 3]
    assert other.samples[0].meta.group == 0 and other.samples[3].meta.version == 4
    with pytest.raises(ValueError, match="tasks"):
        StoreIndex(("x",), 8).load_state_dict(state)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(1, 4), st.integers(1, 3), st.integers(0, 3)),  # size, count, version
        st.tuples(st.just("field"), st.integers(0, 200)),  # reward for a sample
        st.tuples(
            st.sampled_from(TASKS), st.integers(1, 6), st.sampled_from(sorted(SAMPLERS)),
            st.sampled_from([None, None, 1, 2]),  # min_version
        ),
    ),
    max_size=40,
)


@FAST
@given(ops=ops, capacity=st.integers(4, 16))
def test_every_sample_consumed_exactly_once_per_task_and_capacity_holds(ops, capacity):
    """Random puts, late fields and takes, then a drain: each task saw each sample exactly once,
    no group was ever split, the capacity was never exceeded and the drained store is empty."""
    index = StoreIndex(TASKS, capacity=capacity)
    taken = {t: [] for t in TASKS}
    admitted, next_id, next_group = [], 0, 0
    fields = {"train": ["x", "reward"], "reward": ["x"], "logprob": ["x"]}
    meta_of = {}

    def record(task, plan, sampler="fifo"):
        chosen = [i for s in plan.shares or [] for i in s]
        if SAMPLERS[sampler].whole_groups:  # whole groups only (fifo may split them)
            for g in {meta_of[i].group for i in chosen + plan.stale}:
                members = [i for i in chosen + plan.stale if meta_of[i].group == g]
                assert len(members) == meta_of[members[0]].group_size
        taken[task].extend(chosen + plan.stale)

    for op in ops:
        if op[0] == "put":
            metas = []
            for _ in range(op[2]):
                metas += [SampleMeta(next_id + k, group=next_group, group_size=op[1]) for k in range(op[1])]
                next_id, next_group = next_id + op[1], next_group + 1
            if index.can_admit(len(metas)):
                put(index, metas, versions=[op[3]] * len(metas))
                admitted += [m.id for m in metas]
                meta_of.update({m.id: m for m in metas})
        elif op[0] == "field":
            if admitted and admitted[op[1] % len(admitted)] in index.samples:
                sid = admitted[op[1] % len(admitted)]
                if "reward" not in index.samples[sid].fields:
                    index.commit([sid], ["reward"], [loc(sid)])
        else:
            record(op[0], index.take(op[0], fields[op[0]], op[1], sampler=op[2], min_version=op[3]), op[2])
        assert 0 <= index.unfinished <= capacity
    for sid in admitted:  # late rewards, then drain every task
        if sid in index.samples and "reward" not in index.samples[sid].fields:
            index.commit([sid], ["reward"], [loc(sid)])
    for task in TASKS:
        left = len(index.ready(task, fields[task]))
        if left:
            record(task, index.take(task, fields[task], left))
    for task in TASKS:
        assert sorted(taken[task]) == sorted(admitted), task
    assert index.samples == {} and index.unfinished == 0
    assert index.counters["cleared"] == len(admitted)


# ---------------------------------------------------------------------------------- controller waits
class FakeUnit:
    """Stands in for a storage unit: `gather` answers a token instead of a ref, `free` records."""

    def __init__(self):
        self.freed = []
        self.gather = SimpleNamespace(remote=lambda rows, fields: ("gathered", tuple(rows), tuple(fields)))
        self.free = SimpleNamespace(remote=self.freed.extend)


@settings(max_examples=25, deadline=None)
@given(
    producers=st.integers(2, 5), chunks=st.integers(1, 4), chunk=st.integers(1, 3),
    spare=st.integers(0, 3), n=st.integers(1, 4),
)
def test_capacity_never_exceeded_under_concurrent_producers(producers, chunks, chunk, spare, n):
    """Producers and two consumers as concurrent coroutines on the controller's own waiting logic.

    The capacity is the smallest that cannot deadlock (largest take + largest put - 1) plus spare.
    """
    capacity = n + chunk - 1 + spare
    unit = FakeUnit()
    core = ControllerCore(("a", "b"), capacity, [unit])
    total = producers * chunks * chunk
    taken = {"a": [], "b": []}

    async def produce(p):
        for c in range(chunks):
            ids = [(p, c, k) for k in range(chunk)]
            await core.admit(f"p{p}", [SampleMeta(i) for i in ids], timeout_s=5)
            assert core.index.unfinished <= capacity
            await asyncio.sleep(0)  # let others run between admission and commit
            await core.commit(ids, ["x"], [(0, f"{p}-{c}", k) for k in range(chunk)], None)

    async def consume(task):
        while len(taken[task]) < total:
            batch, shares, stale, _ = await core.take(task, ["x"], min(n, total - len(taken[task])), "fifo", 1, None, 5)
            assert len(batch) == len(shares[0]) and not stale
            taken[task] += shares[0]

    async def main():
        await asyncio.gather(*[produce(p) for p in range(producers)], consume("a"), consume("b"))

    asyncio.run(main())
    everything = sorted((p, c, k) for p in range(producers) for c in range(chunks) for k in range(chunk))
    assert sorted(taken["a"]) == everything and sorted(taken["b"]) == everything
    assert core.index.counters["peak_unfinished"] <= capacity and core.index.samples == {}
    assert len(unit.freed) == total


def test_controller_timeouts_name_the_producer_and_the_task():
    core = ControllerCore(("a", "b"), 2, [FakeUnit()])

    async def main():
        await core.admit("gen-0", [SampleMeta(0), SampleMeta(1)], timeout_s=1)
        with pytest.raises(StoreTimeout, match=r"producer 'gen-1'.*capacity 2.*'a': 2, 'b': 2"):
            await core.admit("gen-1", [SampleMeta(2)], timeout_s=0.05)
        with pytest.raises(ValueError, match="never fit"):
            await core.admit("gen-1", [SampleMeta(i) for i in range(3, 6)], timeout_s=0.05)
        with pytest.raises(StoreTimeout, match=r"task 'a'.*\['x'\].*'x': 2"):
            await core.take("a", ["x"], 1, "fifo", 1, None, 0.05)
        with pytest.raises(ValueError, match="can never be served"):
            await core.take("a", ["x"], 3, "fifo", 1, None, 0.05)

    asyncio.run(main())


def test_partial_take_serves_the_oldest_whole_groups_up_to_n():
    index = StoreIndex(TASKS, capacity=100)
    metas = grouped([3, 3, 3])
    put(index, metas[:7])  # groups 0 and 1 complete, group 2 has 1 of 3
    plan = index.take("reward", ["x"], 5, "group", partial=True)  # only one whole group fits in 5
    assert plan.shares == [[0, 1, 2]]
    plan = index.take("reward", ["x"], 9, "group", partial=True)
    assert plan.shares == [[3, 4, 5]]  # group 2 is not complete
    assert index.take("reward", ["x"], 9, "group", partial=True).shares is None
    assert index.counters["taken/reward"] == 6


def test_all_fields_serves_every_column_fields_only_decide_readiness():
    index = StoreIndex(TASKS, capacity=10)
    metas = grouped([2])
    put(index, metas, fields=("x",))
    index.commit([0, 1], ["y"], [(0, "d", 0), (0, "d", 1)])
    plan = index.take("train", ["y"], 2, "group", all_fields=True)
    assert plan.locations[0] == {"x": loc(0), "y": (0, "d", 0)}
    assert index.take("logprob", ["y"], 2, "group").locations[1] == {"y": (0, "d", 1)}
