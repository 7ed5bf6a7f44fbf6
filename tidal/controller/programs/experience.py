"""Making experience: everything a policy update needs, from a batch of prompts.

generate -> score -> (reference log-probs) -> (old log-probs) -> (values) -> advantages.
Which optional stages run follows from the config (a critic only for estimators that need values,
a reference only when a KL term is on), so GRPO and PPO share this and differ in their updates.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tidal.controller.programs import stages
from tidal.dataflow.distributed_batch import DistributedBatch

if TYPE_CHECKING:
    from tidal.controller.job import Job


def make_experience(job: Job, step: int) -> tuple[DistributedBatch, dict[str, float]]:
    prompts = job.train_loader.next_batch()

    start = time.perf_counter()
    batch = stages.generate(job, prompts, step)
    gen_s = time.perf_counter() - start

    batch, reward_metrics = stages.score(job, batch)
    if job.cfg.reference_enabled:
        batch = stages.reference_log_probs(job, batch)
    if job.needs_old_log_probs:
        batch = stages.old_log_probs(job, batch)
    if job.cfg.critic_enabled:
        batch = stages.values(job, batch)
    batch, adv_metrics = stages.advantages(job, batch)

    metrics = reward_metrics | adv_metrics
    metrics["perf/gen_s"] = gen_s
    metrics["perf/experience_s"] = time.perf_counter() - start
    metrics["perf/gen_tokens_per_s"] = adv_metrics["response/length_mean"] * len(batch) / max(gen_s, 1e-9)
    return batch, metrics
