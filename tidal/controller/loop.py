"""The step loop every program runs: resume, evaluation, the step, the weight sync, logging,
checkpoints, progress. The streaming runner runs this same loop with a different sampler and weight
sync (streaming/runner.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tqdm import tqdm

if TYPE_CHECKING:
    from tidal.controller.job import Job

StepFn = Callable[["Job", int], dict[str, float]]
EvalFn = Callable[["Job"], dict[str, float]]

# Metrics shown on the progress bar (all of them go to JSONL / TensorBoard).
BAR_KEYS = {
    "reward/mean": "reward",
    "val/reward": "val",
    "perf/step_s": "s/step",
    "actor/pg_loss": "pg",
    "actor/preference/accuracy": "acc",
}


def evaluate(job: Job) -> dict[str, float]:
    """The held-out reward of the weights the rollout holds."""
    return job.stages.evaluate(job.state.version)


def push_weights(job: Job, version: int) -> dict[str, float]:
    """The weight sync: the rollout serves the actor's weights of `version` next."""
    start = time.perf_counter()
    metrics = job.weight_sync.push(version)
    job.state.version = version
    return {"perf/sync_weights_s": time.perf_counter() - start, **metrics}


def run_steps(job: Job, step_fn: StepFn, evaluate: EvalFn = evaluate) -> dict[str, float]:
    """Run `step_fn` from the resume point to trainer.total_steps; return the last step's metrics.

    `evaluate` runs before the first step of a fresh run, every trainer.eval_every steps and after
    the last one (programs with held-out checks of their own pass one that adds them)."""
    cfg = job.cfg
    restored = job.restore_latest_checkpoint()
    first = restored + 1
    # Rows from the step this run logs first on belong to an abandoned attempt: drop them.
    job.logger.begin(first if restored else 0)
    push_weights(job, version=first - 1)
    last: dict[str, float] = {}
    # The data report goes with the first row this run logs (row 0, or the first step after a
    # resume, with resume/step), so metrics.jsonl and TensorBoard always hold it, once per start.
    first_row_extra = dict(job.data.report)
    if restored == 0:
        last = evaluate(job)
        job.logger.log(0, last | first_row_extra)
        first_row_extra = {}
    else:
        first_row_extra["resume/step"] = restored
    bar = tqdm(
        range(first, cfg.trainer.total_steps + 1),
        initial=first - 1,
        total=cfg.trainer.total_steps,
        desc="train",
        disable=not cfg.logging.progress_bar,
        dynamic_ncols=True,
    )
    for step in bar:
        start = time.perf_counter()
        metrics = step_fn(job, step)
        metrics |= push_weights(job, version=step)  # weights of this step's update to the rollout
        metrics["perf/step_s"] = time.perf_counter() - start
        if "perf/trained_tokens" in metrics:  # response tokens the update saw, per second of the step
            metrics["perf/trained_tokens_per_s"] = metrics["perf/trained_tokens"] / metrics["perf/step_s"]
        every = cfg.trainer.eval_every
        if step == cfg.trainer.total_steps or (every and step % every == 0):
            metrics |= evaluate(job)
        job.logger.log(step, metrics | first_row_extra)
        first_row_extra = {}
        bar.set_postfix({short: f"{metrics[key]:.3g}" for key, short in BAR_KEYS.items() if key in metrics})
        job.maybe_save_checkpoint(step)
        last = metrics
    return last
