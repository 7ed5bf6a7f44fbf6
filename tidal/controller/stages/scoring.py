"""The reward stages: score responses, apply `reward.on_error`, DAPO's group filter, and the
reference rewards of ReMax / PAR."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tidal.algorithms import DynamicSamplingQuota
from tidal.config.schema import JobConfig
from tidal.controller.dispatch import run_task
from tidal.controller.stages import batch_tasks
from tidal.controller.stages.base import Stage, take_rows
from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch
from tidal.workers.rewards.scorer import INPUT_COLUMNS

if TYPE_CHECKING:
    from tidal.controller.stages.rollout import Generate


class Score(Stage):
    """Rewards in parallel Ray tasks; a failing sample is counted and flagged, and the run goes on.

    With `algorithm.reward_combination` every component function scores the batch and one task
    combines them (metrics reward/<name>/mean per component, reward/mean of the combination).
    Metrics: reward/mean (over the samples whose reward did not fail), reward/num_errors,
    reward/num_timeouts, reward/error_share. Nothing is dropped by a call: see `drop_failed`.
    """

    name = "score"
    reads = INPUT_COLUMNS
    writes = ("seq_reward", "token_rewards", "reward_error")
    optional_writes = ("reward_components",)  # algorithm.reward_combination with gdpo

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.logged: set[tuple[str, str]] = set()  # reward error kinds logged (once each per run)

    def __call__(self, batch: DistributedBatch) -> tuple[DistributedBatch, dict[str, float], str | None]:
        """(batch with the reward columns, metrics, the first error as a sentence or None)."""
        rewards, metrics, first_error = self.rewards_of(batch)
        return batch.union(rewards), metrics, first_error

    def rewards_of(self, batch: DistributedBatch) -> tuple[DistributedBatch, dict[str, float], str | None]:
        """The reward columns of `batch` (by reference, not joined to it), metrics and the first error."""
        from tidal.workers.rewards import custom, scorer

        combination = self.cfg.algorithm.reward_combination
        if combination is None:
            return scorer.score_with_errors(batch, self.cfg.reward, logged=self.logged)
        parts, metrics, first_error = [], {}, None
        for name in combination.components:
            part, part_metrics, part_error = scorer.score_with_errors(
                batch, self.cfg.reward.model_copy(update={"function": name}), logged=self.logged
            )
            parts.append(part)
            metrics[f"reward/{custom.label(name)}/mean"] = part_metrics["reward/mean"]
            first_error = first_error or part_error
        rewards, combined = run_task(batch_tasks.combine_rewards, batch.select("response_mask"), parts, self.cfg)
        return rewards, metrics | combined, first_error

    def for_training(self, batch: DistributedBatch) -> tuple[DistributedBatch, dict[str, float]]:
        """Score, stop when too many rewards failed, then apply `reward.on_error` (`drop_failed`)."""
        num_samples = len(batch)
        batch, metrics, first_error = self(batch)
        batch, metrics, _ = self.drop_failed(batch, metrics, first_error, num_samples)
        return batch, metrics

    def drop_failed(
        self, batch: DistributedBatch, metrics: dict[str, float], first_error: str | None, num_samples: int
    ) -> tuple[DistributedBatch, dict[str, float], list[bool] | None]:
        """Stop on too many failures (counted over `num_samples`), else drop per `reward.on_error`;
        adds reward/num_dropped. Also returns the rows kept (None: all).

        A failed reward (the function raised, timed out or returned NaN / inf) says nothing about
        the response, so a sample carrying one must not move the policy. The cleanest way to
        guarantee that is to remove it from the step before anything reads its reward, exactly as
        dynamic sampling and sample selection remove rows: the failed value then cannot reach the
        group statistics of the estimator, the batch-level whitening, the shaping, nor the loss
        and its normalisation. `reward.on_error`: drop_sample removes the failed samples (and, with
        a group estimator, a lone survivor of a group: `batch_tasks.rows_to_keep`), drop_group
        every sample of a prompt with a failure, score keeps them with reward.error_score. More
        than `reward.max_error_share` failed stops the run (RewardFailureError).
        """
        from tidal.workers.rewards.scorer import check_error_share

        metrics = dict(metrics)
        check_error_share(metrics["reward/num_errors"], num_samples, first_error, self.cfg.reward, "sample")
        metrics["reward/num_dropped"] = 0.0
        if metrics["reward/num_errors"] == 0 or self.cfg.reward.on_error == "score":
            return batch, metrics, None
        _, keep = run_task(batch_tasks.drop_failed_rewards, batch.select("uid", "reward_error"), self.cfg)
        metrics["reward/num_dropped"] = float(len(keep) - sum(keep))
        if not all(keep):
            batch = take_rows([batch], [keep])
        return batch, metrics, keep


class FilterGroups(Stage):
    """DAPO dynamic sampling: the rows of a round's kept groups (up to the quota) and their prompt uids.

    The filter runs in a task; only its per-sample verdicts and the uids reach the driver."""

    name = "filter_groups"
    reads = ("seq_reward", "uid")

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg

    def __call__(self, batch: DistributedBatch, quota: DynamicSamplingQuota) -> tuple[list[bool], set[str]]:
        _, keep, uids = run_task(batch_tasks.filter_groups, self.inputs(batch), self.cfg)
        take = quota.admit(torch.tensor(keep, dtype=torch.bool), uids).tolist()
        return take, {uid for uid, taken in zip(uids, take) if taken}


class RewardBaselines(Stage):
    """ReMax / PAR: add `reward_baselines`, the rewards of reference responses to each prompt.

    The references are the policy's greedy response (ReMax, PAR baseline=greedy), or the dataset's
    reference responses (PAR baseline=data: [N, M], nothing generated). Both are scored by `score`,
    so reward combinations and error counting apply to them as to the samples; their reward
    metrics come back as `baseline_reward/*`. Failed references follow `reward.on_error` too: more
    than reward.max_error_share of them stops the run; with a drop setting a failed reference is
    left out, and the samples of a prompt left without a reference are dropped (counted in
    baseline_reward/num_dropped).
    """

    name = "reward_baselines"
    reads = ("uid",)  # of the samples; the prompts come beside the batch
    writes = ("reward_baselines",)

    def __init__(self, cfg: JobConfig, generate: Generate, score: Score):
        self.cfg, self.generate, self.score = cfg, generate, score

    def __call__(
        self, prompts: Batch, batch: DistributedBatch, version: int
    ) -> tuple[DistributedBatch, dict[str, float]]:
        from tidal.workers.rewards.scorer import check_error_share

        cfg = self.cfg
        if cfg.algorithm.par_baseline == "data":
            references = DistributedBatch.from_batch(batch_tasks.reference_rows(prompts))
        else:
            greedy = cfg.rollout.sampling.model_copy(update={"temperature": 0.0, "n": 1})
            references = self.generate(prompts, 0, version, sampling=greedy, seed=0)
        num_references = len(references)
        scored, metrics, first_error = self.score(references)
        check_error_share(metrics["reward/num_errors"], num_references, first_error, cfg.reward, "reference")
        drop = cfg.reward.on_error != "score"
        baselines, keep = run_task(
            batch_tasks.attach_baselines_keeping,
            self.inputs(batch),
            scored.select("uid", "seq_reward", "reward_error"),
            drop,
        )
        batch = batch.union(baselines)
        metrics["reward/num_dropped"] = float(len(keep) - sum(keep))
        if not all(keep):
            batch = take_rows([batch], [keep])
        return batch, {f"baseline_reward/{key.removeprefix('reward/')}": value for key, value in metrics.items()}
