"""Policy losses with TRL 1.16's definitions and names (`GRPOTrainer._compute_loss`, `RLOOTrainer`).

- `vespo` (arXiv 2602.10693): REINFORCE weighted by a smooth gamma-shaped function of the SEQUENCE
  importance weight w = prod_t rho_t: phi(w) = exp(lam) * w^k * exp(-lam * w), so phi(1) = 1 and
  both very unlikely and very likely sequences are damped; k, lam depend on the sign of A.
- `luspo` (arXiv 2602.05261): GSPO's clipped sequence ratio, with each sequence's loss SUMMED over
  its tokens (so scaled by its length) and averaged over sequences.
- `rloo` (TRL's RLOOTrainer loss): PPO clip on the ratio of SUMMED sequence log-probs,
  exp(log pi(y) - log pi_old(y)), one loss per sequence, averaged over sequences.

The signature is the one in `policy_losses.py`. Where TRL's code and Tidal's conventions differ,
the difference only shows outside ordinary ranges and is stated where it happens: log ratios are
clamped to +-20 (TRL's are not, except VESPO's) and fully padded rows never count as sequences.
`kl_importance_ratio` is the factor of TRL's `use_bias_correction_kl` (see `objective.py`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from tidal.algorithms.aggregation import Denominator, aggregate_loss
from tidal.algorithms.masked import masked_mean
from tidal.algorithms.policy_losses import LOG_RATIO_BOUND, cap_ratio, metrics_of, weighted
from tidal.registry import POLICY_LOSSES

if TYPE_CHECKING:
    from tidal.config.schema import ActorConfig

VESPO_LOG_W_MIN = math.log(1e-8)  # TRL's lower clamp of log w (the VESPO authors' value)


def _sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean log ratio over each row's valid tokens [N, 1] (0 for an empty row), gradient to every token."""
    mask = mask.to(log_ratio.dtype)
    mean = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
    return torch.clamp(mean, min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)


def kl_importance_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor, policy_loss: str
) -> torch.Tensor:
    """TRL's `coef_1`: pi / pi_old per token, or per sequence (exp of the mean log ratio) for
    losses whose ratio is per sequence in TRL (importance_sampling_level="sequence"; POLICY_LOSSES
    metadata `sequence_ratio`: gspo, luspo), whose TRL bias-corrected KL multiplies every token's KL
    by that ratio. NOT detached, as in TRL: on-policy its value is 1 but its gradient is not, which
    is what turns the k3 gradient into the unbiased reverse-KL gradient."""
    log_ratio = log_probs - old_log_probs
    if POLICY_LOSSES.meta(policy_loss).sequence_ratio:
        return torch.exp(_sequence_log_ratio(log_ratio, mask)).expand_as(log_probs)
    return torch.exp(torch.clamp(log_ratio, min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND))


def vespo_weights(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: ActorConfig,
    is_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """phi(w) [N, R] (constant), w = exp(sum of the row's clamped log ratios (+ log is_weights)).

    As TRL: token log ratios are clamped to [-20, 20] before summing, log w to [log 1e-8, 20],
    lam to >= 1e-4; (k, lam) are the _pos pair where A >= 0; a non-finite phi becomes 0. Off-policy
    `is_weights` join w in log space (TRL's vLLM correction for VESPO) instead of scaling the loss;
    TRL sums their logs over every position, here over the valid ones (padding's weight is 1 there).
    """
    with torch.no_grad():
        mask = mask.to(log_ratio.dtype)
        log_w = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(-1, keepdim=True)
        if is_weights is not None:
            log_is = torch.clamp(torch.log(is_weights), VESPO_LOG_W_MIN, 20.0)
            log_w = log_w + (log_is * mask).sum(-1, keepdim=True)
        log_w = torch.clamp(log_w, VESPO_LOG_W_MIN, 20.0)
        nonneg = advantages >= 0
        k = torch.where(nonneg, config.vespo_k_pos, config.vespo_k_neg).to(log_ratio.dtype)
        lam = torch.where(nonneg, config.vespo_lambda_pos, config.vespo_lambda_neg).to(log_ratio.dtype)
        lam = lam.clamp(min=1e-4)
        log_phi = lam + k * log_w - lam * torch.exp(log_w)
        return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def vespo(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """-phi(w) * A * log pi, phi a constant (so the gradient is phi * A * grad log pi); aggregated by
    actor.loss_agg_mode (TRL aggregates VESPO like `dapo`: token-mean, Tidal's default)."""
    log_ratio = log_probs - old_log_probs
    phi = vespo_weights(log_ratio.detach(), advantages, response_mask, config, is_weights)
    pg_losses = -phi * advantages * log_probs
    loss = aggregate_loss(pg_losses, response_mask, config.loss_agg_mode, denominator)
    with torch.no_grad():
        metrics = metrics_of(
            ppo_kl=masked_mean(-log_ratio, response_mask),
            **{"vespo/phi_mean": masked_mean(phi, response_mask)},
        )
    return loss, metrics


def luspo(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """s = exp(mean_t log rho_t) per sequence (gradient through the mean, as TRL's sequence-level
    coef_1); token loss -min(min(s, delta) * A, clip(s, 1-low, 1+high) * A); always seq-mean-token-sum."""
    log_ratio = log_probs - old_log_probs
    seq_ratio = torch.exp(_sequence_log_ratio(log_ratio, response_mask))
    clipped = torch.clamp(seq_ratio, 1 - config.clip_ratio_low, 1 + config.clip_ratio_high)
    losses_unclipped = -cap_ratio(seq_ratio, config) * advantages
    losses_clipped = -clipped * advantages
    pg_losses = torch.maximum(losses_unclipped, losses_clipped)
    loss = aggregate_loss(weighted(pg_losses, is_weights), response_mask, "seq-mean-token-sum", denominator)
    with torch.no_grad():
        metrics = metrics_of(
            pg_clipfrac=masked_mean(
                torch.gt(losses_clipped, losses_unclipped).to(log_ratio.dtype), response_mask
            ),
            pg_clipfrac_lower=0.0,
            ppo_kl=masked_mean(-log_ratio, response_mask),
        )
    return loss, metrics


def rloo(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TRL RLOO: r = exp(sum_t log pi - sum_t log pi_old) (clamped to e^+-20), loss_i =
    -min(r * A_i, clip(r, 1-low, 1+high) * A_i), mean over sequences.

    A_i is the row's mean advantage over its valid tokens (sequence-level advantages assumed, as
    TRL's are). `is_weights` enter as their geometric mean over the row (as `geo_mean`), which is the
    sequence weight itself for sequence-level TIS.
    """
    mask = response_mask.to(log_probs.dtype)
    lengths = mask.sum(-1)
    log_ratio = log_probs - old_log_probs
    seq_log_ratio = torch.clamp((log_ratio * mask).sum(-1), min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
    ratio = torch.exp(seq_log_ratio)
    seq_advantage = (advantages * mask).sum(-1) / lengths.clamp(min=1.0)
    losses_unclipped = -ratio * seq_advantage
    losses_clipped = (
        -torch.clamp(ratio, 1 - config.clip_ratio_low, 1 + config.clip_ratio_high) * seq_advantage
    )
    seq_losses = torch.maximum(losses_unclipped, losses_clipped)
    if is_weights is not None:
        log_w = torch.log(is_weights.detach() + 1e-10) * mask
        seq_losses = seq_losses * torch.exp(log_w.sum(-1) / lengths.clamp(min=1.0))
    seq_mask = (lengths > 0).to(seq_losses.dtype).unsqueeze(-1)
    loss = aggregate_loss(seq_losses.unsqueeze(-1), seq_mask, "seq-mean-token-sum", denominator)
    with torch.no_grad():
        clipped = torch.gt(losses_clipped, losses_unclipped).to(mask.dtype)
        rows = seq_mask.squeeze(-1)
        metrics = metrics_of(
            pg_clipfrac=masked_mean(clipped, rows),
            pg_clipfrac_lower=masked_mean(clipped * (seq_advantage < 0).to(mask.dtype), rows),
            ppo_kl=masked_mean(-log_ratio, response_mask),
        )
    return loss, metrics
