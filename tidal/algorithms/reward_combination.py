"""Turn several reward signals into one scalar per sample.

Combiners (`REWARD_COMBINERS`) reduce K components per sample (several rule checks, or an ensemble
of reward models) to one reward:

    fn(components [N, K], **params) -> (reward [N], metrics)

The preference-as-reward transform compares the policy's reward with reference responses' (the
policy's greedy response, or the data's); it needs the sequence reward and the program's reference
rewards, so it is a reward shaper
(`REWARD_SHAPERS["par"]`, signature in `shaping.py`). Nothing here carries a gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

RewardCombinerFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


def _check_components(components: torch.Tensor) -> None:
    if components.dim() != 2 or components.shape[1] < 1:
        raise ValueError(
            f"reward components {tuple(components.shape)} must be [N, K] with K >= 1 "
            "(one column per reward signal)"
        )


def _spread_metrics(components: torch.Tensor, reward: torch.Tensor) -> dict[str, float]:
    if not len(reward):
        return {"reward_combination/mean": 0.0, "reward_combination/component_std": 0.0}
    return {
        "reward_combination/mean": float(reward.mean()),
        "reward_combination/component_std": float(components.std(dim=1, unbiased=False).mean()),
    }


@torch.no_grad()
def weighted_sum(
    components: torch.Tensor, *, weights: Sequence[float] | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """sum_k w_k * r_k (e.g. correctness + 0.1 * format); `weights=None` means all 1."""
    _check_components(components)
    num_components = components.shape[1]
    if weights is None:
        weights = [1.0] * num_components
    if len(weights) != num_components:
        raise ValueError(
            f"reward combination weights has {len(weights)} entries for {num_components} components; "
            "give one weight per component"
        )
    w = torch.as_tensor(list(weights), dtype=components.dtype, device=components.device)
    reward = components @ w
    return reward, _spread_metrics(components, reward)


@torch.no_grad()
def worst_case(components: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """min_k r_k: worst-case optimisation over a reward-model ensemble (Coste et al. 2023, arXiv
    2310.02743). The policy only gains where every member agrees, which blunts hacking of one."""
    _check_components(components)
    reward = components.min(dim=1).values
    return reward, _spread_metrics(components, reward)


@torch.no_grad()
def uncertainty_weighted(
    components: torch.Tensor, *, uncertainty_coef: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """mean_k r_k - lambda * std_k r_k (population std, so K = 1 is just the reward).

    Uncertainty-weighted optimisation (Coste et al. 2023, arXiv 2310.02743): disagreement between
    ensemble members marks rewards the policy may be exploiting. The paper penalises the variance;
    the std keeps lambda in reward units, as the issue asks.
    """
    _check_components(components)
    if uncertainty_coef < 0:
        raise ValueError(f"uncertainty_coef={uncertainty_coef} must be >= 0 (a penalty on disagreement)")
    reward = components.mean(dim=1) - uncertainty_coef * components.std(dim=1, unbiased=False)
    return reward, _spread_metrics(components, reward)


@torch.no_grad()
def preference_as_reward(
    seq_reward: torch.Tensor,
    response_mask: torch.Tensor | None = None,
    *,
    group_ids: Sequence[Hashable] | None = None,
    reward_baselines: torch.Tensor,
    baseline: str = "greedy",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PAR (Fu et al. 2025, "Reward Shaping to Mitigate Reward Hacking in RLHF", arXiv 2502.18770).

    reward = mean_m sigmoid(r - r_ref_m), where `reward_baselines` r_ref [N] or [N, M] are the
    rewards of M reference responses to the same prompt, scored by the program. The paper samples
    them from the SFT (reference) model. `baseline` says which the program scored (the config's
    `baseline`): "greedy", the current policy's greedy response (the one ReMax uses), which equals
    the paper's only at the start of training; or "data", the dataset's reference responses (e.g.
    the SFT model's, as in the paper), as many per prompt as the row gives: prompts with fewer than
    M are padded with NaN, which the mean skips. A NaN is an error with the greedy baseline.
    Bounded in (0, 1) and steepest near the reference, so pushing a reward model far past the
    reference earns almost nothing: the incentive to hack it vanishes.
    """
    ref_rewards = reward_baselines.to(seq_reward.dtype)
    if ref_rewards.dim() == 1:
        ref_rewards = ref_rewards.unsqueeze(-1)
    if seq_reward.dim() != 1 or ref_rewards.dim() != 2 or len(ref_rewards) != len(seq_reward):
        raise ValueError(
            f"par needs seq_reward [N] and reward_baselines [N] or [N, M]; got {tuple(seq_reward.shape)} "
            f"and {tuple(ref_rewards.shape)}"
        )
    present = ~ref_rewards.isnan()
    if baseline != "data" and not bool(present.all()):
        raise ValueError(
            f"par baseline={baseline!r} got NaN reward_baselines: a greedy response went unscored"
        )
    if len(ref_rewards) and not bool(present.any(dim=-1).all()):
        raise ValueError("par got a sample whose reward_baselines are all NaN: its prompt has no reference")
    shaped = torch.sigmoid(seq_reward.unsqueeze(-1) - ref_rewards).nanmean(dim=-1)
    metrics = {
        "shaping/par_mean": float(shaped.mean()) if len(shaped) else 0.0,
        "shaping/par_ref_reward_mean": float(ref_rewards.nanmean()) if len(shaped) else 0.0,
    }
    return shaped, metrics
