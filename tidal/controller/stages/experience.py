"""Making experience: everything a policy update needs, from a batch of prompts.

generate -> score, dropping the samples whose reward failed (-> dynamic sampling refill)
-> (greedy baselines) -> (reference log-probs) -> (old log-probs) -> (values) -> advantages.
Which optional stages run follows from the config (a critic only for estimators that need values,
a reference only when a KL term is on, greedy baselines for ReMax / PAR, the trainer's log-probs
when a token selector or an off-policy correction reads them), so GRPO and PPO share this and
differ in their updates.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tidal.algorithms import DynamicSamplingQuota
from tidal.controller.programs import stages
from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch

if TYPE_CHECKING:
    from tidal.controller.job import Job


def make_experience(job: Job, step: int) -> tuple[DistributedBatch, dict[str, float]]:
    cfg = job.cfg
    start = time.perf_counter()
    batch, prompts, metrics = sample(job, step)

    if cfg.algorithm.needs_reward_baselines:
        batch, baseline_metrics = stages.reward_baselines(job, prompts, batch)
        metrics |= baseline_metrics
        metrics["reward/num_dropped"] += baseline_metrics["baseline_reward/num_dropped"]
    if len(batch) == 0:
        from tidal.workers.rewards.scorer import RewardFailureError

        raise RewardFailureError(
            f"every sample of step {step} was dropped because of failed rewards "
            f"(reward.on_error={cfg.reward.on_error}, {metrics['reward/num_errors']:g} failed); "
            "fix the reward function, or set reward.on_error=score to train on them with reward.error_score"
        )
    if cfg.reference_enabled:
        batch = stages.reference_log_probs(job, batch)
    if job.needs_old_log_probs or cfg.algorithm.needs_trainer_log_probs:
        batch = stages.old_log_probs(job, batch)
    if cfg.critic_enabled:
        batch = stages.values(job, batch)
    num_samples = len(batch)
    batch, adv_metrics = stages.advantages(job, batch, step)

    metrics |= adv_metrics
    metrics["perf/experience_s"] = time.perf_counter() - start
    tokens = adv_metrics["response/length_mean"] * num_samples
    if metrics["perf/gen_s"] > 0:  # streaming: 0 when the rollout reported no busy time since the last step
        metrics["perf/gen_tokens_per_s"] = tokens / metrics["perf/gen_s"]
    metrics["perf/trained_tokens"] = adv_metrics["response/length_mean"] * len(batch)
    return batch, metrics


def generate_and_score(
    job: Job, prompts: Batch, step: int, attempt: int = 0
) -> tuple[DistributedBatch, dict[str, float]]:
    """One generation round (the `attempt`-th of this step) and its rewards, without the samples
    `reward.on_error` drops; perf/gen_s times generation."""
    start = time.perf_counter()
    batch = stages.generate(job, prompts, step, attempt)
    gen_s = time.perf_counter() - start
    batch, metrics = stages.score_samples(job, batch)
    return batch, metrics | {"perf/gen_s": gen_s}


def sample(job: Job, step: int) -> tuple[DistributedBatch, Batch, dict[str, float]]:
    """One step's scored groups and their prompts.

    With `algorithm.dynamic_sampling` (DAPO), groups whose rewards do not vary are dropped and
    more prompts are generated until trainer.prompts_per_step groups are in; the reward metrics
    then cover every generated sample, not only the kept ones. Samples dropped for a failed reward
    are gone before the filter sees the round.
    """
    if job.stream is not None:  # streaming mode: scored groups from the store (controller/streaming/)
        return job.stream.sample(job, step)
    settings = job.cfg.algorithm.dynamic_sampling
    if settings is None:
        prompts = job.train_loader.next_batch()
        batch, metrics = generate_and_score(job, prompts, step)
        return batch, prompts, metrics

    quota = DynamicSamplingQuota(job.cfg.trainer.prompts_per_step, settings.max_rounds)
    batches, keeps, kept_prompts, round_metrics, num_generated = [], [], [], [], 0
    while not quota.full:
        prompts = job.train_loader.next_batch()
        num_generated += len(prompts) * job.cfg.rollout.sampling.n
        batch, metrics = generate_and_score(job, prompts, step, attempt=len(batches))
        keep, kept_uids = stages.filter_groups(job, batch, quota)
        batches.append(batch)
        keeps.append(keep)
        kept_prompts.append(prompts.index([i for i, uid in enumerate(prompts["uid"]) if uid in kept_uids]))
        round_metrics.append(metrics)
    metrics = {key: sum(m[key] for m in round_metrics) / len(round_metrics) for key in round_metrics[0]}
    totals = ("reward/num_errors", "reward/num_timeouts", "reward/num_dropped", "perf/gen_s")
    for key in totals:  # totals, not means
        metrics[key] = sum(m[key] for m in round_metrics)
    metrics["reward/error_share"] = metrics["reward/num_errors"] / max(num_generated, 1)
    metrics |= quota.metrics()
    return stages.take_rows(job, batches, keeps), Batch.concat(kept_prompts), metrics
