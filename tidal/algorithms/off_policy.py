"""Off-policy corrections between the rollout (behaviour) policy and the trainer's old policy.

The rollout engine samples with one numerical implementation (and, in streaming mode, possibly
older weights); the trainer recomputes `old_log_probs` with its own. The ratio
w = pi_old / pi_rollout = exp(old_log_probs - rollout_log_probs) re-weights the policy gradient to
the trainer's policy. Raw ratios have unbounded variance, so either
- truncate them (TIS, Yao et al. 2025 "Your efficient RL framework secretly brings you off-policy
  RL training"): w = min(w, threshold), as verl's `compute_rollout_correction_weights`; or
- mask them (MIS): samples whose ratio leaves [lower, upper] are dropped from the loss mask and the
  rest keep their raw ratio.
At "token" level each token has its own ratio; at "sequence" level every token of a sequence shares
the product of its ratios (unbiased, high variance); "geometric" (masking only) uses the per-token
geometric mean, a length-independent sequence statistic. Weights are constants (detached): they
change the measure, not the objective. Pass them as `is_weights=` to a policy loss.

Decoupled PPO (Hilton et al. 2021, arXiv 2110.00641; AReaL) needs no loss of its own: with the
trainer's recomputed log-probs as the PROXIMAL policy in `old_log_probs` (the clip centre) and
w = pi_prox / pi_behaviour as `is_weights`, the vanilla loss IS the decoupled objective
    -w * min(rho * A, clip(rho, 1 - eps, 1 + eps) * A),   rho = pi / pi_prox.
`decoupled_is_weights` gives those untruncated weights (optionally dropping tokens above a cap).

`OFF_POLICY_CORRECTIONS` holds the three by name, with one signature for the program:

    fn(old_log_probs, rollout_log_probs, mask, **params) -> (weights [N, R], mask [N, R], metrics)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tidal.algorithms.masked import masked_mean, masked_sum

CorrectionFn = Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, float]]]

LOG_BOUND = 20.0  # exp(+-20) keeps a ratio finite; same safety bound as verl
IS_LEVELS = ("token", "sequence")
MASK_LEVELS = ("token", "sequence", "geometric")


def _log_ratio(
    old_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, mask: torch.Tensor, level: str
) -> torch.Tensor:
    """Per-token log IS ratio at `level`, broadcast to [N, R] and clamped to +-20."""
    if old_log_probs.shape != rollout_log_probs.shape or old_log_probs.shape != mask.shape:
        raise ValueError(
            f"old_log_probs {tuple(old_log_probs.shape)}, rollout_log_probs {tuple(rollout_log_probs.shape)} "
            f"and mask {tuple(mask.shape)} must have the same [N, R] shape"
        )
    log_ratio = (old_log_probs - rollout_log_probs).detach()
    if level == "sequence":
        log_ratio = masked_sum(log_ratio, mask, dim=-1).unsqueeze(-1).expand_as(log_ratio)
    elif level == "geometric":
        log_ratio = masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1).expand_as(log_ratio)
    return torch.clamp(log_ratio, min=-LOG_BOUND, max=LOG_BOUND)


def mismatch_kl(trainer_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, mask: torch.Tensor) -> float:
    """KL(rollout || trainer) per valid token, k3 estimator on the rollout's samples: the
    train/inference mismatch (numerics, and in streaming mode the data's staleness)."""
    log_ratio = _log_ratio(trainer_log_probs, rollout_log_probs, mask, "token")
    k3 = (torch.expm1(log_ratio) - log_ratio) * mask
    return float(k3.sum() / mask.sum().clamp(min=1))


def _effective_sample_size(weights: torch.Tensor, mask: torch.Tensor) -> float:
    """(sum w)^2 / (n * sum w^2) in (0, 1]: 1 when all weights are equal."""
    total, squares, count = masked_sum(weights, mask), masked_sum(weights**2, mask), mask.sum()
    return float(total**2 / (count * squares)) if float(squares) > 0 else 0.0


def truncated_is_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    threshold: float = 2.0,
    batch_normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """TIS weights [N, R] = min(pi_old / pi_rollout, threshold) at `level`, zero on padding.

    `batch_normalize` rescales the weights to mean 1 over this batch (tokens at token level,
    non-empty sequences at sequence level); compute on the whole batch (driver) for global
    normalisation. Metrics: is_mean, is_max (before truncation), is_fraction_truncated,
    is_eff_sample_size, and is_batch_norm_factor when normalising.
    """
    if level not in IS_LEVELS:
        raise ValueError(f"importance-sampling level {level!r} is not one of {IS_LEVELS}")
    if threshold <= 0:
        raise ValueError(f"importance-sampling threshold={threshold} must be positive (e.g. 2.0)")
    mask = mask.to(old_log_probs.dtype)
    raw = torch.exp(_log_ratio(old_log_probs, rollout_log_probs, mask, level)) * mask
    weights = raw.clamp(max=threshold)
    metrics = {
        "is_mean": float(masked_mean(weights, mask)),
        "is_max": float(raw.max()) if raw.numel() else 0.0,
        "is_fraction_truncated": float(masked_mean((raw > threshold).to(raw.dtype), mask)),
        "is_eff_sample_size": _effective_sample_size(weights, mask),
    }
    if batch_normalize:
        if level == "token":
            mean = masked_mean(weights, mask)
        else:
            seq_mask = (mask.sum(dim=-1) > 0).to(weights.dtype)
            mean = masked_mean(masked_mean(weights, mask, dim=-1), seq_mask)
        factor = float(mean) if float(mean) > 1e-8 else 1.0
        weights = weights / factor
        metrics["is_batch_norm_factor"] = factor
    return weights, metrics


def masked_is(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    lower: float = 0.5,
    upper: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """MIS: (weights [N, R], new_mask [N, R], metrics); ratios outside [lower, upper] are rejected.

    At sequence/geometric level a rejected sequence loses all its tokens. Kept tokens carry their
    raw ratio as weight. Use `new_mask` (in the input mask's dtype) as the loss mask and to count the
    global denominator.
    Metrics: is_mean (kept tokens), is_rejected_token_fraction, is_rejected_seq_fraction.
    """
    if level not in MASK_LEVELS:
        raise ValueError(f"masked importance-sampling level {level!r} is not one of {MASK_LEVELS}")
    if not 0 <= lower < upper:
        raise ValueError(
            f"masked importance sampling needs 0 <= lower < upper, got lower={lower}, upper={upper}"
        )
    mask_dtype = mask.dtype
    mask = mask.to(old_log_probs.dtype)
    ratio = torch.exp(_log_ratio(old_log_probs, rollout_log_probs, mask, level))
    keep = ((ratio >= lower) & (ratio <= upper)).to(mask.dtype)
    new_mask = mask * keep
    valid_seqs = mask.sum(dim=-1) > 0
    rejected_seqs = valid_seqs & ((mask * (1 - keep)).sum(dim=-1) > 0)
    metrics = {
        "is_mean": float(masked_mean(ratio, new_mask)),
        "is_rejected_token_fraction": float(masked_mean(1 - keep, mask)),
        "is_rejected_seq_fraction": float(rejected_seqs.sum() / valid_seqs.sum().clamp(min=1)),
    }
    return ratio * new_mask, new_mask.to(mask_dtype), metrics


def decoupled_is_weights(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    cap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Decoupled PPO's behaviour weights pi_prox / pi_behaviour per token, untruncated.

    With `cap`, tokens whose weight exceeds it are dropped from the mask (AReaL's
    behav_imp_weight_cap) instead of being truncated, so a stale token cannot dominate the update.
    Returns (weights, new_mask in the input mask's dtype, metrics: is_mean, is_max, is_capped_fraction).
    """
    if cap is not None and cap <= 0:
        raise ValueError(f"decoupled PPO cap={cap} must be positive (or None for no cap)")
    mask_dtype = mask.dtype
    mask = mask.to(old_log_probs.dtype)
    ratio = torch.exp(_log_ratio(old_log_probs, rollout_log_probs, mask, "token"))
    capped = (ratio > cap).to(mask.dtype) if cap is not None else torch.zeros_like(mask)
    new_mask = mask * (1 - capped)
    metrics = {
        "is_mean": float(masked_mean(ratio, new_mask)),
        "is_max": float((ratio * mask).max()) if ratio.numel() else 0.0,
        "is_capped_fraction": float(masked_mean(capped, mask)),
    }
    return ratio * new_mask, new_mask.to(mask_dtype), metrics


def tis(
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    mask: torch.Tensor,
    *,
    level: str = "token",
    threshold: float = 2.0,
    batch_normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Truncated IS (`truncated_is_weights`); the mask is unchanged."""
    weights, metrics = truncated_is_weights(
        old_log_probs,
        rollout_log_probs,
        mask,
        level=level,
        threshold=threshold,
        batch_normalize=batch_normalize,
    )
    return weights, mask, metrics
