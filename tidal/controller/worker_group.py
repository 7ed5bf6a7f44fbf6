"""WorkerGroup: the processes of one resource pool, one torch.distributed world, called as roles.

    group = WorkerGroup(pool, {"actor": ActorRole, "rollout": RolloutRole}, cfg)
    batch = group.rollout.generate(prompts)            # DP_SPLIT -> DistributedBatch (refs only)
    log_probs = group.actor.compute_log_probs(batch)   # each rank fetches its own rows
    metrics = group.actor.update(batch.union(log_probs))
    group.hand_over_weights("actor", "rollout", version=1)  # colocated, through the resharder

Roles on two pools (two groups, two worlds) exchange weights through a WeightBridge
(tidal/controller/weight_bridge.py), which drives the workers' bridge methods.

Every role of the pool is built in every worker process (colocation: they share the device and
can hand tensors to each other). How a call is split and collected is declared on the role's
method (`@endpoint`), so the call site reads as the algorithm.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tidal.config.schema import JobConfig
from tidal.controller.dispatch import PendingCall, RankInfo, dispatch_args, running_ranks, wait_all
from tidal.controller.resource_pool import ResourcePool
from tidal.workers.endpoint import Collect, endpoint_spec
from tidal.workers.worker import Worker


def resolve_device(requested: str, pool: ResourcePool) -> str:
    """'cpu' or 'cuda' for a pool, from resources.device ('auto': cuda when the pool has GPUs)."""
    gpus = pool.gpus_per_worker
    if requested == "auto":
        requested = "cuda" if gpus > 0 else "cpu"
    if requested == "cuda" and gpus == 0:
        raise ValueError(
            f"resources.device=cuda but resources.pools.{pool.name}.gpus_per_worker=0; "
            "give the pool GPUs or set resources.device=cpu"
        )
    if requested == "cuda" and pool.num_workers > 1 and gpus != int(gpus):
        raise ValueError(
            f"resources.pools.{pool.name}.gpus_per_worker={gpus:g} would put several ranks of one "
            "NCCL group on one GPU, which NCCL refuses; use a whole number of GPUs per worker"
        )
    return requested


class Endpoint:
    """`group.actor.update` — call it to run and collect, or `submit` to get a PendingCall."""

    def __init__(self, group: WorkerGroup, role: str, method: str):
        self._group, self._role, self._method = group, role, method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.submit(*args, **kwargs).result()

    def submit(self, *args: Any, **kwargs: Any) -> PendingCall:
        return self._group.call_async(self._role, self._method, *args, **kwargs)


class RoleHandle:
    """The endpoints of one role of a group, as attributes."""

    def __init__(self, group: WorkerGroup, name: str, role_cls: type):
        self._group, self._name, self._cls = group, name, role_cls

    def __getattr__(self, method: str) -> Endpoint:
        if method.startswith("_"):
            raise AttributeError(method)
        endpoint_spec(self._cls, method)  # raises, listing the endpoints, if it is not one
        return Endpoint(self._group, self._name, method)

    def __repr__(self) -> str:
        return f"RoleHandle({self._name}: {self._cls.__name__})"


class WorkerGroup:
    def __init__(
        self,
        pool: ResourcePool,
        roles: dict[str, type],
        cfg: JobConfig,
        *,
        device: str | None = None,
        placement_timeout_s: float = 120.0,
    ):
        if not roles:
            raise ValueError(
                f"worker group for pool {pool.name!r} has no roles; pass at least one role class"
            )
        for name in roles:
            if not name.isidentifier() or name in _RESERVED:
                raise ValueError(f"role name {name!r} is not usable as group.{name}; pick another name")
        self.pool = pool
        self._role_classes = dict(roles)
        self.device = resolve_device(device or cfg.resources.device, pool)
        pool.ready(placement_timeout_s)

        pg = pool.placement_group
        self.workers = [
            _RemoteWorker.options(
                num_cpus=pool.cpus_per_worker,
                num_gpus=pool.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
            ).remote(rank=i, world_size=pool.num_workers, device=self.device, num_cpus=pool.cpus_per_worker)
            for i in range(pool.num_workers)
        ]
        try:
            master_addr, master_port = ray.get(self.workers[0].create_store.remote())
            # Serialized once; Ray resolves top-level references before `setup` runs.
            roles_ref, cfg_ref = ray.put(self._role_classes), ray.put(cfg)
            infos = wait_all(
                [w.setup.remote(master_addr, master_port, roles_ref, cfg_ref) for w in self.workers]
            )
        except BaseException:
            self.shutdown()
            raise
        self.ranks = [RankInfo(**info) for info in infos]

    # ------------------------------------------------------------------ roles
    @property
    def world_size(self) -> int:
        return len(self.workers)

    @property
    def role_names(self) -> list[str]:
        return list(self._role_classes)

    def role(self, name: str) -> RoleHandle:
        if name not in self._role_classes:
            raise ValueError(
                f"worker group of pool {self.pool.name!r} has no role {name!r}; it has {self.role_names}"
            )
        return RoleHandle(self, name, self._role_classes[name])

    def __getattr__(self, name: str) -> RoleHandle:
        roles = self.__dict__.get("_role_classes", {})  # absent while __init__ runs
        if name in roles:
            return RoleHandle(self, name, roles[name])
        raise AttributeError(f"{type(self).__name__} has no attribute or role {name!r}")

    # ------------------------------------------------------------------ calls
    def call(self, role: str, method: str, /, *args: Any, **kwargs: Any) -> Any:
        return self.call_async(role, method, *args, **kwargs).result()

    def call_async(self, role: str, method: str, /, *args: Any, **kwargs: Any) -> PendingCall:
        role_cls = self.role(role)._cls
        spec = endpoint_spec(role_cls, method)
        ranks = running_ranks(spec, self.ranks)
        per_rank = dispatch_args(spec, args, kwargs, self.ranks)
        num_returns = 2 if spec.collect is Collect.CONCAT else 1
        refs = [
            self.workers[r.rank]
            .execute.options(num_returns=num_returns)
            .remote(role, method, *per_rank[r.rank])
            for r in ranks
        ]
        return PendingCall(spec, ranks, refs, label=f"{role_cls.__name__}.{method}")

    def hand_over_weights(self, src_role: str, dst_role: str, version: int) -> dict[str, float]:
        """Move src's weights into dst on every rank at once, in process (both roles live in each
        worker): resharded when src exports its shards (tidal/resharding/colocated.py). Returns
        rank 0's metrics."""
        for name in (src_role, dst_role):
            self.role(name)
        return wait_all([w.hand_over_weights.remote(src_role, dst_role, version) for w in self.workers])[0]

    def ping(self) -> list[int]:
        return wait_all([w.ping.remote() for w in self.workers])

    def shutdown(self) -> None:
        """Kill the workers and release the pool's placement group. Safe to call twice."""
        for worker in self.__dict__.get("workers", []):
            ray.kill(worker)
        self.workers = []
        self.pool.remove()


# Actors run one call at a time (Ray's default), so every rank sees the calls in the same order, as
# SPMD code with collectives needs.
_RemoteWorker = ray.remote(Worker)

# Names a role may not take, because `group.<name>` already means something else.
_RESERVED = frozenset(dir(WorkerGroup)) | {"pool", "workers", "device", "ranks"}
