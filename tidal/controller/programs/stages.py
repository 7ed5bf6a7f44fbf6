"""The stages of one RL step, each a small function over a DistributedBatch.

A stage reads some columns and returns new ones; it never pulls payload tensors to the driver.
The sync programs call them in order; a streaming executor can run the same functions over a data
store because each stage names what it reads and what it adds.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING

import torch

from tidal.algorithms import DynamicSamplingQuota
from tidal.controller.programs import batch_tasks
from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch

if TYPE_CHECKING:
    from tidal.controller.job import Job


# The reward error kinds each job has logged (the first of each kind is logged once per run).
_LOGGED_REWARD_ERRORS: weakref.WeakKeyDictionary[Job, set[tuple[str, str]]] = weakref.WeakKeyDictionary()


def generate(
    job: Job, prompts: Batch, step: int, attempt: int = 0, policy_version: int | None = None
) -> DistributedBatch:
    """prompts x n -> responses, response masks, behaviour log-probs, policy version.

    `attempt` numbers the generation rounds of one step (dynamic sampling), each with its own seed.
    `policy_version` stamps the samples (default: the job's version; the streaming runner passes
    the version its rollout pool holds).
    The data's reference responses (PAR baseline=data) stay with the prompts: every sample would
    otherwise carry its prompt's copy through the step.
    """
    seed = job.cfg.trainer.seed * 100_003 + step + attempt * 1_000_003
    if "reference_responses" in prompts:
        prompts = prompts.select(*(key for key in prompts.keys() if key != "reference_responses"))
    version = job.version if policy_version is None else policy_version
    return job.rollout.generate(prompts, seed=seed, policy_version=version)


def score(job: Job, batch: DistributedBatch) -> tuple[DistributedBatch, dict[str, float]]:
    """Rewards in parallel Ray tasks; a failing sample is counted and flagged, and the run goes on.

    With `algorithm.reward_combination` every component function scores the batch and one task
    combines them (metrics reward/<name>/mean per component, reward/mean of the combination).
    Metrics: reward/mean (over the samples whose reward did not fail), reward/num_errors,
    reward/num_timeouts, reward/error_share. Nothing is dropped here: see `score_samples`.
    """
    scored, metrics, _ = score_with_errors(job, batch)
    return scored, metrics


def score_with_errors(
    job: Job, batch: DistributedBatch
) -> tuple[DistributedBatch, dict[str, float], str | None]:
    """`score` plus the first error of the batch as a sentence (None when no reward failed)."""
    rewards, metrics, first_error = rewards_of(job, batch)
    return batch.union(rewards), metrics, first_error


def rewards_of(job: Job, batch: DistributedBatch) -> tuple[DistributedBatch, dict[str, float], str | None]:
    """The reward columns of `batch` (by reference, not joined to it), metrics and the first error."""
    from tidal.workers.rewards import custom, scorer

    logged = _LOGGED_REWARD_ERRORS.setdefault(job, set())
    combination = job.cfg.algorithm.reward_combination
    if combination is None:
        return scorer.score_with_errors(batch, job.cfg.reward, logged=logged)
    parts, metrics, first_error = [], {}, None
    for name in combination.components:
        part, part_metrics, part_error = scorer.score_with_errors(
            batch, job.cfg.reward.model_copy(update={"function": name}), logged=logged
        )
        parts.append(part)
        metrics[f"reward/{custom.label(name)}/mean"] = part_metrics["reward/mean"]
        first_error = first_error or part_error
    rewards, combined = job.run_task(
        batch_tasks.combine_rewards, batch.select("response_mask"), parts, job.cfg
    )
    return rewards, metrics | combined, first_error


def score_samples(job: Job, batch: DistributedBatch) -> tuple[DistributedBatch, dict[str, float]]:
    """`score` for training: stop when too many rewards failed, then apply `reward.on_error`.

    A failed reward (the function raised, timed out or returned NaN / inf) says nothing about the
    response, so a sample carrying one must not move the policy. The cleanest way to guarantee that
    is to remove it from the step before anything reads its reward, exactly as dynamic sampling
    and sample selection remove rows: the failed value then cannot reach the group statistics of
    the estimator, the batch-level whitening, the shaping, nor the loss and its normalisation.
    `reward.on_error`: drop_sample removes the failed samples (and, with a group estimator, a lone
    survivor of a group: `batch_tasks.rows_to_keep`), drop_group every sample of a prompt with a
    failure, score keeps them with reward.error_score. Failures are still counted
    (reward/num_errors, reward/num_timeouts, reward/error_share); reward/num_dropped counts the
    samples removed. More than `reward.max_error_share` failed stops the run (RewardFailureError).
    """
    num_samples = len(batch)
    batch, metrics, first_error = score_with_errors(job, batch)
    batch, metrics, _ = drop_failed(job, batch, metrics, first_error, num_samples)
    return batch, metrics


def drop_failed(
    job: Job, batch: DistributedBatch, metrics: dict[str, float], first_error: str | None, num_samples: int
) -> tuple[DistributedBatch, dict[str, float], list[bool] | None]:
    """The second half of `score_samples` for a scored batch: stop on too many failures (counted
    over `num_samples`), else drop per `reward.on_error`; adds reward/num_dropped. Also returns
    the rows kept (None: all)."""
    from tidal.workers.rewards.scorer import check_error_share

    metrics = dict(metrics)
    check_error_share(metrics["reward/num_errors"], num_samples, first_error, job.cfg.reward, "sample")
    metrics["reward/num_dropped"] = 0.0
    if metrics["reward/num_errors"] == 0 or job.cfg.reward.on_error == "score":
        return batch, metrics, None
    _, keep = job.run_task(batch_tasks.drop_failed_rewards, batch.select("uid", "reward_error"), job.cfg)
    metrics["reward/num_dropped"] = float(len(keep) - sum(keep))
    if not all(keep):
        batch = take_rows(job, [batch], [keep])
    return batch, metrics, keep


def filter_groups(
    job: Job, batch: DistributedBatch, quota: DynamicSamplingQuota
) -> tuple[list[bool], set[str]]:
    """DAPO dynamic sampling: rows of this round's kept groups (up to the quota) and their prompt uids.

    The filter runs in a task; only its per-sample verdicts and the uids reach the driver.
    """
    _, keep, uids = job.run_task(batch_tasks.filter_groups, batch.select("seq_reward", "uid"), job.cfg)
    take = quota.admit(torch.tensor(keep, dtype=torch.bool), uids).tolist()
    return take, {uid for uid, taken in zip(uids, take) if taken}


def take_rows(job: Job, batches: list[DistributedBatch], keeps: list[list[bool]]) -> DistributedBatch:
    """The kept rows of several batches with the same columns, as one batch (in one Ray task)."""
    return job.run_task(batch_tasks.keep_rows, batches[0], batches[1:], keeps)


def reward_baselines(
    job: Job, prompts: Batch, batch: DistributedBatch
) -> tuple[DistributedBatch, dict[str, float]]:
    """ReMax / PAR: add `reward_baselines`, the rewards of reference responses to each prompt.

    The references are the policy's greedy response (ReMax, PAR baseline=greedy), or the dataset's
    reference responses (PAR baseline=data: [N, M], nothing generated). Both are scored by `score`,
    so reward combinations and error counting apply to them as to the samples; their reward
    metrics come back as `baseline_reward/*`. Failed references follow `reward.on_error` too: more
    than reward.max_error_share of them stops the run; with a drop setting a failed reference is
    left out, and the samples of a prompt left without a reference are dropped (counted in
    baseline_reward/num_dropped).
    """
    from tidal.workers.rewards.scorer import check_error_share

    if job.cfg.algorithm.par_baseline == "data":
        references = DistributedBatch.from_batch(batch_tasks.reference_rows(prompts))
    else:
        greedy = job.cfg.rollout.sampling.model_copy(update={"temperature": 0.0, "n": 1})
        references = job.rollout.generate(prompts, sampling=greedy, seed=0, policy_version=job.version)
    num_references = len(references)
    scored, metrics, first_error = score_with_errors(job, references)
    check_error_share(metrics["reward/num_errors"], num_references, first_error, job.cfg.reward, "reference")
    drop = job.cfg.reward.on_error != "score"
    baselines, keep = job.run_task(
        batch_tasks.attach_baselines_keeping,
        batch.select("uid"),
        scored.select("uid", "seq_reward", "reward_error"),
        drop,
    )
    batch = batch.union(baselines)
    metrics["reward/num_dropped"] = float(len(keep) - sum(keep))
    if not all(keep):
        batch = take_rows(job, [batch], [keep])
    return batch, {f"baseline_reward/{key.removeprefix('reward/')}": value for key, value in metrics.items()}


def reference_log_probs(job: Job, batch: DistributedBatch) -> DistributedBatch:
    return batch.union(job.reference.compute_ref_log_probs(batch))


def old_log_probs(job: Job, batch: DistributedBatch) -> DistributedBatch:
    return batch.union(job.actor.compute_log_probs(batch))


def values(job: Job, batch: DistributedBatch) -> DistributedBatch:
    return batch.union(job.critic.compute_values(batch))


def advantages(job: Job, batch: DistributedBatch, step: int) -> tuple[DistributedBatch, dict[str, float]]:
    """Shaping, KL-in-reward, the estimator, sample and token selection: one Ray task over the step.

    Adds advantages, returns (and pg_mask / is_weights when configured); drops the rows that
    `algorithm.sample_selection` does not keep.
    """
    from tidal.controller.programs.advantage_task import (
        OPTIONAL_COLUMNS,
        REQUIRED_COLUMNS,
        compute_advantages,
    )

    inputs = batch.select(*REQUIRED_COLUMNS, optional=OPTIONAL_COLUMNS)  # only what the task reads
    adv, keep, metrics = job.run_task(compute_advantages, inputs, job.cfg, job.kl_ctrl_state(), step)
    if "kl/in_reward" in metrics:
        job.update_kl_ctrl(metrics["kl/in_reward"], len(batch))
    batch = batch.union(adv)
    if keep is not None and not all(keep):
        batch = take_rows(job, [batch], [keep])
    return batch, metrics


def update_critic(job: Job, batch: DistributedBatch) -> dict[str, float]:
    return job.critic.update(batch)  # keys already prefixed `critic/`


def update_actor(job: Job, batch: DistributedBatch, step: int) -> dict[str, float]:
    return job.actor.update(batch, step=step)  # keys already prefixed `actor/`


def sync_weights(job: Job, version: int) -> dict[str, float]:
    """Actor -> rollout through the resharder (tidal/resharding/sync.py); the rollout serves `version` next."""
    start = time.perf_counter()
    metrics = job.sync_weights(version)
    return {"perf/sync_weights_s": time.perf_counter() - start, **metrics}


def evaluate(job: Job) -> dict[str, float]:
    """Held-out reward with the validation sampling settings (greedy by default)."""
    if job.val_prompts is None:
        return {}
    start = time.perf_counter()
    batch = job.rollout.generate(
        job.val_prompts, sampling=job.cfg.rollout.val_sampling, seed=0, policy_version=job.version
    )
    _, metrics = score(job, batch)  # failed rewards are counted, never a reason to stop
    return {
        "val/reward": metrics["reward/mean"],
        "val/reward_errors": metrics["reward/num_errors"],
        "perf/eval_s": time.perf_counter() - start,
    }
