"""Reward shaping: rewrite each sample's scalar reward before advantages are computed.

Every shaper has one signature so the program can apply a configured list of them in order:

    fn(seq_reward [N], response_mask [N, R], *, group_ids, **params) -> (seq_reward [N], metrics)

`seq_reward` is the sequence-level reward (the sum of `token_rewards`); the program adds the change
to the last valid token's reward (`add_at_last_token`). Lengths are `response_mask.sum(-1)`,
the number of generated tokens. `group_ids` labels the prompt of each sample (shapers that do not
compare samples ignore it). Shapers carry no gradient; metrics are python floats.

This file holds the length-based shapers; the preference-as-reward transform ("par") is registered
here too but lives with the other reward arithmetic in `reward_combination.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from tidal.algorithms.advantages import group_rows

RewardShaperFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


def response_lengths(seq_reward: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Generated tokens per sample [N] (float), after checking the two shapes agree."""
    if seq_reward.dim() != 1 or response_mask.dim() != 2 or len(seq_reward) != len(response_mask):
        raise ValueError(
            f"seq_reward {tuple(seq_reward.shape)} must be [N] and response_mask "
            f"{tuple(response_mask.shape)} must be [N, R] with the same N"
        )
    return response_mask.to(seq_reward.dtype).sum(dim=-1)


def add_at_last_token(
    token_rewards: torch.Tensor, delta: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """token_rewards [N, R] with delta [N] added on each row's last valid token (the scorer puts a
    sequence reward there), so shaping changes the sequence sum by exactly delta and keeps any
    token-level rewards. A row without valid tokens has nowhere to take it and is unchanged."""
    valid = response_mask > 0
    last = response_mask.shape[-1] - 1 - valid.flip(dims=[-1]).to(torch.int64).argmax(dim=-1)
    rows = torch.nonzero(valid.any(dim=-1)).squeeze(-1)
    out = token_rewards.clone()
    out[rows, last[rows]] += delta[rows].to(out.dtype)
    return out


@torch.no_grad()
def overlong_penalty(
    seq_reward: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None = None,
    max_response_length: int,
    buffer_length: int,
    penalty_factor: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv 2503.14476, eq. 13).

    With L = length, L_max = `max_response_length` (the generation limit) and L_cache =
    `buffer_length`, the reward gains
        0                                  if L <= L_max - L_cache
        (L_max - L_cache - L) / L_cache    if L_max - L_cache < L <= L_max   (linear, 0 -> -1)
        -1                                 if L > L_max
    times `penalty_factor`. A truncated answer is not necessarily wrong, so instead of a hard -1 at
    the limit the penalty ramps up inside the window, which tells the policy how far it is from it.
    """
    if max_response_length < 1:
        raise ValueError(f"max_response_length={max_response_length} must be >= 1 (the generation limit)")
    if not 0 < buffer_length <= max_response_length:
        raise ValueError(
            f"overlong buffer_length={buffer_length} must be in [1, max_response_length="
            f"{max_response_length}]: it is the soft window before the limit"
        )
    if penalty_factor < 0:
        raise ValueError(f"overlong penalty_factor={penalty_factor} must be >= 0")
    lengths = response_lengths(seq_reward, response_mask)
    window_start = max_response_length - buffer_length
    penalty = ((window_start - lengths) / buffer_length).clamp(min=-1.0, max=0.0) * penalty_factor
    in_window = lengths > window_start
    metrics = {
        "shaping/overlong_penalty_mean": float(penalty.mean()) if len(penalty) else 0.0,
        "shaping/overlong_fraction": float(in_window.float().mean()) if len(penalty) else 0.0,
    }
    return seq_reward + penalty, metrics


@torch.no_grad()
def group_length_penalty(
    seq_reward: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None,
    coef: float = 1.0,
    accuracy_threshold: float = 0.5,
    correct_threshold: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO-lambda (Dai et al. 2025, arXiv 2505.18086): length reward only where the group is accurate.

    A sample is correct when seq_reward >= `correct_threshold`. In a group whose fraction of
    correct samples EXCEEDS `accuracy_threshold`, each correct sample gains the Kimi k1.5 length
    reward (arXiv 2501.12599)
        coef * (0.5 - (L - L_min) / (L_max - L_min))      (L_min, L_max over the whole group)
    i.e. +coef/2 for the group's shortest, -coef/2 for its longest, 0 when all lengths are equal.
    Incorrect samples and groups at or below the threshold keep their 0/1 reward: penalising length
    while the model still mostly fails is what collapses accuracy, which the switch prevents.
    """
    if not 0 <= accuracy_threshold <= 1:
        raise ValueError(f"length_penalty accuracy_threshold={accuracy_threshold} must be in [0, 1]")
    lengths = response_lengths(seq_reward, response_mask)
    correct = seq_reward >= correct_threshold
    bonus = torch.zeros_like(seq_reward)
    groups = group_rows(group_ids, len(seq_reward), "length_penalty")
    num_active = 0
    for rows in groups:
        index = torch.tensor(rows, device=seq_reward.device)
        if correct[index].float().mean() <= accuracy_threshold:
            continue
        num_active += 1
        group_lengths = lengths[index]
        spread = group_lengths.max() - group_lengths.min()
        if spread <= 0:
            continue
        relative = 0.5 - (group_lengths - group_lengths.min()) / spread
        bonus[index] = coef * relative * correct[index].to(bonus.dtype)
    metrics = {
        "shaping/length_penalty_active_groups": num_active / max(len(groups), 1),
        "shaping/length_penalty_mean": float(bonus.mean()) if len(bonus) else 0.0,
    }
    return seq_reward + bonus, metrics
