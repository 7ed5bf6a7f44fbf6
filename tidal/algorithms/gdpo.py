"""GDPO (arXiv 2601.05242): normalise each reward component within its prompt group, then combine.

GRPO sums the reward components first and normalises the sum, so a component with a large spread
decides every sign and a small-spread one (say a format bonus) is drowned. GDPO instead applies the
GRPO normalisation to each component k separately, combines with the weights w_k, and whitens the
combination over the batch's valid tokens:

    A_k = (r_k - mean_group r_k) / (std_group r_k + 1e-6)     (no std division: norm_adv_by_std_in_grpo=false)
    A   = whiten(sum_k w_k A_k broadcast over the valid tokens)

Matches verl's `compute_gdpo_outcome_advantage`. The components come as a `reward_components`
[N, K] column that the reward stage keeps when gdpo is selected (the columns of
`algorithm.reward_combination`, whose weights are the w_k). Without that column the one component
is the sequence reward (verl's fallback), which is whitened GRPO.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import torch

from tidal.algorithms.advantages import check_shapes, group_rows
from tidal.algorithms.group_advantages import _group_stats
from tidal.algorithms.masked import masked_whiten

if TYPE_CHECKING:
    from tidal.config.schema import AlgorithmConfig

# verl's GDPO keeps GRPO's default epsilon whatever the GRPO setting, so it is not a config key here.
GDPO_EPSILON = 1e-6


def gdpo_weights(config: AlgorithmConfig | None, num_components: int) -> list[float]:
    """w_k: the weighted_sum combination's weights, all 1 when none are given."""
    combination = getattr(config, "reward_combination", None) if config is not None else None
    weights = getattr(combination, "weights", None)
    if weights is None:
        return [1.0] * num_components
    if len(weights) != num_components:
        raise ValueError(
            f"gdpo got {num_components} reward components but algorithm.reward_combination.weights has "
            f"{len(weights)} entries; give one weight per component"
        )
    return list(weights)


@torch.no_grad()
def gdpo(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None,
    values: torch.Tensor | None = None,
    config: AlgorithmConfig | None = None,
    reward_components: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group reward-decoupled normalisation (module docstring); advantages == returns."""
    mask = check_shapes(token_rewards, response_mask)
    if reward_components is None:
        components = token_rewards.sum(dim=-1, keepdim=True)
    else:
        components = reward_components.to(token_rewards.dtype)
        if components.dim() == 1:
            components = components.unsqueeze(-1)
        if components.dim() != 2 or components.shape[0] != token_rewards.shape[0]:
            raise ValueError(
                f"gdpo needs reward_components [N, K] for N={token_rewards.shape[0]} samples; "
                f"got {tuple(reward_components.shape)}"
            )
    groups = group_rows(group_ids, token_rewards.shape[0], "gdpo")
    by_std = config.norm_adv_by_std_in_grpo if config is not None else True
    combined = torch.zeros_like(components[:, 0])
    for k, weight in enumerate(gdpo_weights(config, components.shape[1])):
        scores = components[:, k]
        mean, std, _ = _group_stats(scores, groups)  # a group of one: mean 0, std 1, as in verl
        normalised = (scores - mean) / (std + GDPO_EPSILON) if by_std else scores - mean
        combined = combined + weight * normalised
    advantages = masked_whiten(combined.unsqueeze(-1) * mask, mask) * mask
    return advantages, advantages
