"""Worker groups on a local Ray cluster: dispatch/collect modes, torch.distributed worlds,
colocation, DistributedBatch hand-off between groups, in-process weight sync.

The role classes below exist to exercise the dispatch machinery (what each rank receives and
returns); they are not stand-ins for the real actor/rollout roles.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
import ray
import torch
import torch.distributed as dist

from tidal.config.schema import JobConfig, PoolConfig
from tidal.controller.dispatch import run_task
from tidal.controller.resource_pool import ResourcePool
from tidal.controller.worker_group import WorkerGroup
from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch
from tidal.workers.endpoint import Collect, Dispatch, endpoint

pytestmark = pytest.mark.ray

# Ray workers cannot import this test module by name; ship its classes and functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

POOL_A = PoolConfig(num_workers=2, cpus_per_worker=0.5)
POOL_B = PoolConfig(num_workers=3, cpus_per_worker=0.5)


class DriverPoison:
    """A value that refuses to be unpickled in the test's driver process.

    Put in a column of a worker's result, it turns any fetch of that payload on the driver (by
    the group, the DistributedBatch, or anything else) into an error.
    """

    def __init__(self, driver_pid: int):
        self.driver_pid = driver_pid

    def __setstate__(self, state: dict) -> None:
        if os.getpid() == state["driver_pid"]:
            raise RuntimeError("payload was fetched on the driver")
        self.__dict__.update(state)


class EchoRole:
    def __init__(self, cfg: JobConfig, ctx) -> None:
        self.ctx = ctx
        self.rank_zero_calls = 0

    @endpoint(Dispatch.DP_SPLIT)
    def double(self, batch: Batch) -> Batch:
        return Batch.from_dict({"y": batch["x"] * 2, "rank": torch.full((len(batch),), self.ctx.rank)})

    @endpoint(Dispatch.DP_SPLIT)
    def poisoned(self, batch: Batch, driver_pid: int) -> Batch:
        return Batch.from_dict({"y": batch["x"] * 2}, {"poison": [DriverPoison(driver_pid)] * len(batch)})

    @endpoint(Dispatch.DP_SPLIT, collect=Collect.LIST)
    def describe(self, batch: Batch) -> tuple[int, list[float], list[str]]:
        return len(batch), batch["x"].tolist(), sorted(batch.keys())

    @endpoint(Dispatch.ALL, collect=Collect.LIST)
    def describe_all(self, batch: Batch) -> tuple[int, list[float]]:
        return len(batch), batch["x"].tolist()

    @endpoint(Dispatch.DP_SPLIT, collect=Collect.FIRST)
    def global_mean(self, batch: Batch) -> float:
        # Metrics from a DP_SPLIT call must agree on every rank: all-reduce sum and count.
        stats = torch.tensor([float(batch["x"].sum()), float(len(batch))], dtype=torch.float64)
        dist.all_reduce(stats)
        return float(stats[0] / stats[1])

    @endpoint(Dispatch.ALL)
    def whoami(self, tag: str) -> tuple[int, int, int, str]:
        return self.ctx.rank, dist.get_world_size(), os.getpid(), tag

    @endpoint(Dispatch.ALL, collect=Collect.FIRST)
    def all_reduce_sum(self, value: float) -> float:
        t = torch.tensor([value * (self.ctx.rank + 1)])
        dist.all_reduce(t)
        return float(t.item())

    @endpoint(Dispatch.RANK_ZERO)
    def count_rank_zero_call(self) -> int:
        self.rank_zero_calls += 1
        return self.ctx.rank

    @endpoint(Dispatch.ALL)
    def rank_zero_calls_seen(self) -> int:
        return self.rank_zero_calls

    @endpoint(Dispatch.RANK_ZERO, collect=Collect.CONCAT)
    def make_rows(self, n: int) -> Batch:
        return Batch.from_dict({"x": torch.arange(n, dtype=torch.float32)})

    @endpoint(Dispatch.ALL)
    def fail(self) -> None:
        raise ValueError(f"rank {self.ctx.rank} failed on purpose")

    def not_an_endpoint(self) -> None:
        pass


class ConsumerRole:
    """Reads columns made by another group, including the poison that must reach it intact."""

    def __init__(self, cfg: JobConfig, ctx) -> None:
        self.ctx = ctx

    @endpoint(Dispatch.DP_SPLIT)
    def consume(self, batch: Batch) -> Batch:
        assert all(isinstance(p, DriverPoison) for p in batch["poison"])
        return Batch.from_dict(
            {"z": batch["x"] + batch["y"], "rank_b": torch.full((len(batch),), self.ctx.rank)}
        )


_SHARED: dict[str, object] = {}  # module state: shared only by roles in the same process


class TrainerRole:
    def __init__(self, cfg: JobConfig, ctx) -> None:
        torch.manual_seed(1)
        self.model = torch.nn.Linear(4, 3)
        self.exported_ptrs: dict[str, int] = {}

    @endpoint(Dispatch.ALL)
    def remember(self, value: str) -> int:
        _SHARED["value"] = value
        return os.getpid()

    def export_weights(self):
        for name, tensor in self.model.state_dict().items():
            self.exported_ptrs[name] = tensor.data_ptr()
            yield name, tensor

    @endpoint(Dispatch.ALL, collect=Collect.FIRST)
    def weights(self) -> tuple[dict[str, list], dict[str, int]]:
        return {k: v.tolist() for k, v in self.model.state_dict().items()}, self.exported_ptrs


class RolloutRole:
    def __init__(self, cfg: JobConfig, ctx) -> None:
        torch.manual_seed(2)
        self.model = torch.nn.Linear(4, 3)
        self.version = -1
        self.received_ptrs: dict[str, int] = {}

    @endpoint(Dispatch.ALL)
    def recall(self) -> tuple[int, object]:
        return os.getpid(), _SHARED.get("value")

    def load_weights(self, weights, version: int) -> None:
        params = self.model.state_dict()
        for name, tensor in weights:
            self.received_ptrs[name] = tensor.data_ptr()
            params[name].copy_(tensor)
        self.version = version

    @endpoint(Dispatch.ALL, collect=Collect.FIRST)
    def weights(self) -> tuple[dict[str, list], dict[str, int], int]:
        return {k: v.tolist() for k, v in self.model.state_dict().items()}, self.received_ptrs, self.version


def add_one(batch: Batch, offset: float) -> Batch:
    return Batch.from_dict({"w": batch["y"] + offset})


def add_one_with_metrics(batch: Batch, offset: float) -> tuple[Batch, dict[str, float]]:
    return add_one(batch, offset), {"rows": float(len(batch))}


def rows(n: int) -> Batch:
    return Batch.from_dict({"x": torch.arange(n, dtype=torch.float32)}, {"uid": [f"u{i}" for i in range(n)]})


@pytest.fixture(scope="module")
def cfg() -> JobConfig:
    return JobConfig(
        model={"path": "unused"},
        data={"task": {"type": "arithmetic"}},
        resources={"pools": {"default": PoolConfig(), "a": POOL_A, "b": POOL_B}, "device": "cpu"},
    )


@pytest.fixture(scope="module")
def group_a(cfg):
    group = WorkerGroup(
        ResourcePool("a", POOL_A), {"echo": EchoRole, "trainer": TrainerRole, "rollout": RolloutRole}, cfg
    )
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def group_b(cfg):
    group = WorkerGroup(ResourcePool("b", POOL_B), {"echo": EchoRole, "consumer": ConsumerRole}, cfg)
    yield group
    group.shutdown()


# --------------------------------------------------------------------------- dispatch / collect


@pytest.mark.parametrize(
    ("num_rows", "which", "expected_shards"),
    [
        (7, "a", [4, 3]),
        (7, "b", [3, 2, 2]),
        (1, "a", [1, 0]),
        (2, "b", [1, 1, 0]),
    ],
)
def test_dp_split_concat_uneven(group_a, group_b, num_rows, which, expected_shards):
    group = group_a if which == "a" else group_b
    out = group.echo.double(rows(num_rows))
    assert isinstance(out, DistributedBatch)
    assert len(out) == num_rows and [s.num_rows for s in out.parts[0]] == expected_shards
    got = out.fetch()
    assert torch.equal(got["y"], torch.arange(num_rows, dtype=torch.float32) * 2)
    owners = np.repeat(np.arange(len(expected_shards)), expected_shards)
    assert got["rank"].tolist() == owners.tolist()


def test_each_rank_gets_its_contiguous_share_even_when_empty(group_a):
    shares = group_a.echo.describe(rows(1))
    assert shares[0] == (1, [0.0], ["uid", "x"])
    assert shares[1] == (0, [], ["uid", "x"])  # empty share keeps its columns


def test_dp_split_of_a_distributed_batch_slices_on_the_workers(group_a, group_b):
    made_by_b = group_b.echo.double(rows(7))  # shards [3, 2, 2]
    shares = group_a.echo.describe(made_by_b.union(DistributedBatch.from_batch(rows(7), 3)))
    assert [s[0] for s in shares] == [4, 3]
    assert shares[0][1] == [0.0, 1.0, 2.0, 3.0] and shares[1][1] == [4.0, 5.0, 6.0]
    assert shares[0][2] == ["rank", "uid", "x", "y"]


def test_all_gives_every_rank_the_whole_batch(group_a, group_b):
    local = rows(5)
    assert group_a.echo.describe_all(local) == [(5, local["x"].tolist())] * 2
    remote = group_a.echo.double(local)
    assert [n for n, _ in group_b.echo.describe_all(remote.union(local))] == [5, 5, 5]


def test_dp_split_first_returns_the_all_reduced_metric(group_b):
    assert group_b.echo.global_mean(rows(7)) == pytest.approx(3.0)
    assert group_b.echo.global_mean(DistributedBatch.from_batch(rows(5), 2)) == pytest.approx(2.0)


def test_ranks_form_their_own_gloo_world_per_group(group_a, group_b):
    a = group_a.echo.whoami("a")
    b = group_b.echo.whoami("b")
    assert [(r, w, t) for r, w, _, t in a] == [(0, 2, "a"), (1, 2, "a")]
    assert [(r, w, t) for r, w, _, t in b] == [(0, 3, "b"), (1, 3, "b"), (2, 3, "b")]
    assert len({pid for *_, pid, _ in a + b}) == 5  # one process per rank, no sharing across groups
    assert group_a.echo.all_reduce_sum(1.5) == pytest.approx(1.5 * (1 + 2))
    assert group_b.echo.all_reduce_sum(2.0) == pytest.approx(2.0 * (1 + 2 + 3))


def test_rank_zero_runs_only_on_rank_zero(group_b):
    before = group_b.echo.rank_zero_calls_seen()
    assert group_b.echo.count_rank_zero_call() == 0
    after = group_b.echo.rank_zero_calls_seen()
    assert [x - y for x, y in zip(after, before)] == [1, 0, 0]
    made = group_b.echo.make_rows(4)
    assert [s.num_rows for s in made.parts[0]] == [4]
    assert made.fetch()["x"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_endpoint_errors(group_a):
    with pytest.raises(AttributeError, match="not an endpoint"):
        group_a.echo.not_an_endpoint  # noqa: B018
    with pytest.raises(ValueError, match="no role"):
        group_a.role("critic")
    with pytest.raises(ValueError, match="failed on purpose"):
        group_a.echo.fail()
    assert group_a.ping() == [0, 1]  # the group survives a role's exception


# --------------------------------------------------------------------------- data between groups


def test_batch_flows_from_group_a_to_group_b_without_the_driver(group_a, group_b):
    driver = os.getpid()
    made_by_a = group_a.echo.poisoned(rows(7), driver)  # shards [4, 3]
    with pytest.raises(Exception, match="fetched on the driver"):
        made_by_a.fetch()  # the check is live: a fetch on the driver fails
    out = group_b.consumer.consume(made_by_a.union(rows(7)))  # shards [3, 2, 2]
    got = out.fetch()
    x = torch.arange(7, dtype=torch.float32)
    assert torch.equal(got["z"], x + 2 * x)
    assert got["rank_b"].tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_union_of_parts(group_a, group_b):
    a = group_a.echo.double(rows(7))
    b = group_b.echo.make_rows(7)
    both = a.union(b.select("x")).union(rows(7).select("uid"))
    assert len(both.parts) == 3 and len(both) == 7
    got = both.fetch()
    assert sorted(got.keys()) == ["rank", "uid", "x", "y"]
    assert torch.equal(got["y"], got["x"] * 2)
    assert both.select("y").fetch().keys() == ["y"]
    with pytest.raises(KeyError, match="nope"):
        both.select("y", "nope").fetch()
    with pytest.raises(ValueError, match="7 and 5"):
        a.union(group_a.echo.double(rows(5)))


def test_run_task_computes_on_the_whole_batch_off_the_driver(group_a):
    made_by_a = group_a.echo.poisoned(rows(6), os.getpid())
    out = run_task(add_one, made_by_a, 1.0)
    assert isinstance(out, DistributedBatch) and len(out) == 6
    assert out.fetch()["w"].tolist() == [2 * i + 1.0 for i in range(6)]
    out, metrics = run_task(add_one_with_metrics, made_by_a, 0.5)
    assert metrics == {"rows": 6.0} and len(out) == 6


# --------------------------------------------------------------------------- colocation


def test_colocated_roles_share_one_process(group_a):
    pids = group_a.trainer.remember("hello")
    seen = group_a.rollout.recall()
    assert [pid for pid, _ in seen] == pids
    assert [value for _, value in seen] == ["hello", "hello"]


def test_sync_weights_hands_tensors_over_in_process(group_a):
    trainer, _ = group_a.trainer.weights()
    before, _, _ = group_a.rollout.weights()
    assert before != trainer
    stats = group_a.hand_over_weights("trainer", "rollout", version=3)
    assert stats["weight_sync/num_tensors"] == 2 and stats["weight_sync/bytes"] == (4 * 3 + 3) * 4
    trainer, exported = group_a.trainer.weights()
    after, received, version = group_a.rollout.weights()
    assert after == trainer and version == 3
    assert received == exported  # the very same memory: nothing was serialized or copied in transit


# --------------------------------------------------------------------------- pools


def test_pool_larger_than_the_cluster_is_a_config_error():
    with pytest.raises(ValueError, match=r"resources\.pools\.huge.*num_workers=64"):
        ResourcePool("huge", PoolConfig(num_workers=64, cpus_per_worker=1.0))


def free_cpus_becomes(expected: float, timeout_s: float = 20.0) -> bool:
    """The cluster's free-resource view is refreshed asynchronously: poll it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if abs(ray.available_resources().get("CPU", 0.0) - expected) < 1e-6:
            return True
        time.sleep(0.1)
    return False


def test_shutdown_kills_the_workers_and_frees_the_pool(cfg):
    free_before = ray.available_resources()["CPU"]
    pool = ResourcePool("solo", PoolConfig(num_workers=1, cpus_per_worker=1.0))
    group = WorkerGroup(pool, {"echo": EchoRole}, cfg)
    assert group.ping() == [0]
    assert free_cpus_becomes(free_before - 1.0)
    worker = group.workers[0]
    group.shutdown()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(worker.ping.remote(), timeout=30)
    assert pool.placement_group is None
    assert free_cpus_becomes(free_before)
