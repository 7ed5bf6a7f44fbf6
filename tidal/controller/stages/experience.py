"""Making experience: everything a policy update needs, from a batch of prompts.

sample (generate -> score, dropping the samples whose reward failed -> dynamic sampling refill)
-> (greedy baselines) -> (reference log-probs) -> (old log-probs) -> (values) -> advantages.
Which optional stages run follows from the config (`Stages.experience_order`), so GRPO and PPO
share this and differ in their updates. Where the scored samples come from is the job's sampler:
`InPlaceSampler` generates them now (sync mode); the streaming runner's StreamingSource takes them
from the store.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from tidal.algorithms import DynamicSamplingQuota
from tidal.config.schema import JobConfig
from tidal.controller.stages.base import take_rows
from tidal.dataflow.batch import Batch
from tidal.dataflow.dataset import PromptLoader
from tidal.dataflow.distributed_batch import DistributedBatch

if TYPE_CHECKING:
    from tidal.controller.job import Job
    from tidal.controller.stages.pipeline import Stages
    from tidal.controller.trainer_state import TrainerState


class Sampler(Protocol):
    def sample(self, step: int) -> tuple[DistributedBatch, Batch | None, dict[str, float]]:
        """One step's scored samples, their prompts (None when not at hand) and metrics."""
        ...


def make_experience(job: Job, step: int) -> tuple[DistributedBatch, dict[str, float]]:
    cfg, stages = job.cfg, job.stages
    start = time.perf_counter()
    batch, prompts, metrics = job.sampler.sample(step)

    if cfg.algorithm.needs_reward_baselines:
        assert prompts is not None, "the config refuses reward baselines in streaming mode"
        batch, baseline_metrics = stages.reward_baselines(prompts, batch, job.state.version)
        metrics |= baseline_metrics
        metrics["reward/num_dropped"] += baseline_metrics["baseline_reward/num_dropped"]
    if len(batch) == 0:
        from tidal.workers.rewards.scorer import RewardFailureError

        raise RewardFailureError(
            f"every sample of step {step} was dropped because of failed rewards "
            f"(reward.on_error={cfg.reward.on_error}, {metrics['reward/num_errors']:g} failed); "
            "fix the reward function, or set reward.on_error=score to train on them with reward.error_score"
        )
    for stage in stages.experience_order():
        batch = stage(batch)
    num_samples = len(batch)
    batch, adv_metrics = stages.advantages(batch, step)

    metrics |= adv_metrics
    metrics["perf/experience_s"] = time.perf_counter() - start
    tokens = adv_metrics["response/length_mean"] * num_samples
    if metrics["perf/gen_s"] > 0:  # streaming: 0 when the rollout reported no busy time since the last step
        metrics["perf/gen_tokens_per_s"] = tokens / metrics["perf/gen_s"]
    metrics["perf/trained_tokens"] = adv_metrics["response/length_mean"] * len(batch)
    return batch, metrics


class InPlaceSampler:
    """Sync mode: generate and score the step's prompts now.

    With `algorithm.dynamic_sampling` (DAPO), groups whose rewards do not vary are dropped and
    more prompts are generated until trainer.prompts_per_step groups are in; the reward metrics
    then cover every generated sample, not only the kept ones. Samples dropped for a failed reward
    are gone before the filter sees the round.
    """

    def __init__(self, cfg: JobConfig, stages: Stages, loader: PromptLoader, state: TrainerState):
        self.cfg, self.stages, self.loader, self.state = cfg, stages, loader, state

    def generate_and_score(
        self, prompts: Batch, step: int, attempt: int = 0
    ) -> tuple[DistributedBatch, dict[str, float]]:
        """One generation round (the `attempt`-th of this step) and its rewards, without the
        samples `reward.on_error` drops; perf/gen_s times generation."""
        start = time.perf_counter()
        batch = self.stages.generate(prompts, step, self.state.version, attempt)
        gen_s = time.perf_counter() - start
        batch, metrics = self.stages.score.for_training(batch)
        return batch, metrics | {"perf/gen_s": gen_s}

    def sample(self, step: int) -> tuple[DistributedBatch, Batch, dict[str, float]]:
        settings = self.cfg.algorithm.dynamic_sampling
        if settings is None:
            prompts = self.loader.next_batch()
            batch, metrics = self.generate_and_score(prompts, step)
            return batch, prompts, metrics

        quota = DynamicSamplingQuota(self.cfg.trainer.prompts_per_step, settings.max_rounds)
        batches, keeps, kept_prompts, round_metrics, num_generated = [], [], [], [], 0
        while not quota.full:
            prompts = self.loader.next_batch()
            num_generated += len(prompts) * self.cfg.rollout.sampling.n
            batch, metrics = self.generate_and_score(prompts, step, attempt=len(batches))
            keep, kept_uids = self.stages.filter_groups(batch, quota)
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
        return take_rows(batches, keeps), Batch.concat(kept_prompts), metrics
