"""Optimal token baseline (OTB): a per-token baseline from the other samples of the same prompt.

A group baseline (GRPO, RLOO) is one number per prompt. OTB gives every token t its own baseline,
the return-to-go of the group's samples at t weighted by how much gradient variance each sample's
path has accumulated so far:

    w_j = 1 - 2 p_j + sum_v p(v)^2        (|grad log p|^2 of the logits at token j, up to scale;
                                          p_j = exp(old_log_prob_j), sum_v p(v)^2 = `sum_pi_squared`)
    W_t = sum_{j <= t, valid} w_j         (times rho_j^2 with rollout importance weights)
    G_t = sum_{l >= t, valid} r_l         (undiscounted return-to-go)
    B_t = sum_group G_t W_t / (sum_group W_t + 1e-8),   A_t = G_t - B_t

- `optimal_token_baseline` aligns the samples by position t in the response tensor;
- `tir_optimal_token_baseline` (tool-integrated reasoning) aligns them by the index of the valid
  token, so the k-th generated token of one sample meets the k-th of another even when tool
  observations (masked spans) sit at different positions; samples without valid tokens leave
  their group.

Both follow verl's `compute_optimal_token_baseline_advantage` and
`compute_multi_turn_optimal_token_baseline_advantage`: a group of one gets baseline 0 (advantage =
return), and when one sample is strictly the longest of its group its baseline is 0 past the
second-longest length (nothing to compare with there). As in verl, that cut is at the position
equal to the second-longest valid-token count, which for the position-aligned variant is a
position, not a token index, when masks have holes. One deliberate difference: returns are zero on
masked tokens, as every Tidal estimator's are (verl's carry the return through interior holes).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import torch

from tidal.algorithms.advantages import check_shapes, group_rows

if TYPE_CHECKING:
    from tidal.config.schema import AlgorithmConfig

OTB_EPSILON = 1e-8  # verl's default; keeps a group with no variance weight at baseline 0


def _returns_and_weights(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    old_log_probs: torch.Tensor | None,
    sum_pi_squared: torch.Tensor | None,
    rollout_is_weights: torch.Tensor | None,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, W): return-to-go and cumulative path-variance weight, both [N, R]."""
    if old_log_probs is None or sum_pi_squared is None:
        raise ValueError(
            f"advantage estimator {name!r} needs old_log_probs and sum_pi_squared [N, R] from the "
            "trainer's log-prob pass (actor.compute_log_probs adds sum_pi_squared when this estimator is set)"
        )
    returns = (token_rewards * mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])
    dtype = token_rewards.dtype
    w = 1 - 2 * old_log_probs.to(dtype).exp() + sum_pi_squared.to(dtype)
    if rollout_is_weights is not None:
        w = w * rollout_is_weights.to(dtype).square()
    # where, not a product: log-probs of padding may be anything, and 0 * inf would be NaN
    w = torch.where(mask > 0, w, torch.zeros((), dtype=dtype, device=w.device))
    return returns, w.cumsum(dim=-1)


def _group_index(groups: list[list[int]], num_rows: int, device: torch.device) -> torch.Tensor:
    index = torch.empty(num_rows, dtype=torch.long, device=device)
    for g, rows in enumerate(groups):
        index[rows] = g
    return index


def _baselines(
    returns: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor, group: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """B [N, L] (0 for singleton groups and past the sole longest sample's rival), aligned columns.

    `group` [N] numbers the groups (-1: the row takes no part), `valid` [N, L] marks entries that
    count; entries of one column are compared across the rows of a group.
    """
    keep = group >= 0
    g = group.clamp(min=0)
    width = returns.shape[1]
    zeros = returns.new_zeros(num_groups, width)
    wv = weights * valid
    numerator = zeros.index_add(0, g[keep], (returns * wv)[keep])
    denominator = zeros.index_add(0, g[keep], wv[keep]) + OTB_EPSILON
    size = torch.zeros(num_groups, dtype=torch.long, device=group.device).index_add(
        0, g[keep], torch.ones_like(g[keep])
    )
    baselines = (numerator / denominator)[g] * (keep & (size[g] > 1)).unsqueeze(-1)
    # The sole longest sample of a group has no peer past the second-longest length: baseline 0.
    lengths = valid.sum(dim=-1).long()
    longest = torch.full((num_groups,), -1, dtype=torch.long, device=group.device)
    longest = longest.scatter_reduce(0, g[keep], lengths[keep], reduce="amax")
    at_longest = keep & (lengths == longest[g])
    count = torch.zeros_like(longest).index_add(0, g[at_longest], torch.ones_like(g[at_longest]))
    shorter = torch.where(keep & ~at_longest, lengths, -1)
    rival = torch.full_like(longest, -1).scatter_reduce(0, g[keep], shorter[keep], reduce="amax")
    sole = at_longest & (count[g] == 1) & (size[g] > 1)
    cut = torch.arange(width, device=group.device) >= rival[g].unsqueeze(-1)
    return torch.where(sole.unsqueeze(-1) & cut, 0.0, baselines)


@torch.no_grad()
def optimal_token_baseline(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None,
    values: torch.Tensor | None = None,
    config: AlgorithmConfig | None = None,
    old_log_probs: torch.Tensor | None = None,
    sum_pi_squared: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OTB with samples aligned by response position (module docstring); returns = G on valid tokens."""
    mask = check_shapes(token_rewards, response_mask)
    returns, weights = _returns_and_weights(
        token_rewards, mask, old_log_probs, sum_pi_squared, rollout_is_weights, "optimal_token_baseline"
    )
    groups = group_rows(group_ids, len(mask), "optimal_token_baseline")
    group = _group_index(groups, len(mask), mask.device)
    baselines = _baselines(returns, weights, mask, group, len(groups))
    return (returns - baselines) * mask, returns * mask


@torch.no_grad()
def tir_optimal_token_baseline(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None,
    values: torch.Tensor | None = None,
    config: AlgorithmConfig | None = None,
    old_log_probs: torch.Tensor | None = None,
    sum_pi_squared: torch.Tensor | None = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OTB with samples aligned by valid-token index (multi-turn / tool use); returns = G on valid tokens."""
    mask = check_shapes(token_rewards, response_mask)
    name = "tir_optimal_token_baseline"
    returns, weights = _returns_and_weights(
        token_rewards, mask, old_log_probs, sum_pi_squared, rollout_is_weights, name
    )
    groups = group_rows(group_ids, len(mask), name)
    valid = mask > 0
    lengths = valid.sum(dim=-1)
    # Left-align each row's valid tokens: column k holds its k-th valid token.
    width = int(lengths.max()) if len(lengths) else 0
    rows, cols = valid.nonzero(as_tuple=True)
    slot = (valid.long().cumsum(dim=-1) - 1)[rows, cols]
    packed_returns = returns.new_zeros(len(mask), width).index_put((rows, slot), returns[rows, cols])
    packed_weights = returns.new_zeros(len(mask), width).index_put((rows, slot), weights[rows, cols])
    packed_valid = (torch.arange(width, device=mask.device) < lengths.unsqueeze(-1)).to(returns.dtype)
    # Rows without a valid token leave their group (verl): they count neither as peers nor as rivals.
    group = torch.where(lengths > 0, _group_index(groups, len(mask), mask.device), -1)
    baselines = _baselines(packed_returns, packed_weights, packed_valid, group, len(groups))
    advantages = torch.zeros_like(returns)
    advantages[rows, cols] = (packed_returns - baselines)[rows, slot]
    return advantages, returns * mask
