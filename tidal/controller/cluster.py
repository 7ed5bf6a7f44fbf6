"""Cluster: the Ray cluster of a job, one worker group per resource pool, and handles to the roles.

Every role the config enables is placed on the pool its section names (`actor.pool`, ...); the
roles of one pool share its worker processes (colocated). Stages and programs reach a role only
through its handle (`cluster.actor.update(batch)`), never through a worker.
"""

from __future__ import annotations

from typing import Any

from tidal.config.schema import JobConfig
from tidal.controller.ray_cluster import ensure_ray
from tidal.controller.resource_pool import ResourcePool
from tidal.controller.worker_group import WorkerGroup

TRAINED_ROLES = ("actor", "critic")  # roles whose state a checkpoint holds


def role_classes(cfg: JobConfig) -> dict[str, type]:
    """Enabled roles in build order (the rollout after the actor it copies weights from)."""
    from tidal.workers.roles.actor import ActorRole
    from tidal.workers.roles.critic import CriticRole
    from tidal.workers.roles.preference import PairReferenceRole
    from tidal.workers.roles.reference import ReferenceRole
    from tidal.workers.roles.rollout import RolloutRole

    roles: dict[str, type] = {"actor": ActorRole}
    preference = cfg.algorithm.preference is not None
    # Preference training generates nothing; the rollout only serves the greedy held-out accuracy
    # of a built-in task (its prompts have ground truths, pair files do not).
    if not preference or cfg.data.task is not None:
        roles["rollout"] = RolloutRole
    if cfg.reference_enabled:  # a preference job's reference also scores pairs (DPO)
        roles["reference"] = PairReferenceRole if preference else ReferenceRole
    if cfg.critic_enabled:
        roles["critic"] = CriticRole
    return roles


class Cluster:
    def __init__(self, cfg: JobConfig, groups: dict[str, WorkerGroup], role_pool: dict[str, str], ray: Any):
        self.cfg = cfg
        self.groups = groups  # pool name -> its worker group
        self.role_pool = role_pool  # role name -> the pool hosting it
        self._ray = ray  # the local Ray cluster this job started, if it started one

    @classmethod
    def start(cls, cfg: JobConfig, temp_dir: Any) -> Cluster:
        """Start (or join) Ray and one worker group per pool that hosts an enabled role."""
        from tidal.workers.rewards.custom import reward_runtime_env  # ships user reward code to workers

        by_pool: dict[str, dict[str, type]] = {}
        role_pool: dict[str, str] = {}
        for name, role_cls in role_classes(cfg).items():
            pool = getattr(cfg, name).pool
            by_pool.setdefault(pool, {})[name] = role_cls
            role_pool[name] = pool
        pools = {name: cfg.resources.pools[name] for name in by_pool}
        ray = ensure_ray(
            num_cpus=sum(p.num_workers * p.cpus_per_worker for p in pools.values()) + cfg.reward.num_parallel,
            temp_dir=temp_dir,
            runtime_env=reward_runtime_env(cfg),
        )
        groups = {
            name: WorkerGroup(ResourcePool(name, pools[name]), pool_roles, cfg)
            for name, pool_roles in by_pool.items()
        }
        return cls(cfg, groups, role_pool, ray)

    # ------------------------------------------------------------------ role handles
    def has(self, role: str) -> bool:
        return role in self.role_pool

    def role(self, name: str) -> Any:
        return self.group_of(name).role(name)

    def group_of(self, role: str) -> WorkerGroup:
        if role not in self.role_pool:
            raise AttributeError(f"role {role!r} is not enabled in this job")
        return self.groups[self.role_pool[role]]

    @property
    def actor(self) -> Any:
        return self.role("actor")

    @property
    def rollout(self) -> Any:
        return self.role("rollout")

    @property
    def reference(self) -> Any:
        return self.role("reference")

    @property
    def critic(self) -> Any:
        return self.role("critic")

    def trained_roles(self) -> list[str]:
        return [r for r in TRAINED_ROLES if r in self.role_pool]

    # ------------------------------------------------------------------ life cycle
    def restart_group(self, pool_name: str) -> WorkerGroup:
        """Kill every worker of pool `pool_name` and start the pool again from its config (all its
        ranks: they share one torch world). The new workers start from the model's initial weights.
        Refuses a pool hosting a trained role, whose state would be lost."""
        if pool_name not in self.groups:
            raise ValueError(f"no worker group runs on pool {pool_name!r}; the job has {sorted(self.groups)}")
        roles = {name: cls for name, cls in role_classes(self.cfg).items() if self.role_pool[name] == pool_name}
        trained = [name for name in roles if name in self.trained_roles()]
        if trained:
            raise ValueError(
                f"pool {pool_name!r} hosts the trained role(s) {trained}; restarting it would lose their "
                "state (restore them from a checkpoint instead)"
            )
        self.groups[pool_name].shutdown()
        pool = ResourcePool(pool_name, self.cfg.resources.pools[pool_name])
        self.groups[pool_name] = WorkerGroup(pool, roles, self.cfg)
        return self.groups[pool_name]

    def shutdown(self) -> None:
        for group in self.groups.values():
            group.shutdown()
        if self._ray is not None:
            self._ray.shutdown()
