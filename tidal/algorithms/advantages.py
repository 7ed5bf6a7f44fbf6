"""Advantage estimators: token rewards (+ values or prompt groups) -> (advantages, returns).

Every estimator has the same signature so the program can pick one by name:

    fn(token_rewards [N, R], response_mask [N, R], *, group_ids, values, config) -> (advantages, returns)

`group_ids` labels the prompt each sample answers (any hashable labels, any group sizes, any order;
None for estimators that do not compare samples); `values` are critic values (GAE only); `config`
supplies gamma, lam and norm_adv_by_std_in_grpo (an `AlgorithmConfig`). Outputs are [N, R], zero
on masked tokens, and carry no gradient. The numbers follow verl's `core_algos` definitions
(outcome estimators sum the token rewards into one score per sample).

This file holds the registry and the estimators that work token by token (GAE, REINFORCE++,
ReMax); the group-relative ones (GRPO, RLOO, ...) live in `group_advantages.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from tidal.algorithms.masked import masked_whiten

if TYPE_CHECKING:
    from tidal.config.schema import AlgorithmConfig

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def check_shapes(token_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Validate [N, R] inputs; return the mask in the rewards' dtype."""
    if token_rewards.dim() != 2 or token_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_rewards {tuple(token_rewards.shape)} and response_mask {tuple(response_mask.shape)} "
            "must both be [N, R]"
        )
    return response_mask.to(token_rewards.dtype)


def group_rows(
    group_ids: Sequence[Hashable] | torch.Tensor | None, num_rows: int, name: str
) -> list[list[int]]:
    """Row indices of each group, groups in order of first appearance."""
    if group_ids is None:
        raise ValueError(
            f"advantage estimator {name!r} compares samples of one prompt: pass group_ids (uids)"
        )
    if isinstance(group_ids, torch.Tensor):
        group_ids = group_ids.tolist()
    if len(group_ids) != num_rows:
        raise ValueError(f"group_ids has {len(group_ids)} labels for {num_rows} samples; give one per sample")
    rows: dict[Hashable, list[int]] = {}
    for i, label in enumerate(group_ids):
        rows.setdefault(label, []).append(i)
    return list(rows.values())


@torch.no_grad()
def gae(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None = None,
    values: torch.Tensor | None = None,
    config: AlgorithmConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2015) with gamma and lam.

    Masked positions are skipped: the TD recursion carries the next valid value and the running
    GAE across them (multi-turn observation tokens), and trailing padding contributes nothing.
    returns = raw GAE + values; advantages = GAE whitened over the valid tokens.
    """
    mask = check_shapes(token_rewards, response_mask)
    if values is None:
        raise ValueError(
            "advantage estimator 'gae' needs critic values: pass values [N, R] (enable the critic)"
        )
    gamma, lam = config.gamma, config.lam
    num_steps = token_rewards.shape[-1]
    next_value = torch.zeros_like(token_rewards[:, 0])
    last_gae = torch.zeros_like(token_rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(num_steps)):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        candidate = delta + gamma * lam * last_gae
        next_value = values[:, t] * m + (1 - m) * next_value
        last_gae = candidate * m + (1 - m) * last_gae
        reversed_adv.append(last_gae)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = (advantages + values) * mask
    return masked_whiten(advantages, mask) * mask, returns


@torch.no_grad()
def reinforce_plus_plus(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None = None,
    values: torch.Tensor | None = None,
    config: AlgorithmConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): discounted return-to-go, whitened over the whole batch's valid tokens.

    A masked position (a tool observation inside a multi-turn response, or padding) is skipped: the
    running return passes it unchanged, so an outcome reward on the last token still credits the
    earlier turns, and gamma discounts per valid token only (verl's definition since its
    multi-turn fix). Masked positions get return 0.
    """
    mask = check_shapes(token_rewards, response_mask)
    returns = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[-1])):
        valid = mask[:, t]
        candidate = token_rewards[:, t] + config.gamma * running
        returns[:, t] = candidate * valid
        running = torch.where(valid > 0, candidate, running)
    advantages = masked_whiten(returns, mask) * mask
    return advantages, returns


def remax(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None = None,
    values: torch.Tensor | None = None,
    config: Any = None,
    reward_baselines: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ReMax (Li et al. 2023): undiscounted return-to-go minus the reward of the greedy response.

    `reward_baselines` [N] is the sequence reward of a greedy (temperature 0) response to the same
    prompt, which the program must generate and score; it is the one extra input of this estimator.
    """
    mask = check_shapes(token_rewards, response_mask)
    if reward_baselines is None:
        raise ValueError(
            "advantage estimator 'remax' needs reward_baselines [N]: the reward of a greedy response "
            "to each sample's prompt"
        )
    with torch.no_grad():
        returns = (token_rewards * mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
        advantages = (returns - reward_baselines.to(returns.dtype).unsqueeze(-1)) * mask
    return advantages, returns * mask
