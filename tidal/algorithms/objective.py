"""The actor's objective on one micro-batch: policy gradient, entropy bonus and KL loss.

    loss = pg_loss(on pg_mask, weighted by is_weights) - entropy_coeff * H + kl_coef * KL(pi || ref)

(with `actor.use_bias_correction_kl`, TRL's, each token's KL is multiplied by pi / pi_old first)

A pure function of tensors and the actor config, so the worker only runs it and tests check it
without processes. The policy loss and the KL estimator are picked by name from the registries
(`actor.policy_loss`, `actor.kl_loss_type`); a new loss never touches this file or a worker.

Normalisation: every term divides by the GLOBAL counts of the mini-batch (`aggregation.py`). When
the advantage task restricted the policy gradient to `pg_mask` (token selection, masked importance
sampling), the policy loss divides by the mini-batch's counts of `pg_mask` (`counts.of("pg_mask")`,
which the engine computes when asked to), so each mini-batch's loss is exactly the loss on its
selected tokens. The entropy and KL terms keep the full mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from tidal.algorithms.aggregation import GlobalCounts, aggregate_loss
from tidal.algorithms.distill import kdrl_beta, kdrl_kl_loss
from tidal.algorithms.masked import masked_mean
from tidal.algorithms.off_policy import mismatch_kl
from tidal.algorithms.trl_losses import kl_importance_ratio
from tidal.registry import POLICY_LOSSES

if TYPE_CHECKING:
    from tidal.config.schema import ActorConfig


def actor_objective(
    log_probs: torch.Tensor,
    entropy: torch.Tensor,
    micro: Mapping[str, torch.Tensor],
    counts: GlobalCounts,
    config: ActorConfig,
    *,
    on_policy: bool,
    kl_coef: float,
) -> tuple[torch.Tensor, dict[str, float], dict[str, float]]:
    """(loss, terms that sum over micro-batches, token means) for one micro-batch.

    `micro` holds response_mask, advantages, and as configured old_log_probs (absent when
    `on_policy`: the detached current log-probs stand in), pg_mask and is_weights, ref_log_probs
    and seq_reward (KL loss with reward-guided masking); with a pg_mask, `counts.of("pg_mask")` must
    be there. With rollout_log_probs, the token mean `rollout_kl` is KL(rollout || trainer) under
    the weights of this forward (before any optimizer step of the update's first mini-batch).
    `kl_coef` is this step's KL-loss coefficient (annealed by the caller for KDRL).
    """
    mask = micro["response_mask"]
    old_log_probs = log_probs.detach() if on_policy else micro["old_log_probs"]
    pg_mask, pg_counts = mask, counts
    if "pg_mask" in micro:
        pg_mask, pg_counts = micro["pg_mask"], counts.of("pg_mask")
    pg_loss, pg_metrics = POLICY_LOSSES.get(config.policy_loss)(
        log_probs,
        old_log_probs,
        micro["advantages"],
        pg_mask,
        config=config,
        denominator=pg_counts,
        is_weights=micro.get("is_weights"),
    )
    loss = pg_loss
    sums = {"pg_loss": float(pg_loss.detach())}
    means = dict(pg_metrics)
    means["entropy"] = float(masked_mean(entropy.detach(), mask))
    if "rollout_log_probs" in micro:  # the mismatch, free: this forward already ran
        means["rollout_kl"] = mismatch_kl(log_probs.detach(), micro["rollout_log_probs"], mask)
    if config.entropy_coeff != 0:
        entropy_loss = aggregate_loss(entropy, mask, config.loss_agg_mode, counts)
        loss = loss - config.entropy_coeff * entropy_loss
        sums["entropy_loss"] = float(entropy_loss.detach())
    if config.use_kl_loss:
        # KL to the reference slot: the initial policy, or KDRL's teacher (reward-guided masking
        # with kl_loss_correct_threshold).
        kl_loss, kl_metrics = kdrl_kl_loss(
            log_probs,
            micro["ref_log_probs"],
            mask,
            estimator=config.kl_loss_type,
            loss_agg_mode=config.loss_agg_mode,
            denominator=counts,
            seq_reward=micro.get("seq_reward"),
            correct_threshold=config.kl_loss_correct_threshold,
            # TRL's use_bias_correction_kl: the samples come from pi_old, so weight each token's KL by
            # pi / pi_old (with its gradient) to estimate KL(pi || ref) and its gradient without bias.
            weights=(
                kl_importance_ratio(log_probs, old_log_probs, mask, config.policy_loss)
                if config.use_bias_correction_kl
                else None
            ),
        )
        loss = loss + kl_coef * kl_loss
        sums["kl_loss"] = float(kl_loss.detach())
        means["kl"] = kl_metrics["kdrl/kl"]
        means["kl_coef"] = kl_coef
    sums["loss"] = float(loss.detach())
    return loss, sums, means


def kl_loss_coef(config: ActorConfig, step: int) -> float:
    """actor.kl_loss_coef, annealed linearly to kl_loss_coef_end over kl_loss_anneal_steps (KDRL)."""
    if config.kl_loss_coef_end is None:
        return config.kl_loss_coef
    return kdrl_beta(
        step,
        beta_start=config.kl_loss_coef,
        beta_end=config.kl_loss_coef_end,
        anneal_steps=config.kl_loss_anneal_steps,
    )
