"""Advantages for a whole step, run as one Ray task so the driver never touches the tensors.

Group estimators (GRPO, RLOO, ...) need every sample of a prompt together, so this runs over the
full step rather than per data-parallel shard.
"""

from __future__ import annotations

import torch

from tidal.algorithms import ADVANTAGE_ESTIMATORS, FixedKLController, apply_kl_penalty, masked_mean
from tidal.config.schema import AlgorithmConfig
from tidal.dataflow.batch import Batch


def compute_advantages(batch: Batch, cfg: AlgorithmConfig, kl_coef: float) -> tuple[Batch, dict[str, float]]:
    mask = batch["response_mask"].float()
    rewards = batch["token_rewards"].float()
    metrics: dict[str, float] = {}
    if cfg.use_kl_in_reward:
        # The driver owns the (possibly adaptive) controller; here its current value is applied
        # and the measured KL is reported back for the driver's update.
        rewards, kl_metrics = apply_kl_penalty(
            rewards,
            batch["old_log_probs"],
            batch["ref_log_probs"],
            mask,
            FixedKLController(kl_coef),
            cfg.kl_penalty,
        )
        metrics["kl/in_reward"] = kl_metrics["reward_kl_penalty"]
        metrics["kl/coef"] = kl_metrics["reward_kl_penalty_coeff"]
    estimator = ADVANTAGE_ESTIMATORS.get(cfg.advantage_estimator)
    values = batch["values"] if "values" in batch else None
    adv, returns = estimator(rewards, mask, group_ids=list(batch["uid"]), values=values, config=cfg)
    if "old_log_probs" in batch and "rollout_log_probs" in batch and mask.sum() > 0:
        # Rollout and trainer should agree on the same weights; a gap means a numerics or layout bug.
        gap = (batch["old_log_probs"] - batch["rollout_log_probs"]).abs() * mask
        metrics["rollout/logprob_gap_max"] = float(gap.max())
        metrics["rollout/logprob_gap_mean"] = float(gap.sum() / mask.sum())
    lengths = mask.sum(-1)
    metrics |= {
        "adv/mean": float(masked_mean(adv, mask)),
        "returns/mean": float(masked_mean(returns, mask)),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()) if len(lengths) else 0.0,
        "response/clip_frac": float((batch["response_mask"][:, -1] > 0).float().mean())
        if len(lengths)
        else 0.0,
    }
    out = Batch.from_dict(
        {
            "advantages": adv.to(torch.float32),
            "returns": returns.to(torch.float32),
            "token_rewards_total": rewards.to(torch.float32),
        }
    )
    return out, metrics
