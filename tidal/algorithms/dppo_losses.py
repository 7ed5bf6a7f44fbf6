"""DPPO (binary TV and binary KL variants) and DRO, with the definitions of verl 0.9.1's `core_algos`.

DPPO (arXiv 2602.04879) replaces PPO's ratio clip by a trust region on the sampled token's
PROBABILITY: a token whose probability has already moved too far, in the direction its advantage
pushes, gets no gradient (a mask, not a clip of the ratio). The surviving tokens get the gradient
-A * sg(min(rho, c)) * grad log pi, i.e. truncated importance sampling instead of PPO's dual clip.
As in verl, the thresholds reuse the PPO clip fields: `actor.clip_ratio_high` bounds the move up
(A > 0), `actor.clip_ratio_low` the move down (A <= 0), and `actor.clip_ratio_c` is the TIS cap c
(verl's comment advises a large one, since truncation biases the gradient).

DRO (verl's `dro`): REINFORCE with a quadratic penalty on the log ratio to the old policy,
-(A * log pi - beta/2 * (log pi - log pi_old)^2); beta is `actor.dro_beta` (required, as in verl).

The signature is the one in `policy_losses.py`; `is_weights` multiply each token's loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tidal.algorithms.aggregation import Denominator, aggregate_loss
from tidal.algorithms.masked import masked_mean
from tidal.algorithms.policy_losses import LOG_RATIO_BOUND, metrics_of, weighted

if TYPE_CHECKING:
    from tidal.config.schema import ActorConfig


def _binary_tv_trusted(log_probs: torch.Tensor, old_log_probs: torch.Tensor, config: ActorConfig):
    """(trusted if A > 0, trusted if A <= 0): the probability moved at most the threshold that way."""
    moved = torch.exp(log_probs) - torch.exp(old_log_probs)
    return moved <= config.clip_ratio_high, moved >= -config.clip_ratio_low


def _binary_kl_trusted(log_probs: torch.Tensor, old_log_probs: torch.Tensor, config: ActorConfig):
    """Binary KL between Bernoulli(p_old) and Bernoulli(p) ("this token or another one"); a token is
    outside the region only if the KL exceeds the threshold AND it moved in the advantage's direction."""
    prob, old_prob = torch.exp(log_probs), torch.exp(old_log_probs)
    # 1e-8 keeps log finite when a probability is exactly 1 (verl's constant).
    binary_kl = old_prob * (old_log_probs - log_probs) + (1 - old_prob) * torch.log(
        (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8)
    )
    up = (binary_kl <= config.clip_ratio_high) | (prob <= old_prob)
    down = (binary_kl <= config.clip_ratio_low) | (prob >= old_prob)
    return up, down


def _dppo(
    trusted_fn,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: ActorConfig,
    denominator: Denominator,
    is_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    log_ratio = torch.clamp(log_probs - old_log_probs, min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    truncated = torch.clamp(ratio, max=config.clip_ratio_c).detach()
    with torch.no_grad():
        up, down = trusted_fn(log_probs, old_log_probs, config)
        trusted = torch.where(advantages > 0, up, down).to(log_probs.dtype)
    pg_losses = -advantages * truncated * log_probs * trusted
    loss = aggregate_loss(weighted(pg_losses, is_weights), response_mask, config.loss_agg_mode, denominator)
    with torch.no_grad():
        metrics = metrics_of(
            pg_clipfrac=masked_mean(1.0 - trusted, response_mask),
            # verl's meaning for DPPO: the share of trusted tokens whose ratio was truncated at c
            pg_clipfrac_lower=masked_mean(
                (ratio > config.clip_ratio_c).to(trusted.dtype) * trusted, response_mask
            ),
            ppo_kl=masked_mean(-log_ratio, response_mask),
        )
    return loss, metrics


def dppo_tv(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPPO-Binary-TV: masked where A > 0 and pi - pi_old > clip_ratio_high, or A <= 0 and
    pi_old - pi > clip_ratio_low; else -A * sg(min(rho, clip_ratio_c)) * log pi."""
    return _dppo(
        _binary_tv_trusted,
        log_probs,
        old_log_probs,
        advantages,
        response_mask,
        config,
        denominator,
        is_weights,
    )


def dppo_kl(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPPO-Binary-KL: masked where the binary KL exceeds clip_ratio_high (A > 0, pi went up) or
    clip_ratio_low (A <= 0, pi went down); else -A * sg(min(rho, clip_ratio_c)) * log pi."""
    return _dppo(
        _binary_kl_trusted,
        log_probs,
        old_log_probs,
        advantages,
        response_mask,
        config,
        denominator,
        is_weights,
    )


def dro(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """-(A * log pi - dro_beta/2 * (log pi - log pi_old)^2); no clip, no log-ratio clamp (verl's)."""
    beta = config.dro_beta
    if beta is None or beta <= 0:
        raise ValueError(
            f"actor.dro_beta={beta} must be > 0 with actor.policy_loss=dro (verl has no default)"
        )
    log_ratio = log_probs - old_log_probs
    pg_losses = -(log_probs * advantages - 0.5 * beta * log_ratio.square())
    loss = aggregate_loss(weighted(pg_losses, is_weights), response_mask, config.loss_agg_mode, denominator)
    with torch.no_grad():
        metrics = metrics_of(ppo_kl=masked_mean(-log_ratio, response_mask))
    return loss, metrics
