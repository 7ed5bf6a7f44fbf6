"""StreamStore on the session's local Ray cluster: payloads by reference, concurrent producers
under backpressure, timeouts that name what they wait for, staleness, checkpoint round trip."""

from __future__ import annotations

import os
import sys
import time

import pytest
import ray
import torch

from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch
from tidal.dataflow.store import StoreTimeout, StreamStore

pytestmark = pytest.mark.ray

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def rows(ids: list[int], width: int = 3) -> Batch:
    return Batch.from_dict(
        {
            "tokens": torch.tensor([[i] * width for i in ids]),
            "attention_mask": torch.ones(len(ids), width, dtype=torch.long),
        },
        {"uid": [f"u{i}" for i in ids]},
    )


@pytest.fixture(scope="module")
def shared_store():
    # One store for the module: starting its three actors (each a process importing torch) costs
    # seconds, so the tests share it and each leaves it empty (checked below).
    s = StreamStore(("reward", "train"), capacity=8, num_units=2)
    yield s
    s.shutdown()


@pytest.fixture
def store(shared_store):
    yield shared_store
    stats = shared_store.stats()
    assert stats["size"] == 0 and all(u["chunks"] == 0 for u in stats["units"]), stats


def test_put_take_by_reference_with_fields_from_two_producers(store):
    store.put([0, 1, 2, 3], rows([0, 1, 2, 3]), groups=["a", "a", "b", "b"], group_size=2, versions=[5, 5, 6, 6])
    got = store.take("reward", ["tokens", "uid"], 4, sampler="group")
    assert isinstance(got.batch, DistributedBatch) and got.ids == [0, 1, 2, 3] and got.versions == [5, 5, 6, 6]
    local = got.fetch()
    assert local["tokens"][:, 0].tolist() == [0, 1, 2, 3] and list(local["uid"]) == ["u0", "u1", "u2", "u3"]
    # the reward task adds a column for existing ids, in another order
    store.put([3, 1, 2, 0], {"reward": torch.tensor([3.0, 1.0, 2.0, 0.0])})
    got = store.take("train", ["tokens", "reward"], 4, sampler="rank_balanced", num_ranks=2)
    assert len(got.batch.parts) == 2  # columns stored apart stay apart, joined on materialize
    for rank in range(2):
        share = got.for_rank(rank)
        assert share["tokens"][:, 0].tolist() == share["reward"].long().tolist()
        assert len({i // 2 for i in got.shares[rank]}) == 1  # one whole group per rank
    stats = store.stats()
    assert stats["size"] == 0 and stats["cleared"] == 4 and all(u["chunks"] == 0 for u in stats["units"])


def test_timeouts_name_what_they_wait_for(store):
    store.put(list(range(8)), rows(list(range(8))), producer="rollout-0")
    with pytest.raises(StoreTimeout, match=r"rollout-1.*capacity 8.*'reward': 8, 'train': 8"):
        store.put([8], rows([8]), producer="rollout-1", timeout_s=0.3)
    with pytest.raises(StoreTimeout, match=r"task 'train'.*\['tokens', 'reward'\].*'reward': 8"):
        store.take("train", ["tokens", "reward"], 2, timeout_s=0.3)
    store.take("reward", ["tokens"], 8)
    store.take("train", ["tokens"], 8)


def test_min_version_refuses_and_reports(store):
    store.put([0, 1, 2], rows([0, 1, 2]), versions=torch.tensor([[3, 3, 3], [1, 2, 3], [3, 4, 4]]))
    got = store.take("train", ["tokens"], 2, min_version=2)
    assert got.stale == [1] and got.ids == [0, 2] and got.versions == [3, 3]
    assert store.take("reward", ["tokens"], 3).ids == [0, 1, 2]  # staleness is per task


DRIVER_PID = os.getpid()


def _unpickle_poison(driver_pid: int) -> Poison:
    if os.getpid() == driver_pid:
        raise RuntimeError("a payload was unpickled in the driver")
    return Poison()


class Poison:
    """A payload value that cannot be unpickled in the driver process (elsewhere it stays a Poison)."""

    def __reduce__(self):
        return _unpickle_poison, (DRIVER_PID,)


@ray.remote(num_cpus=1)
def put_poison(store: StreamStore, ids: list[int]) -> None:
    batch = rows(ids)
    batch["poison"] = [Poison() for _ in ids]
    store.put(ids, batch, producer="remote")


@ray.remote(num_cpus=1)
def consume_rank(got, rank: int) -> tuple[list[int], list[str]]:
    share = got.for_rank(rank)
    return share["tokens"][:, 0].tolist(), [type(p).__name__ for p in share["poison"]]


def test_payloads_go_producer_to_unit_to_consumer_never_through_the_driver(store):
    ray.get(put_poison.remote(store, [10, 11, 12, 13]))
    got = store.take("train", ["tokens", "poison"], 4, num_ranks=2)  # the driver holds only refs
    shares = ray.get([consume_rank.remote(got, r) for r in range(2)])
    assert shares == [([10, 11], ["Poison"] * 2), ([12, 13], ["Poison"] * 2)]
    with pytest.raises(Exception, match="unpickled in the driver"):  # the poison is live
        got.fetch()
    assert store.take("reward", ["tokens"], 4).ids == [10, 11, 12, 13]


@ray.remote(num_cpus=1)
def produce(store: StreamStore, producer: int, count: int) -> float:
    waited = 0.0
    for k in range(0, count, 2):
        ids = [producer * 1000 + k, producer * 1000 + k + 1]
        start = time.monotonic()
        store.put(ids, rows(ids), producer=f"p{producer}", timeout_s=30)
        waited += time.monotonic() - start
    return waited


def test_concurrent_producers_never_exceed_capacity_and_each_sample_is_taken_once_per_task(store):
    producers = [produce.remote(store, p, 10) for p in range(3)]
    taken = {"reward": [], "train": []}
    deadline = time.monotonic() + 60
    while len(taken["train"]) < 30 and time.monotonic() < deadline:
        for task in taken:
            if len(taken[task]) < 30:
                got = store.take(task, ["tokens"], 3, timeout_s=30)
                local = got.fetch()
                assert local["tokens"][:, 0].tolist() == got.ids
                taken[task] += got.ids
    waited = ray.get(producers)
    expected = sorted(p * 1000 + k for p in range(3) for k in range(10))
    assert sorted(taken["reward"]) == expected and sorted(taken["train"]) == expected
    stats = store.stats()
    assert stats["peak_unfinished"] <= 8 and stats["size"] == 0
    assert max(waited) > 0  # 30 samples through a store of 8: someone was held back


def test_state_dict_round_trip_keeps_unconsumed_payloads(store):
    store.put([0, 1, 2, 3], rows([0, 1, 2, 3]), versions=7)
    store.take("reward", ["tokens"], 4)
    store.take("train", ["tokens"], 1)
    state = store.state_dict()
    assert store.take("train", ["tokens"], 3).ids == [1, 2, 3]  # drained: payloads freed
    store.load_state_dict(state)  # as a resumed job would
    got = store.take("train", ["tokens", "uid"], 3, timeout_s=5)
    assert got.ids == [1, 2, 3] and list(got.fetch()["uid"]) == ["u1", "u2", "u3"] and got.versions == [7] * 3
    with pytest.raises(StoreTimeout):
        store.take("reward", ["tokens"], 1, timeout_s=0.2)  # reward had consumed them all
