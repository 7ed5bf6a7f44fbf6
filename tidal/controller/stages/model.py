"""The stages that run a model over the samples: log-probs of the reference and of the actor,
the critic's values, and the two updates. Each ships its role only the columns it reads."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tidal.controller.stages.base import SEQUENCE_COLUMNS, Stage
from tidal.dataflow.distributed_batch import DistributedBatch

if TYPE_CHECKING:
    from tidal.controller.cluster import Cluster


class RoleStage(Stage):
    """A stage that calls a role of the job's cluster (looked up at each call: a pool may restart)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster


class ReferenceLogProbs(RoleStage):
    name = "reference_log_probs"
    reads = SEQUENCE_COLUMNS
    writes = ("ref_log_probs",)

    def __call__(self, batch: DistributedBatch) -> DistributedBatch:
        return batch.union(self.cluster.reference.compute_ref_log_probs(self.inputs(batch)))


class OldLogProbs(RoleStage):
    """The trainer's log-probs of the samples before the update (the proximal policy of
    decoupled PPO in streaming mode), with the entropy token selectors read."""

    name = "old_log_probs"
    reads = SEQUENCE_COLUMNS
    writes = ("old_log_probs", "entropy")
    optional_writes = ("sum_pi_squared",)  # for the optimal token baselines

    def __call__(self, batch: DistributedBatch) -> DistributedBatch:
        return batch.union(self.cluster.actor.compute_log_probs(self.inputs(batch)))


class Values(RoleStage):
    name = "values"
    reads = SEQUENCE_COLUMNS
    writes = ("values",)

    def __call__(self, batch: DistributedBatch) -> DistributedBatch:
        return batch.union(self.cluster.critic.compute_values(self.inputs(batch)))


class UpdateCritic(RoleStage):
    name = "update_critic"
    reads = (*SEQUENCE_COLUMNS, "values", "returns")

    def __call__(self, batch: DistributedBatch) -> dict[str, float]:
        return self.cluster.critic.update(self.inputs(batch))  # keys already prefixed `critic/`


class UpdateActor(RoleStage):
    """One policy update; without `old_log_probs` the update is on-policy (ratio 1)."""

    name = "update_actor"
    reads = (*SEQUENCE_COLUMNS, "advantages")
    # the ratio's old policy; token selection / off-policy masks and weights; the KL loss (and
    # its correct-answer threshold); the rollout's log-probs for actor/rollout_kl
    optional_reads = ("old_log_probs", "pg_mask", "is_weights", "ref_log_probs", "seq_reward", "rollout_log_probs")

    def __call__(self, batch: DistributedBatch, step: int) -> dict[str, float]:
        return self.cluster.actor.update(self.inputs(batch), step=step)  # keys already prefixed `actor/`
