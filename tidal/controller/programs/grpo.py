"""GRPO (critic-free): sample a group of responses per prompt, score them, and move the policy
towards the responses that beat their group's average.

Everything else comes from config through the algorithm registries: the estimator, the loss, reward
shaping, DAPO's dynamic sampling (the sampler refills the step), sample and token
selection, off-policy corrections."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tidal.controller.loop import run_steps
from tidal.controller.stages.experience import make_experience

if TYPE_CHECKING:
    from tidal.controller.job import Job


def grpo_step(job: Job, step: int) -> dict[str, float]:
    batch, metrics = make_experience(job, step)
    start = time.perf_counter()
    metrics |= job.stages.update_actor(batch, step)
    metrics["perf/update_s"] = time.perf_counter() - start
    return metrics


def run_grpo(job: Job) -> dict[str, float]:
    return run_steps(job, grpo_step)
