"""Policy-gradient losses: per-token objective + aggregation, selected by `actor.policy_loss`.

Every loss has one signature so the actor can pick it by name:

    fn(log_probs, old_log_probs, advantages, response_mask, *, config, denominator=None, is_weights=None)
        -> (loss: scalar tensor, metrics: dict[str, float])

`log_probs` [N, R] carry the gradient (current policy); `old_log_probs` are the behaviour/proximal
policy's; `config` is an `ActorConfig` (clip_ratio_low/high, clip_ratio_c, loss_agg_mode and the
per-loss parameters such as sapo_tau_pos; every parameter is a config field, none is hard-coded);
`denominator` is the global count for `aggregate_loss` (a `GlobalCounts` is safest: SAPO and GMPO
always aggregate per sequence, as verl does, and the config refuses another `loss_agg_mode` for them);
`is_weights` [N, R] are optional off-policy importance weights (see `off_policy.py`), treated as
constants and multiplied into the per-token loss. Definitions follow verl's `core_algos`.
Metrics are python floats: pg_clipfrac, pg_clipfrac_lower, ppo_kl (mean of old - new log-prob).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from tidal.algorithms.aggregation import Denominator, aggregate_loss
from tidal.algorithms.masked import masked_mean

if TYPE_CHECKING:
    from tidal.config.schema import ActorConfig

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]

LOG_RATIO_BOUND = 20.0  # exp(20) ~ 5e8: keeps a wild ratio finite instead of inf


def metrics_of(**values: torch.Tensor | float) -> dict[str, float]:
    return {
        key: float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        for key, value in values.items()
    }


def weighted(pg_losses: torch.Tensor, is_weights: torch.Tensor | None) -> torch.Tensor:
    return pg_losses if is_weights is None else pg_losses * is_weights.detach()


def cap_ratio(ratio: torch.Tensor, config: ActorConfig) -> torch.Tensor:
    """TRL's `delta` (INTELLECT-2 two-sided clipping): the unclipped ratio is capped at delta."""
    return ratio if config.delta is None else torch.clamp(ratio, max=config.delta)


def vanilla(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al. 2017) with asymmetric clip and dual clip.

    ratio = exp(clamp(log_probs - old_log_probs, -20, 20)); loss = max(-A * ratio,
    -A * clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)); for A < 0 the loss is further capped
    at -A * clip_ratio_c (dual clip, Ye et al. 2019), so one hugely unlikely token cannot dominate.
    With `config.delta` (TRL's INTELLECT-2 cap) the unclipped term uses min(ratio, delta).
    """
    if config.clip_ratio_c <= 1.0:
        raise ValueError(f"actor.clip_ratio_c={config.clip_ratio_c} must be > 1 (the dual-clip lower bound)")
    log_ratio = torch.clamp(log_probs - old_log_probs, min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    losses_unclipped = -advantages * cap_ratio(ratio, config)
    losses_clipped = -advantages * torch.clamp(ratio, 1 - config.clip_ratio_low, 1 + config.clip_ratio_high)
    clip_losses = torch.maximum(losses_unclipped, losses_clipped)
    losses_dual = -advantages * config.clip_ratio_c
    dual_clip_losses = torch.minimum(losses_dual, clip_losses)
    pg_losses = torch.where(advantages < 0, dual_clip_losses, clip_losses)
    loss = aggregate_loss(weighted(pg_losses, is_weights), response_mask, config.loss_agg_mode, denominator)
    with torch.no_grad():
        metrics = metrics_of(
            pg_clipfrac=masked_mean(torch.gt(losses_clipped, losses_unclipped).float(), response_mask),
            pg_clipfrac_lower=masked_mean(
                (torch.gt(clip_losses, losses_dual) & (advantages < 0)).float(), response_mask
            ),
            ppo_kl=masked_mean(-log_ratio, response_mask),
        )
    return loss, metrics


def gspo(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO (Zheng et al. 2025, arXiv 2507.18071): clip a SEQUENCE-level ratio.

    s_i = exp(mean over the sequence of log ratio); each token uses sg[s_i] * pi / sg[pi] so the
    value is s_i and the gradient flows through every token's log-prob. Aggregated by
    actor.loss_agg_mode, as in verl (the paper's own aggregation is seq-mean-token-mean: set it).
    GSPO's clip ranges are tiny (e.g. 3e-4 / 4e-4): set them in config. With `config.delta` (TRL's
    cap, which TRL applies to its sequence-level ratio too) the unclipped term uses min(s_i, delta).
    `is_weights` weight each token's gradient, so pair it with sequence-level TIS weights.
    """
    log_ratio = log_probs - old_log_probs
    lengths = response_mask.sum(dim=-1).clamp(min=1)
    seq_log_ratio = (log_ratio * response_mask).sum(dim=-1) / lengths
    token_log_ratio = log_probs - log_probs.detach() + seq_log_ratio.detach().unsqueeze(-1)
    seq_ratio = torch.exp(torch.clamp(token_log_ratio, max=10.0))
    losses_unclipped = -advantages * cap_ratio(seq_ratio, config)
    losses_clipped = -advantages * torch.clamp(
        seq_ratio, 1 - config.clip_ratio_low, 1 + config.clip_ratio_high
    )
    pg_losses = torch.maximum(losses_unclipped, losses_clipped)
    loss = aggregate_loss(weighted(pg_losses, is_weights), response_mask, config.loss_agg_mode, denominator)
    with torch.no_grad():
        metrics = metrics_of(
            pg_clipfrac=masked_mean(torch.gt(losses_clipped, losses_unclipped).float(), response_mask),
            pg_clipfrac_lower=0.0,
            ppo_kl=masked_mean(-log_ratio, response_mask),
        )
    return loss, metrics


def sapo(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SAPO (arXiv 2511.20347): a smooth sigmoid gate on the ratio instead of a hard clip.

    loss = -A * sigmoid(tau * (ratio - 1)) * 4 / tau, tau = config.sapo_tau_pos for A > 0 else
    config.sapo_tau_neg (verl's defaults 1.0 / 1.05). The gate's slope at ratio 1 is 1, so
    on-policy it matches the plain policy gradient. Always aggregated with seq-mean-token-mean.
    """
    log_ratio = torch.clamp(log_probs - old_log_probs, min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    tau = torch.where(
        advantages > 0,
        torch.as_tensor(config.sapo_tau_pos, dtype=advantages.dtype, device=advantages.device),
        torch.as_tensor(config.sapo_tau_neg, dtype=advantages.dtype, device=advantages.device),
    )
    gates = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    pg_losses = -gates * advantages
    loss = aggregate_loss(weighted(pg_losses, is_weights), response_mask, "seq-mean-token-mean", denominator)
    with torch.no_grad():
        metrics = metrics_of(
            pg_clipfrac=0.0, pg_clipfrac_lower=0.0, ppo_kl=masked_mean(-log_ratio, response_mask)
        )
    return loss, metrics


def cispo(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO (MiniMax-M1, arXiv 2506.13585): REINFORCE weighted by a clipped, stop-gradient ratio.

    loss = -sg(clip(ratio, 1 - low, 1 + high)) * A * log_probs: unlike PPO, clipped tokens still
    contribute a gradient (through log_probs); only their weight is bounded.
    """
    log_ratio = torch.clamp(log_probs - old_log_probs, min=-LOG_RATIO_BOUND, max=LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1 - config.clip_ratio_low, 1 + config.clip_ratio_high)
    pg_losses = -clipped_ratio.detach() * advantages * log_probs
    loss = aggregate_loss(weighted(pg_losses, is_weights), response_mask, config.loss_agg_mode, denominator)
    with torch.no_grad():
        metrics = metrics_of(
            pg_clipfrac=masked_mean((ratio != clipped_ratio).float(), response_mask),
            pg_clipfrac_lower=0.0,
            ppo_kl=masked_mean(-log_ratio, response_mask),
        )
    return loss, metrics


def geo_mean(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GMPO (Zhao et al. 2025, arXiv 2507.20673): geometric mean of token ratios per sequence.

    Token log-ratios are clipped to [-low, high] in the direction that matters for the sign of A,
    averaged over the sequence and exponentiated; loss_i = -mean_t(A) * ratio_i, averaged over
    non-empty sequences (verl averages over all rows; fully padded rows only differ in the count).
    Sequence-level advantages are assumed, as in verl.
    """
    log_ratio = log_probs - old_log_probs
    sign = torch.sign(advantages)
    log_ratio_clamped = torch.clamp(log_ratio, -config.clip_ratio_low, config.clip_ratio_high)
    log_ratio_min = sign * torch.minimum(sign * log_ratio, sign * log_ratio_clamped)
    lengths = response_mask.sum(dim=-1)
    seq_ratio = torch.exp((log_ratio_min * response_mask).sum(dim=-1) / (lengths + 1e-8))
    seq_advantage = (advantages * response_mask).sum(dim=-1) / (lengths + 1e-8)
    seq_losses = -seq_advantage * seq_ratio
    if is_weights is not None:
        log_w = torch.log(is_weights.detach() + 1e-10) * response_mask
        seq_losses = seq_losses * torch.exp(log_w.sum(dim=-1) / (lengths + 1e-8))
    seq_mask = (lengths > 0).to(seq_losses.dtype).unsqueeze(-1)
    loss = aggregate_loss(seq_losses.unsqueeze(-1), seq_mask, "seq-mean-token-sum", denominator)
    with torch.no_grad():
        clipped = torch.ne(log_ratio, log_ratio_clamped)
        metrics = metrics_of(
            pg_clipfrac=masked_mean((clipped & (advantages > 0)).float(), response_mask),
            pg_clipfrac_lower=masked_mean((clipped & (advantages < 0)).float(), response_mask),
            ppo_kl=masked_mean(-log_ratio, response_mask),
        )
    return loss, metrics


def gpg(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GPG (arXiv 2504.02546): plain policy gradient -A * log_probs, no ratio, no clip.

    Pair it with the "gpg" advantage estimator. `old_log_probs` only feed the ppo_kl metric.
    """
    pg_losses = -log_probs * advantages
    loss = aggregate_loss(weighted(pg_losses, is_weights), response_mask, config.loss_agg_mode, denominator)
    with torch.no_grad():
        metrics = metrics_of(ppo_kl=masked_mean(old_log_probs - log_probs, response_mask))
    return loss, metrics


def reinforce(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    config: ActorConfig,
    denominator: Denominator = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE: -A * log_probs (times truncated IS weights when off-policy), no clipping.

    verl uses it in "bypass mode" where `old_log_probs` are the rollout policy's and the IS weights
    pi_current / pi_rollout correct the mismatch; here the weights come from `is_weights`.
    """
    pg_losses = -advantages * log_probs
    loss = aggregate_loss(weighted(pg_losses, is_weights), response_mask, config.loss_agg_mode, denominator)
    with torch.no_grad():
        metrics = metrics_of(ppo_kl=masked_mean(old_log_probs - log_probs, response_mask))
    return loss, metrics
