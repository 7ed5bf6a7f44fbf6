"""WeightBridge: the actor's weights from its own pool (2 FSDP ranks) into a rollout pool of 1 and of
2 ranks, each pool its own torch.distributed world, as the streaming trainer runs them.

After a sync every rollout rank's engine holds the actor's full weights bit for bit (its fast
forward re-read them), stamped with the version; after the actor's shards change, the next sync
carries the new values; the reference path (gather full tensors, ship them through the object
store) leaves exactly the same engine weights; and the wire carries exactly the plan's lower
bound: one full replica per rollout rank.

The role subclasses add endpoints that read and change weights for the test; the sync itself
runs the real roles' code (`export_weights`, the engine's in-place write).
"""

from __future__ import annotations

import sys
import time

import pytest
import ray
import torch
from tiny_job import tiny_model

from tidal.config import load_config
from tidal.config.schema import JobConfig
from tidal.controller.resource_pool import ResourcePool
from tidal.controller.weight_bridge import WeightBridge
from tidal.controller.worker_group import WorkerGroup
from tidal.tasks.prepare import prepare_model
from tidal.workers.endpoint import Collect, Dispatch, endpoint
from tidal.workers.roles.actor import ActorRole
from tidal.workers.roles.rollout import RolloutRole

pytestmark = pytest.mark.ray

# Ray workers cannot import this test module by name; ship its classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ActorUnderTest(ActorRole):
    @endpoint(Dispatch.ALL, collect=Collect.FIRST)
    def full_weights(self) -> dict[str, torch.Tensor]:
        """Every full tensor, gathered (a collective of the pool)."""
        return {name: t.clone() for name, t in self.export_weights()}

    @endpoint(Dispatch.ALL, collect=Collect.FIRST)
    def perturb(self, seed: int) -> None:
        """Change every local shard in place, as an optimizer step does (differently on each rank)."""
        gen = torch.Generator().manual_seed(seed * 100 + self.ctx.rank)
        with torch.no_grad():
            for param in self.engine.module.parameters():
                local = param.to_local()
                local.add_(torch.randn(local.shape, generator=gen, dtype=local.dtype) * 0.1)


class RolloutUnderTest(RolloutRole):
    @endpoint(Dispatch.ALL, collect=Collect.LIST)
    def engine_weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        return self.weights_version, {n: t.clone() for n, t in self.engine.model.state_dict().items()}

    @endpoint(Dispatch.ALL, collect=Collect.LIST)
    def num_param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.engine.model.parameters())

    @endpoint(Dispatch.ALL, collect=Collect.LIST)
    def greedy(self, prompt_ids: list[int]) -> list[int]:
        """Greedy continuation: proves the engine's fused copies were re-read after a write."""
        from tidal.config.schema import SamplingConfig

        ids = torch.tensor([prompt_ids])
        out = self.engine.generate(
            ids, torch.ones_like(ids), SamplingConfig(temperature=0.0, max_new_tokens=4), []
        )
        return out.response_ids[0].tolist()

    @endpoint(Dispatch.RANK_ZERO)
    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    @endpoint(Dispatch.ALL, collect=Collect.LIST)
    def scramble(self) -> None:
        with torch.no_grad():
            for param in self.engine.model.parameters():
                param.fill_(0.5)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> JobConfig:
    root = tmp_path_factory.mktemp("bridge")
    cfg = load_config(
        None,
        [
            *tiny_model(root / "model"),
            "model.dtype=float32",
            "data.task.type=arithmetic",
            "trainer.mode=streaming",
            "resources.device=cpu",
            "resources.pools.default.num_workers=2",  # the actor's (and any critic's) pool
            "resources.pools.default.cpus_per_worker=0.5",
            "resources.pools.rollout.num_workers=2",
            "resources.pools.rollout.cpus_per_worker=0.5",
            "rollout.pool=rollout",
            f"trainer.output_dir={root / 'run'}",
        ],
    )
    prepare_model(cfg.model, cfg.data)
    return cfg


@pytest.fixture(scope="module")
def actor(cfg: JobConfig):
    group = WorkerGroup(
        ResourcePool("default", cfg.resources.pools["default"]), {"actor": ActorUnderTest}, cfg
    )
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def rollouts(cfg: JobConfig):
    """Rollout pools of 1 and of 2 ranks, made when first asked for (each costs seconds)."""
    groups: dict[int, WorkerGroup] = {}

    def get(num_workers: int) -> WorkerGroup:
        if num_workers not in groups:
            pool_cfg = cfg.resources.pools["rollout"].model_copy(update={"num_workers": num_workers})
            pool = ResourcePool("rollout", pool_cfg)
            groups[num_workers] = WorkerGroup(pool, {"rollout": RolloutUnderTest}, cfg)
        return groups[num_workers]

    yield get
    for group in groups.values():
        group.shutdown()


def _assert_rollout_holds(rollout: WorkerGroup, full: dict[str, torch.Tensor], version: int) -> None:
    for rank, (got_version, state) in enumerate(rollout.rollout.engine_weights()):
        assert got_version == version, rank
        assert set(full) <= set(state), sorted(set(full) ^ set(state))
        for name, want in full.items():
            assert torch.equal(state[name], want), (rank, name, version)


@pytest.mark.parametrize("num_rollout", [1, 2])
def test_bridge_moves_the_actor_weights_into_a_separate_rollout_pool(cfg, actor, rollouts, num_rollout):
    rollout = rollouts(num_rollout)
    bridge = WeightBridge(actor, "actor", rollout, "rollout", cfg, timeout_s=60)
    reference = WeightBridge(actor, "actor", rollout, "rollout", cfg, method="gather", timeout_s=60)
    try:
        replica = rollout.rollout.num_param_bytes()[0]  # tied embeddings once
        for version in (1, 2):
            actor.actor.perturb(seed=version + 10 * num_rollout)
            metrics = bridge.sync(version, timeout_s=60)
            full = actor.actor.full_weights()
            _assert_rollout_holds(rollout, full, version)
            # Nothing is local between pools: each rollout rank receives its whole replica once.
            assert metrics["weight_sync/bytes"] == num_rollout * replica, metrics
            assert metrics["weight_sync/plan_bytes"] == metrics["weight_sync/lower_bound_bytes"]
            assert metrics["weight_sync/plan_bytes"] == metrics["weight_sync/bytes"]
            assert metrics["weight_sync/local_copy_bytes"] == 0
            assert metrics["weight_sync/version"] == version
            assert 0 < metrics["weight_sync/reshard_s"] <= metrics["weight_sync/seconds"]

        # The reference path leaves exactly the same engine weights (the rollout is scrambled in
        # between, so each sync has to write all of them) and generates the same tokens.
        actor.actor.perturb(seed=3)
        reference.sync(3, timeout_s=60)
        via_gather = rollout.rollout.engine_weights()
        tokens = rollout.rollout.greedy([3, 4, 5])
        rollout.rollout.scramble()
        bridge.sync(3, timeout_s=60)
        via_reshard = rollout.rollout.engine_weights()
        for (v1, a), (v2, b) in zip(via_gather, via_reshard, strict=True):
            assert v1 == v2 == 3
            assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        assert rollout.rollout.greedy([3, 4, 5]) == tokens
        _assert_rollout_holds(rollout, actor.actor.full_weights(), 3)
    finally:
        bridge.close()
        reference.close()


def test_bridge_refuses_a_group_with_itself_and_unknown_roles(cfg, actor):
    with pytest.raises(ValueError, match="sync in process"):
        WeightBridge(actor, "actor", actor, "actor", cfg)
    with pytest.raises(ValueError, match="method="):
        WeightBridge(actor, "actor", actor, "actor", cfg, method="nccl")


def test_a_rank_that_does_not_sync_in_time_is_named_and_the_bridge_refuses_more(cfg, actor, rollouts):
    rollout = rollouts(2)
    bridge = WeightBridge(actor, "actor", rollout, "rollout", cfg, timeout_s=60)
    try:
        busy = rollout.rollout.sleep.submit(3.0)  # rollout rank 0 is busy: its receive waits behind
        never_began = r"version 1 within 1 s; rollout rank 0 \(rollout\) never began it"
        with pytest.raises(TimeoutError, match=never_began):
            bridge.sync(1, timeout_s=1.0)
        with pytest.raises(RuntimeError, match="unusable"):
            bridge.sync(2, timeout_s=1.0)
        busy.result()
    finally:
        bridge.close()  # waits for the late sync to end on every rank, then leaves
