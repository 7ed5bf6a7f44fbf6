"""WeightSync: the step of the loop that moves the actor's new weights to the rollout.

One object per job, chosen when the job starts (`for_job`), called once per step by the runner
(`loop.push_weights`, which also times it): `push(version)` returns the `weight_sync/` metrics.

- InProcessWeightSync: actor and rollout share a pool; every worker hands its actor shards to its
  own rollout engine through the resharder (`WorkerGroup.hand_over_weights`).
- BridgeWeightSync: sync mode with the rollout on its own pool; weights cross pools through the
  WeightBridge (the resharder over gloo on CPU, NCCL on GPU), the same path streaming uses.
- the streaming runner's StreamingSource: actor and rollout on two pools; weights go through the
  WeightBridge (tidal/controller/weight_bridge.py) and the rollout resumes at once.
- NoWeightSync: nothing generates (preference training without a generating evaluation).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tidal.config.schema import JobConfig
    from tidal.controller.cluster import Cluster


class WeightSync(Protocol):
    def push(self, version: int) -> dict[str, float]:
        """Make the rollout serve the actor's current weights, stamped `version`; metrics."""
        ...


class InProcessWeightSync:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def push(self, version: int) -> dict[str, float]:
        return self.cluster.group_of("actor").hand_over_weights("actor", "rollout", version)


class BridgeWeightSync:
    def __init__(self, cluster: Cluster, cfg: JobConfig):
        from tidal.controller.weight_bridge import actor_to_rollout

        self.bridge = actor_to_rollout(cluster, cfg)

    def push(self, version: int) -> dict[str, float]:
        return self.bridge.sync(version)

    def close(self) -> None:
        self.bridge.close()


class NoWeightSync:
    def push(self, version: int) -> dict[str, float]:
        return {}


def for_job(cluster: Cluster, cfg: JobConfig) -> WeightSync:
    """The sync mode's weight sync (the streaming runner installs its own)."""
    if not cluster.has("rollout"):
        return NoWeightSync()
    if cluster.group_of("actor") is cluster.group_of("rollout"):
        return InProcessWeightSync(cluster)
    if cfg.trainer.mode == "streaming":
        return NoWeightSync()  # replaced by the streaming runner's StreamingSource before any push
    return BridgeWeightSync(cluster, cfg)
