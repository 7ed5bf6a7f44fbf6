"""The stages of one RL step, each a small function over a DistributedBatch.

A stage reads some columns and returns new ones; it never pulls payload tensors to the driver.
The sync programs call them in order; a streaming executor can run the same functions over a data
store because each stage names what it reads and what it adds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch

if TYPE_CHECKING:
    from tidal.controller.job import Job


def generate(job: Job, prompts: Batch, step: int) -> DistributedBatch:
    """prompts x n -> responses, response masks, behaviour log-probs, policy version."""
    return job.rollout.generate(
        prompts, seed=job.cfg.trainer.seed * 100_003 + step, policy_version=job.version
    )


def score(job: Job, batch: DistributedBatch) -> tuple[DistributedBatch, dict[str, float]]:
    """Rule rewards in parallel Ray tasks; a failing sample is counted, scored 0, and the run goes on."""
    from tidal.workers.rewards.scorer import score_in_parallel

    rewards, metrics = score_in_parallel(batch, job.cfg.reward)
    return batch.union(rewards), metrics


def reference_log_probs(job: Job, batch: DistributedBatch) -> DistributedBatch:
    return batch.union(job.reference.compute_ref_log_probs(batch))


def old_log_probs(job: Job, batch: DistributedBatch) -> DistributedBatch:
    return batch.union(job.actor.compute_log_probs(batch))


def values(job: Job, batch: DistributedBatch) -> DistributedBatch:
    return batch.union(job.critic.compute_values(batch))


def advantages(job: Job, batch: DistributedBatch) -> tuple[DistributedBatch, dict[str, float]]:
    """KL-in-reward (optional) then the configured estimator, in one Ray task over the whole step."""
    from tidal.controller.programs.advantage_task import compute_advantages

    adv, metrics = job.run_task(compute_advantages, batch, job.cfg.algorithm, job.kl_ctrl_state())
    if "kl/in_reward" in metrics:
        job.update_kl_ctrl(metrics["kl/in_reward"], len(batch))
    return batch.union(adv), metrics


def update_critic(job: Job, batch: DistributedBatch) -> dict[str, float]:
    return job.critic.update(batch)  # keys already prefixed `critic/`


def update_actor(job: Job, batch: DistributedBatch) -> dict[str, float]:
    return job.actor.update(batch)  # keys already prefixed `actor/`


def sync_weights(job: Job, version: int) -> dict[str, float]:
    """Actor -> rollout, in-process on the colocated workers; the rollout serves `version` next."""
    start = time.perf_counter()
    job.sync_weights(version)
    return {"perf/sync_weights_s": time.perf_counter() - start}


def evaluate(job: Job) -> dict[str, float]:
    """Held-out reward with the validation sampling settings (greedy by default)."""
    if job.val_prompts is None:
        return {}
    start = time.perf_counter()
    batch = job.rollout.generate(
        job.val_prompts, sampling=job.cfg.rollout.val_sampling, seed=0, policy_version=job.version
    )
    _, metrics = score(job, batch)
    return {
        "val/reward": metrics["reward/mean"],
        "val/reward_errors": metrics["reward/num_errors"],
        "perf/eval_s": time.perf_counter() - start,
    }
