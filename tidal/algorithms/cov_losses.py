"""Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617).

Entropy collapses because tokens whose log-prob and advantage co-vary strongly dominate the update.
Both losses find such tokens by the centred product cov = (A - mean A) * (log pi - mean log pi)
over the micro-batch's valid tokens and restrain a small fraction of them:
- clip_cov: a random `clip_cov_ratio` fraction of tokens with lb < cov < ub (and not already clipped
  by PPO) get no gradient at all;
- kl_cov: the top `kl_cov_ratio` fraction by cov get a |log-ratio| penalty added.
The selection uses statistics of the pieces it is given (as verl's), so unlike the other losses a
split into micro-batches is not exactly the whole-batch loss. The parameters are `ActorConfig`
fields (clip_cov_ratio / clip_cov_lb / clip_cov_ub, kl_cov_ratio / kl_cov_coef; defaults are
verl's). The signature is the one in `policy_losses.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tidal.algorithms.aggregation import Denominator, aggregate_loss
from tidal.algorithms.masked import masked_mean
from tidal.algorithms.policy_losses import metrics_of, weighted

if TYPE_CHECKING:
    from tidal.config.schema import ActorConfig


def _centred_covariance(
    advantages: torch.Tensor, log_probs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    log_probs = log_probs.detach()
    return (advantages - masked_mean(advantages, mask)) * (log_probs - masked_mean(log_probs, mask))


def clip_cov(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clip (no dual clip, no log-ratio clamp, as verl) with high-covariance tokens detached.

    `generator` draws the random subset of candidates (None: torch's global generator).
    """
    clip_cov_ratio, clip_cov_lb, clip_cov_ub = config.clip_cov_ratio, config.clip_cov_lb, config.clip_cov_ub
    if clip_cov_ratio <= 0:
        raise ValueError(
            f"actor.clip_cov_ratio={clip_cov_ratio} must be > 0 (the fraction of tokens to clip)"
        )
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    losses_unclipped = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1 - config.clip_ratio_low, 1 + config.clip_ratio_high)
    valid = response_mask > 0
    with torch.no_grad():
        cov = _centred_covariance(advantages, log_probs, response_mask)
        already_clipped = (losses_clipped > losses_unclipped) & valid
        candidates = (cov > clip_cov_lb) & (cov < clip_cov_ub) & valid & ~already_clipped
        positions = torch.nonzero(candidates)
        num_clip = max(int(clip_cov_ratio * float(response_mask.sum())), 1)
        chosen = positions[torch.randperm(len(positions), generator=generator)[:num_clip]]
        keep = torch.ones_like(advantages)
        keep[chosen[:, 0], chosen[:, 1]] = 0
    pg_losses = torch.maximum(losses_unclipped, losses_clipped) * keep
    loss = aggregate_loss(weighted(pg_losses, is_weights), response_mask, config.loss_agg_mode, denominator)
    with torch.no_grad():
        metrics = metrics_of(
            pg_clipfrac=masked_mean((keep == 0).float(), response_mask),
            ppo_kl=masked_mean(-log_ratio, response_mask),
        )
    return loss, metrics


def kl_cov(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """-A * ratio (no clip), plus kl_cov_coef * |log ratio| on the top-covariance tokens.

    The ppo_kl metric here is the mean |log ratio|, as in verl (whose kl_cov_coef is `ppo_kl_coef`).
    """
    kl_cov_ratio, kl_cov_coef = config.kl_cov_ratio, config.kl_cov_coef
    if kl_cov_ratio <= 0:
        raise ValueError(
            f"actor.kl_cov_ratio={kl_cov_ratio} must be > 0 (the fraction of tokens to penalise)"
        )
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    valid = response_mask > 0
    num_valid = int(valid.sum())
    if num_valid:
        with torch.no_grad():
            # Statistics over the valid tokens only (verl's). Top-k runs over the valid tokens packed
            # in row-major order, exactly as verl's does: torch.topk breaks ties by position in its
            # input, so a top-k over the padded matrix (or a stable sort) penalises other tokens
            # among equal covariances than verl, and the gradients differ.
            cov = _centred_covariance(advantages, log_probs, response_mask)
            valid_index = torch.nonzero(valid.flatten(), as_tuple=True)[0]
            top_valid = torch.topk(cov.flatten()[valid_index], max(1, int(num_valid * kl_cov_ratio))).indices
            top = valid_index[top_valid]
            penalised = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)
            penalised[top] = True
        pg_losses = torch.where(penalised.view_as(cov), pg_losses + kl_cov_coef * log_ratio.abs(), pg_losses)
    loss = aggregate_loss(weighted(pg_losses, is_weights), response_mask, config.loss_agg_mode, denominator)
    with torch.no_grad():
        metrics = metrics_of(ppo_kl=masked_mean(log_ratio.abs(), response_mask))
    return loss, metrics
