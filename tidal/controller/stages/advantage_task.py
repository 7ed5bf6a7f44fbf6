"""Rewards -> advantages and the update's masks for a whole step, as one Ray task (the driver never
touches the tensors).

Group estimators (GRPO, RLOO, ...) need every sample of a prompt together, and token selection ranks
tokens across the whole step, so this runs over the full step rather than per data-parallel shard:

1. reward shaping (`algorithm.reward_shaping`, in order) on each sample's sequence reward;
2. the KL penalty in the reward (`algorithm.use_kl_in_reward`);
3. the advantage estimator (`algorithm.advantage_estimator`);
4. sample selection (`algorithm.sample_selection`): which rows to keep, returned to the program;
5. token selection and the off-policy correction (`algorithm.token_selection`, `algorithm.off_policy`):
   the columns `pg_mask` (tokens that carry the policy gradient) and `is_weights`.

Every piece comes from a registry (`configured_plugins`) and is offered every optional input the
step has (`call_accepting`): values, reward baselines, entropy, old log-probs, sum_pi_squared,
reward components, and the off-policy weights as `rollout_is_weights`. A new estimator or plug-in
never changes this file.
"""

from __future__ import annotations

import inspect

import torch

from tidal.algorithms import (
    ADVANTAGE_ESTIMATORS,
    FixedKLController,
    add_at_last_token,
    apply_kl_penalty,
    call_accepting,
    masked_mean,
)
from tidal.algorithms.off_policy import mismatch_kl
from tidal.algorithms.plugins import ConfiguredPlugins, configured_plugins
from tidal.config.schema import JobConfig
from tidal.dataflow.batch import Batch

# Batch columns an estimator or plug-in may ask for by name (the batch has them when a stage ran):
# old_log_probs and sum_pi_squared feed the optimal token baselines, reward_components GDPO.
OPTIONAL_INPUTS = (
    "values",
    "reward_baselines",
    "entropy",
    "old_log_probs",
    "sum_pi_squared",
    "reward_components",
)
# Every column the task reads: the advantage stage ships only these (`stages.advantages` selects
# them), and `compute_advantages` narrows its batch to them first, so a read of any other column
# fails in the unit tests rather than in a run. ref_log_probs: the KL in the reward;
# rollout_log_probs: the off-policy correction and the log-prob gap metric.
REQUIRED_COLUMNS = ("response_mask", "uid", "token_rewards")
OPTIONAL_COLUMNS = (*OPTIONAL_INPUTS, "ref_log_probs", "rollout_log_probs")


def compute_advantages(
    batch: Batch, cfg: JobConfig, kl_coef: float, step: int
) -> tuple[Batch, list[bool] | None, dict[str, float]]:
    """(new columns, rows to keep or None for all, metrics) for one step's batch."""
    batch = batch.select(*REQUIRED_COLUMNS, *(key for key in OPTIONAL_COLUMNS if key in batch))
    alg = cfg.algorithm
    plugins = configured_plugins(cfg, step)
    mask = batch["response_mask"].float()
    uids = list(batch["uid"])
    inputs = {key: batch[key] for key in OPTIONAL_INPUTS if key in batch}
    rewards, metrics = shape_rewards(batch, mask, uids, plugins, inputs)
    if alg.use_kl_in_reward:
        # The driver owns the (possibly adaptive) controller; here its current value is applied
        # and the measured KL is reported back for the driver's update.
        rewards, kl_metrics = apply_kl_penalty(
            rewards,
            batch["old_log_probs"],
            batch["ref_log_probs"],
            mask,
            FixedKLController(kl_coef),
            alg.kl_penalty,
        )
        metrics["kl/in_reward"] = kl_metrics["reward_kl_penalty"]
        metrics["kl/coef"] = kl_metrics["reward_kl_penalty_coeff"]
    estimator = ADVANTAGE_ESTIMATORS.get(alg.advantage_estimator)
    adv_inputs = inputs
    if "rollout_is_weights" in inspect.signature(estimator).parameters:
        adv_inputs = inputs | rollout_is_weights(batch, mask, plugins)
    adv, returns = call_accepting(estimator, rewards, mask, group_ids=uids, config=alg, **adv_inputs)
    keep = None
    if plugins.sample_selector is not None:
        per_sample = masked_mean(adv, mask, dim=-1)
        keep, selection_metrics = plugins.sample_selector(per_sample, group_ids=uids)
        metrics |= selection_metrics
    columns = {
        "advantages": adv.to(torch.float32),
        "returns": returns.to(torch.float32),
        "token_rewards_total": rewards.to(torch.float32),
    }
    valid = mask if keep is None else mask * keep.unsqueeze(-1).to(mask.dtype)
    mask_columns, mask_metrics = policy_gradient_masks(batch, valid, adv, plugins, inputs)
    columns |= mask_columns
    metrics |= mask_metrics | step_metrics(batch, mask, adv, returns)
    return Batch.from_dict(columns), None if keep is None else keep.tolist(), metrics


def shape_rewards(
    batch: Batch,
    mask: torch.Tensor,
    uids: list,
    plugins: ConfiguredPlugins,
    inputs: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token rewards after the configured shapers; each shaper rewrites the sequence reward."""
    rewards = batch["token_rewards"].float()
    if not plugins.reward_shapers:
        return rewards, {}
    original = rewards.sum(dim=-1)
    shaped, metrics = original, {}
    for shaper in plugins.reward_shapers:
        shaped, shaper_metrics = call_accepting(shaper, shaped, mask, group_ids=uids, **inputs)
        metrics |= shaper_metrics
    metrics["reward/shaped_mean"] = float(shaped.mean()) if len(shaped) else 0.0
    return add_at_last_token(rewards, shaped - original, mask), metrics


def rollout_is_weights(
    batch: Batch, mask: torch.Tensor, plugins: ConfiguredPlugins
) -> dict[str, torch.Tensor]:
    """The off-policy correction's weights as `rollout_is_weights`, for estimators that read them
    (the optimal token baselines scale their variance weights by them, as verl does). Computed
    over every valid token, before sample selection; the update's `is_weights` come later."""
    if plugins.off_policy_correction is None:
        return {}
    weights, _, _ = plugins.off_policy_correction(
        batch["old_log_probs"].float(), batch["rollout_log_probs"].float(), mask
    )
    return {"rollout_is_weights": weights}


def policy_gradient_masks(
    batch: Batch,
    valid: torch.Tensor,
    advantages: torch.Tensor,
    plugins: ConfiguredPlugins,
    inputs: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """`pg_mask` (token selection x rejected off-policy tokens) and `is_weights`, when configured."""
    if plugins.token_selector is None and plugins.off_policy_correction is None:
        return {}, {}
    pg_mask, columns, metrics = valid, {}, {}
    if plugins.token_selector is not None:
        if "entropy" not in inputs:
            raise ValueError(
                "algorithm.token_selection needs the trainer's entropy: run actor.compute_log_probs"
            )
        pg_mask, metrics = call_accepting(plugins.token_selector, valid, advantages=advantages, **inputs)
    if plugins.off_policy_correction is not None:
        weights, kept, is_metrics = plugins.off_policy_correction(
            batch["old_log_probs"].float(), batch["rollout_log_probs"].float(), valid
        )
        pg_mask = pg_mask * kept
        columns["is_weights"] = weights.to(torch.float32)
        metrics |= {f"off_policy/{key}": value for key, value in is_metrics.items()}
    columns["pg_mask"] = pg_mask.to(torch.float32)
    metrics["tokens/pg_fraction"] = float(pg_mask.sum() / valid.sum().clamp(min=1))
    return columns, metrics


def step_metrics(
    batch: Batch, mask: torch.Tensor, adv: torch.Tensor, returns: torch.Tensor
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if "old_log_probs" in batch and "rollout_log_probs" in batch and mask.sum() > 0:
        # Rollout and trainer should agree on the same weights; a gap means a numerics or layout bug.
        gap = (batch["old_log_probs"] - batch["rollout_log_probs"]).abs() * mask
        metrics["rollout/logprob_gap_max"] = float(gap.max())
        metrics["rollout/logprob_gap_mean"] = float(gap.sum() / mask.sum())
        # KL(rollout || trainer) per token, k3 estimator (non-negative, low variance): the
        # train/inference mismatch, which in streaming mode also holds the data's staleness.
        metrics["rollout/mismatch_kl"] = mismatch_kl(batch["old_log_probs"], batch["rollout_log_probs"], mask)
    lengths = mask.sum(-1)
    has_rows = len(lengths) > 0
    return metrics | {
        "adv/mean": float(masked_mean(adv, mask)),
        "returns/mean": float(masked_mean(returns, mask)),
        "response/length_mean": float(lengths.mean()) if has_rows else 0.0,
        "response/length_max": float(lengths.max()) if has_rows else 0.0,
        "response/clip_frac": float((batch["response_mask"][:, -1] > 0).float().mean()) if has_rows else 0.0,
    }
