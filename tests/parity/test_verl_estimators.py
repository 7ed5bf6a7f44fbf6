"""GDPO and the optimal token baselines against the installed verl 0.9.1 on random inputs.

Float64, tolerance 1e-6, over ragged masks with interior holes, an all-masked row, groups of one
and groups whose longest sample is (or is not) unique, with and without rollout IS weights. verl's
multi-component GDPO path casts the components to float32, so that case compares float32 inputs
(1e-6) and our float64 result with verl's float32 one (1e-5); its single-component path runs in the
inputs' dtype and is held to 1e-6 in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tidal.algorithms import ADVANTAGE_ESTIMATORS
from tidal.config.algorithm import AlgorithmConfig

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="scripts/setup.sh installs verl")

TOL = {"rtol": 1e-6, "atol": 1e-6}
# group sizes: a group of one, pairs, larger groups; labels interleaved so groups are not contiguous
SIZES = (1, 2, 3, 4, 1, 5)


def batch(seed: int, cols: int = 11, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = [f"p{k}" for k, n in enumerate(SIZES) for _ in range(n)]
    order = torch.randperm(len(labels), generator=g).tolist()
    uids = [labels[i] for i in order]
    rows = len(uids)
    mask = (torch.rand(rows, cols, generator=g) > 0.25).to(dtype)  # interior holes
    lengths = torch.randint(1, cols + 1, (rows,), generator=g)
    mask *= (torch.arange(cols) < lengths.unsqueeze(1)).to(dtype)  # ragged ends
    mask[0] = 0.0  # an all-masked row
    mask[1, 0] = 1.0
    if seed % 2:  # some groups with tied longest samples: no zero tail there
        mask[2:4] = mask[2]
    p = torch.rand(rows, cols, generator=g, dtype=torch.float64).clamp(min=1e-3)
    spp = p.square() + (1 - p.square()) * torch.rand(rows, cols, generator=g, dtype=torch.float64) * 0.5
    rewards = torch.randn(rows, cols, generator=g, dtype=torch.float64) * (
        torch.rand(rows, cols, generator=g) < 0.3
    )
    is_weights = 0.5 + torch.rand(rows, cols, generator=g, dtype=torch.float64)
    cast = {"dtype": dtype}
    return uids, mask, rewards.to(**cast), p.log().to(**cast), spp.to(**cast), is_weights.to(**cast)


@pytest.mark.parametrize("name", ["optimal_token_baseline", "tir_optimal_token_baseline"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_is", [False, True])
def test_optimal_token_baselines_match_verl(name, seed, with_is):
    uids, mask, rewards, old_lp, spp, is_w = batch(seed)
    verl_fn = core_algos.get_adv_estimator_fn(name)
    theirs = verl_fn(
        token_level_rewards=rewards,
        response_mask=mask,
        index=np.array(uids, dtype=object),
        old_log_probs=old_lp,
        sum_pi_squared=spp,
        rollout_is_weights=is_w if with_is else None,
    )
    ours = ADVANTAGE_ESTIMATORS.get(name)(
        rewards,
        mask,
        group_ids=uids,
        config=AlgorithmConfig(advantage_estimator=name),
        old_log_probs=old_lp,
        sum_pi_squared=spp,
        rollout_is_weights=is_w if with_is else None,
    )
    torch.testing.assert_close(ours[0], theirs[0], **TOL)
    # returns: Tidal's are zero on masked tokens, verl's carry through interior holes
    torch.testing.assert_close(ours[1], theirs[1] * mask, **TOL)
    assert ours[0].abs().sum() > 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("by_std", [True, False])
def test_gdpo_single_component_matches_verl(seed, by_std):
    uids, mask, rewards, *_ = batch(seed)
    theirs = core_algos.compute_gdpo_outcome_advantage(
        rewards, mask, np.array(uids, dtype=object), norm_adv_by_std_in_grpo=by_std
    )
    ours = ADVANTAGE_ESTIMATORS.get("gdpo")(
        rewards,
        mask,
        group_ids=uids,
        config=AlgorithmConfig(norm_adv_by_std_in_grpo=by_std),
    )
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("seed", range(4))
def test_gdpo_components_match_verl(seed):
    """verl reads the components from non_tensor_batch keys (as float32) and puts each at the last
    valid token; Tidal reads the reward_components column. Weights from the combination."""
    from verl.trainer.config import AlgoConfig

    uids, mask, rewards, *_ = batch(seed, dtype=torch.float32)
    g = torch.Generator().manual_seed(100 + seed)
    comps = (torch.randint(0, 3, (len(uids), 3), generator=g) / 2.0).float()  # 0, 0.5, 1: exact in float32
    comps[:, 2] = torch.randn(len(uids), generator=g)
    weights = [1.0, 0.5, 2.0]
    prompt_len = 3
    # verl places component k at response index (attention count - 1); the sum over tokens is the same
    response_attention = torch.arange(mask.shape[1]) < mask.sum(-1, keepdim=True)
    attention = torch.cat([torch.ones(len(uids), prompt_len), response_attention], dim=1).long()
    non_tensor = {f"c{k}": comps[:, k].numpy() for k in range(3)}
    verl_cfg = AlgoConfig(
        adv_estimator="gdpo", gdpo_reward_keys=["c0", "c1", "c2"], gdpo_reward_weights=weights
    )
    theirs, _ = core_algos.compute_gdpo_outcome_advantage(
        rewards,
        mask,
        np.array(uids, dtype=object),
        config=verl_cfg,
        non_tensor_batch=non_tensor,
        batch={"prompts": torch.zeros(len(uids), prompt_len), "attention_mask": attention},
    )
    cfg = AlgorithmConfig(
        advantage_estimator="gdpo",
        reward_combination={"type": "weighted_sum", "components": ["a", "b", "c"], "weights": weights},
    )
    ours, _ = ADVANTAGE_ESTIMATORS.get("gdpo")(
        rewards, mask, group_ids=uids, config=cfg, reward_components=comps
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    ours64, _ = ADVANTAGE_ESTIMATORS.get("gdpo")(
        rewards.double(), mask.double(), group_ids=uids, config=cfg, reward_components=comps.double()
    )
    torch.testing.assert_close(ours64.float(), theirs, rtol=1e-5, atol=1e-5)
