"""Group-relative (critic-free) advantage estimators: samples of one prompt are each other's baseline.

Each sample's score is the sum of its token rewards; the advantage is a scalar per sample,
broadcast over its valid tokens (advantages and returns are the same tensor, as in verl). Groups
are given by `group_ids` labels of any hashable type, of any sizes, in any order. A group of one
sample has no peers: following verl it gets mean 0 and std 1, so its advantage is its raw score
(scaled by 1 / (1 + eps)), not 0.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

import torch

from tidal.algorithms.advantages import check_shapes, group_rows
from tidal.algorithms.masked import masked_whiten

if TYPE_CHECKING:
    from tidal.config.schema import AlgorithmConfig

TRL_RLOO_NORM_EPS = 1e-4  # TRL RLOO's constant in normalize_advantages (part of that definition)


def _group_stats(scores: torch.Tensor, groups: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Per-row group mean, unbiased group std and group size (singletons: mean 0, std 1)."""
    mean = torch.zeros_like(scores)
    std = torch.ones_like(scores)
    size = torch.ones_like(scores)
    for rows in groups:
        if len(rows) < 2:
            continue
        index = torch.tensor(rows, device=scores.device)
        members = scores[index]
        mean[index] = members.mean()
        std[index] = members.std()
        size[index] = float(len(rows))
    return mean, std, size


def _broadcast(per_sample: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    advantages = per_sample.unsqueeze(-1) * mask
    return advantages, advantages


@torch.no_grad()
def grpo(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None,
    values: torch.Tensor | None = None,
    config: AlgorithmConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al. 2024): (score - group mean) / (group std + epsilon).

    epsilon is `config.norm_adv_epsilon`: verl's 1e-6 by default, TRL's 1e-4 on request.

    `config.norm_adv_by_std_in_grpo=False` skips the std division (Dr. GRPO).
    """
    mask = check_shapes(token_rewards, response_mask)
    scores = token_rewards.sum(dim=-1)
    mean, std, _ = _group_stats(scores, group_rows(group_ids, len(scores), "grpo"))
    centered = scores - mean
    normalised = centered / (std + config.norm_adv_epsilon)
    return _broadcast(normalised if config.norm_adv_by_std_in_grpo else centered, mask)


@torch.no_grad()
def grpo_batch_std(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None,
    values: torch.Tensor | None = None,
    config: AlgorithmConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO centred by the group mean but scaled by the std of ALL scores in the batch.

    TRL's `scale_rewards="batch"` (after "Tricks or Traps", Liu et al. 2025): a group whose samples
    all score alike is not blown up by a tiny group std. TRL adds 1e-4 to the std; we keep verl's
    1e-6 like `grpo`. A batch of one sample uses std 1.
    """
    mask = check_shapes(token_rewards, response_mask)
    scores = token_rewards.sum(dim=-1)
    mean, _, _ = _group_stats(scores, group_rows(group_ids, len(scores), "grpo_batch_std"))
    centered = scores - mean
    if not config.norm_adv_by_std_in_grpo:
        return _broadcast(centered, mask)
    batch_std = scores.std() if len(scores) > 1 else torch.ones((), dtype=scores.dtype, device=scores.device)
    return _broadcast(centered / (batch_std + config.norm_adv_epsilon), mask)


@torch.no_grad()
def rloo(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None,
    values: torch.Tensor | None = None,
    config: AlgorithmConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (Ahmadian et al. 2024): score minus the mean of the OTHER samples of its prompt.

    Written as n/(n-1) * (score - group mean), which is the same quantity (verl's form). A sample
    alone in its group keeps its raw score.

    `config.rloo_normalize_advantages` (TRL's RLOO `normalize_advantages`) then standardises them
    over the whole batch: (A - mean) / (std + 1e-4), std with Bessel's correction, TRL's epsilon. As
    in TRL, where a sample without a baseline (alone in its group) gets advantage 0 and is left out
    of the batch statistics; fewer than two samples with a baseline give all zeros (TRL's NaN -> 0).
    """
    mask = check_shapes(token_rewards, response_mask)
    scores = token_rewards.sum(dim=-1)
    mean, _, size = _group_stats(scores, group_rows(group_ids, len(scores), "rloo"))
    loo = scores * size / (size - 1) - mean * size / (size - 1)
    if config is not None and config.rloo_normalize_advantages:
        has_baseline = size > 1
        normalised = torch.zeros_like(scores)
        if int(has_baseline.sum()) >= 2:
            kept = loo[has_baseline]
            normalised[has_baseline] = (kept - kept.mean()) / (kept.std() + TRL_RLOO_NORM_EPS)
        return _broadcast(normalised, mask)
    return _broadcast(torch.where(size > 1, loo, scores), mask)


@torch.no_grad()
def reinforce_plus_plus_baseline(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None,
    values: torch.Tensor | None = None,
    config: AlgorithmConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline: score minus group mean, broadcast over tokens, whitened over the batch."""
    mask = check_shapes(token_rewards, response_mask)
    scores = token_rewards.sum(dim=-1)
    mean, _, _ = _group_stats(scores, group_rows(group_ids, len(scores), "reinforce_plus_plus_baseline"))
    tiled = (scores - mean).unsqueeze(-1).expand_as(token_rewards) * mask
    advantages = masked_whiten(tiled, mask) * mask
    return advantages, advantages


@torch.no_grad()
def grpo_passk(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None,
    values: torch.Tensor | None = None,
    config: AlgorithmConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass@k training (Chen et al. 2025, arXiv 2503.19595): only each group's best sample learns.

    Its advantage is best score - second best (divided by group std + 1e-6 unless
    `norm_adv_by_std_in_grpo=False`); every other sample gets 0. Groups need >= 2 samples.
    """
    mask = check_shapes(token_rewards, response_mask)
    scores = token_rewards.sum(dim=-1)
    per_sample = torch.zeros_like(scores)
    for rows in group_rows(group_ids, len(scores), "grpo_passk"):
        if len(rows) < 2:
            raise ValueError(
                f"grpo_passk needs >= 2 samples per prompt but a group has {len(rows)}; "
                "set rollout.sampling.n >= 2"
            )
        members = scores[torch.tensor(rows, device=scores.device)]
        top, top_index = torch.topk(members, 2)
        advantage = top[0] - top[1]
        if config.norm_adv_by_std_in_grpo:
            advantage = advantage / (members.std() + config.norm_adv_epsilon)
        per_sample[rows[int(top_index[0])]] = advantage
    return _broadcast(per_sample, mask)


@torch.no_grad()
def opo(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None,
    values: torch.Tensor | None = None,
    config: AlgorithmConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OPO (Hao et al. 2025, arXiv 2505.23585): baseline = length-weighted mean score of the group.

    Singletons get baseline 0.
    """
    mask = check_shapes(token_rewards, response_mask)
    scores = token_rewards.sum(dim=-1)
    lengths = mask.sum(dim=-1)
    baseline = torch.zeros_like(scores)
    for rows in group_rows(group_ids, len(scores), "opo"):
        if len(rows) < 2:
            continue
        index = torch.tensor(rows, device=scores.device)
        baseline[index] = (lengths[index] * scores[index]).sum() / lengths[index].sum().clamp(min=1)
    return _broadcast(scores - baseline, mask)


@torch.no_grad()
def gpg(
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    group_ids: Sequence[Hashable] | None,
    values: torch.Tensor | None = None,
    config: AlgorithmConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPG (Chu et al. 2025): alpha * (score - group mean), alpha = N / #samples with nonzero score.

    alpha rescales the batch gradient so groups whose samples all score 0 (zero advantage) do not
    dilute it. No std division; verl's constant divisor f_norm is `config.gpg_f_norm` (default 1).
    """
    mask = check_shapes(token_rewards, response_mask)
    scores = token_rewards.sum(dim=-1)
    mean, _, _ = _group_stats(scores, group_rows(group_ids, len(scores), "gpg"))
    alpha = len(scores) / torch.count_nonzero(scores).clamp(min=1)
    f_norm = config.gpg_f_norm if config is not None else 1.0
    return _broadcast(alpha * (scores - mean) / f_norm, mask)
