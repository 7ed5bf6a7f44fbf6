"""PPO with a learned critic: values -> GAE advantages -> critic update -> actor update."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tidal.controller.loop import run_steps
from tidal.controller.stages.experience import make_experience

if TYPE_CHECKING:
    from tidal.controller.job import Job


def ppo_step(job: Job, step: int) -> dict[str, float]:
    assert job.cfg.critic_enabled, "run.train picks this program only when the critic is on"
    batch, metrics = make_experience(job, step)
    start = time.perf_counter()
    # The critic learns from this step's returns; the actor update does not depend on it (verl's order).
    metrics |= job.stages.update_critic(batch)
    metrics |= job.stages.update_actor(batch, step)
    metrics["perf/update_s"] = time.perf_counter() - start
    return metrics


def run_ppo(job: Job) -> dict[str, float]:
    return run_steps(job, ppo_step)
