"""Advantage estimators: hand-computed cases and properties (tidal.algorithms)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.algorithms import ADVANTAGE_ESTIMATORS
from tidal.config.schema import AlgorithmConfig

CFG = AlgorithmConfig()
SETTINGS = settings(max_examples=40, deadline=None)


def outcome_rewards(scores: list[float], lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded batch: the score sits on each response's last valid token."""
    rewards = torch.zeros(len(scores), width)
    mask = torch.zeros(len(scores), width)
    for i, (score, length) in enumerate(zip(scores, lengths)):
        mask[i, :length] = 1
        if length:
            rewards[i, length - 1] = score
    return rewards, mask


@st.composite
def grouped_batches(draw, min_group: int = 1):
    """Random groups of random sizes, labels interleaved in random order, ragged lengths."""
    sizes = draw(st.lists(st.integers(min_group, 5), min_size=1, max_size=5))
    labels = [f"p{g}" for g, size in enumerate(sizes) for _ in range(size)]
    labels = draw(st.permutations(labels))
    width = 6
    scores = draw(
        st.lists(st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.5]), min_size=len(labels), max_size=len(labels))
    )
    lengths = draw(st.lists(st.integers(1, width), min_size=len(labels), max_size=len(labels)))
    rewards, mask = outcome_rewards(scores, lengths, width)
    return rewards, mask, list(labels)


# ------------------------------------------------------------------------------------ registry


def test_a_misspelt_estimator_names_the_close_one():
    with pytest.raises(ValueError, match="did you mean 'grpo'"):
        ADVANTAGE_ESTIMATORS.get("grpoo")


def test_all_estimators_registered():
    expected = {"gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"}
    expected |= {"grpo_passk", "remax", "opo", "gpg", "grpo_batch_std"}
    expected |= {"gdpo", "optimal_token_baseline", "tir_optimal_token_baseline"}
    assert set(ADVANTAGE_ESTIMATORS.names()) == expected


# ---------------------------------------------------------------------------------------- GRPO


def test_grpo_hand_computed_interleaved_groups_and_singleton():
    rewards, mask = outcome_rewards([1.0, 2.0, 0.0, 1.0], [2, 3, 1, 3], width=4)
    adv, ret = ADVANTAGE_ESTIMATORS.get("grpo")(
        rewards, mask, group_ids=["a", "b", "a", "a"], values=None, config=CFG
    )
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 1]
    expected = torch.tensor(
        [(1 - 2 / 3) / (std + 1e-6), 2.0 / (1 + 1e-6), (0 - 2 / 3) / (std + 1e-6), (1 - 2 / 3) / (std + 1e-6)]
    )
    torch.testing.assert_close(adv, expected.unsqueeze(-1) * mask)
    assert torch.equal(adv, ret)
    assert torch.all(adv[mask == 0] == 0)


def test_grpo_without_std_is_centred_only():
    rewards, mask = outcome_rewards([1.0, 0.0, 0.0, 3.0], [1, 2, 3, 4], width=4)
    cfg = AlgorithmConfig(norm_adv_by_std_in_grpo=False)
    adv, _ = ADVANTAGE_ESTIMATORS.get("grpo")(rewards, mask, group_ids=[0, 0, 1, 1], values=None, config=cfg)
    expected = torch.tensor([0.5, -0.5, -1.5, 1.5])
    torch.testing.assert_close(adv, expected.unsqueeze(-1) * mask)


def test_grpo_accepts_numpy_and_tensor_labels():
    rewards, mask = outcome_rewards([1.0, 0.0, 1.0, 1.0], [2, 2, 2, 2], width=2)
    fn = ADVANTAGE_ESTIMATORS.get("grpo")
    by_str, _ = fn(
        rewards, mask, group_ids=np.array(["x", "y", "x", "y"], dtype=object), values=None, config=CFG
    )
    by_int, _ = fn(rewards, mask, group_ids=torch.tensor([7, 3, 7, 3]), values=None, config=CFG)
    assert torch.equal(by_str, by_int)


def test_group_estimators_validate_group_ids():
    rewards, mask = outcome_rewards([1.0, 0.0], [1, 1], width=1)
    with pytest.raises(ValueError, match="group_ids"):
        ADVANTAGE_ESTIMATORS.get("grpo")(rewards, mask, group_ids=None, values=None, config=CFG)
    with pytest.raises(ValueError, match="3 labels for 2 samples"):
        ADVANTAGE_ESTIMATORS.get("rloo")(rewards, mask, group_ids=["a", "a", "b"], values=None, config=CFG)


@SETTINGS
@given(grouped_batches(min_group=2))
def test_grpo_sums_to_zero_within_each_group(batch):
    rewards, mask, labels = batch
    adv, _ = ADVANTAGE_ESTIMATORS.get("grpo")(rewards, mask, group_ids=labels, values=None, config=CFG)
    assert torch.all(adv[mask == 0] == 0)
    per_sample = adv.sum(-1) / mask.sum(-1)
    for label in set(labels):
        rows = [i for i, x in enumerate(labels) if x == label]
        assert abs(float(per_sample[rows].sum())) < 1e-4


@SETTINGS
@given(grouped_batches(), st.randoms(use_true_random=False))
def test_group_estimators_are_permutation_equivariant(batch, rnd):
    rewards, mask, labels = batch
    perm = list(range(len(labels)))
    rnd.shuffle(perm)
    for name in ("grpo", "rloo", "opo", "gpg", "grpo_batch_std"):
        fn = ADVANTAGE_ESTIMATORS.get(name)
        adv, _ = fn(rewards, mask, group_ids=labels, values=None, config=CFG)
        adv_p, _ = fn(rewards[perm], mask[perm], group_ids=[labels[i] for i in perm], values=None, config=CFG)
        torch.testing.assert_close(adv_p, adv[perm], msg=name)


# ---------------------------------------------------------------------------------------- RLOO


def test_rloo_hand_computed():
    rewards, mask = outcome_rewards([1.0, 0.0, 0.0, 5.0], [1, 2, 2, 3], width=3)
    adv, _ = ADVANTAGE_ESTIMATORS.get("rloo")(
        rewards, mask, group_ids=["g", "g", "g", "solo"], values=None, config=CFG
    )
    expected = torch.tensor([1.0 - 0.0, 0.0 - 0.5, 0.0 - 0.5, 5.0])  # a singleton keeps its score (verl)
    torch.testing.assert_close(adv, expected.unsqueeze(-1) * mask)


@SETTINGS
@given(grouped_batches(min_group=2))
def test_rloo_is_score_minus_mean_of_others(batch):
    rewards, mask, labels = batch
    adv, _ = ADVANTAGE_ESTIMATORS.get("rloo")(rewards, mask, group_ids=labels, values=None, config=CFG)
    scores = rewards.sum(-1)
    for i, label in enumerate(labels):
        others = [float(scores[j]) for j, x in enumerate(labels) if x == label and j != i]
        expected = float(scores[i]) - sum(others) / len(others)
        torch.testing.assert_close(adv[i], expected * mask[i], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- GAE


def gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE on one unpadded sequence, in python floats."""
    advantages, running = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        running = rewards[t] + gamma * next_value - values[t] + gamma * lam * running
        advantages[t] = running
    return advantages


def test_gae_returns_hand_computed_and_advantages_whitened():
    cfg = AlgorithmConfig(gamma=0.9, lam=0.8)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, -1.0, 0.0, 0.0]])
    values = torch.tensor([[0.2, 0.4, 0.6, 9.0], [0.1, 0.3, 9.0, 9.0]])  # 9 = garbage on padding
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = ADVANTAGE_ESTIMATORS.get("gae")(rewards, mask, group_ids=None, values=values, config=cfg)
    raw = [
        gae_reference([0, 0, 1], [0.2, 0.4, 0.6], 0.9, 0.8),
        gae_reference([0.5, -1], [0.1, 0.3], 0.9, 0.8),
    ]
    expected_ret = torch.zeros(2, 4)
    expected_ret[0, :3] = torch.tensor(raw[0]) + torch.tensor([0.2, 0.4, 0.6])
    expected_ret[1, :2] = torch.tensor(raw[1]) + torch.tensor([0.1, 0.3])
    torch.testing.assert_close(ret, expected_ret)
    flat = torch.tensor(raw[0] + raw[1])
    whitened = (flat - flat.mean()) / torch.sqrt(flat.var() + 1e-8)
    torch.testing.assert_close(adv[mask == 1], whitened)
    assert torch.all(adv[mask == 0] == 0)


def test_gae_skips_masked_gap_as_if_absent():
    cfg = AlgorithmConfig(gamma=0.7, lam=0.5)
    rewards = torch.tensor([[0.3, 5.0, -0.2, 1.0]])
    values = torch.tensor([[0.1, 7.0, 0.2, 0.4]])
    mask = torch.tensor([[1.0, 0, 1, 1]])  # position 1 is an observation token
    _, ret = ADVANTAGE_ESTIMATORS.get("gae")(rewards, mask, group_ids=None, values=values, config=cfg)
    raw = gae_reference([0.3, -0.2, 1.0], [0.1, 0.2, 0.4], 0.7, 0.5)
    torch.testing.assert_close(ret[0, [0, 2, 3]], torch.tensor(raw) + torch.tensor([0.1, 0.2, 0.4]))
    assert ret[0, 1] == 0


def test_gae_needs_values():
    rewards, mask = outcome_rewards([1.0, 0.0], [1, 1], width=1)
    with pytest.raises(ValueError, match="values"):
        ADVANTAGE_ESTIMATORS.get("gae")(rewards, mask, group_ids=None, values=None, config=CFG)


# --------------------------------------------------------------------------------- REINFORCE++


def test_reinforce_plus_plus_carries_the_return_across_masked_spans():
    cfg = AlgorithmConfig(gamma=0.5)
    rewards = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 4.0, 0.0, 1.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 1]])
    adv, ret = ADVANTAGE_ESTIMATORS.get("reinforce_plus_plus")(
        rewards, mask, group_ids=None, values=None, config=cfg
    )
    # row 1: the masked gap at t=2 is skipped (not a reset, not a discount step):
    # t=3 -> 1, t=1 -> 4 + 0.5 * 1 = 4.5, t=0 -> 0 + 0.5 * 4.5 = 2.25
    expected = torch.tensor([[1.5, 1.0, 2.0, 0.0], [2.25, 4.5, 0.0, 1.0]])
    torch.testing.assert_close(ret, expected)
    valid = expected[mask == 1]
    torch.testing.assert_close(adv[mask == 1], (valid - valid.mean()) / torch.sqrt(valid.var() + 1e-8))
    assert torch.all(adv[mask == 0] == 0)


def test_reinforce_plus_plus_credits_every_turn_of_a_multi_turn_response():
    """Outcome reward on the last token; two tool-observation spans masked inside the response."""
    mask = torch.tensor([[1.0, 1, 0, 0, 1, 1, 0, 1, 0, 0]], dtype=torch.float64)  # trailing padding too
    rewards = torch.zeros_like(mask)
    rewards[0, 7] = 1.0
    _, ret = ADVANTAGE_ESTIMATORS.get("reinforce_plus_plus")(
        rewards, mask, group_ids=None, values=None, config=AlgorithmConfig(gamma=0.9)
    )
    # Valid tokens from the end: t=7 -> 1, t=5 -> 0.9, t=4 -> 0.81, t=1 -> 0.729, t=0 -> 0.6561
    expected = torch.zeros_like(mask)
    for t, value in ((7, 1.0), (5, 0.9), (4, 0.81), (1, 0.729), (0, 0.6561)):
        expected[0, t] = value
    torch.testing.assert_close(ret, expected)


def test_reinforce_plus_plus_all_masked_row_is_zero():
    rewards = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
    mask = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    adv, ret = ADVANTAGE_ESTIMATORS.get("reinforce_plus_plus")(
        rewards, mask, group_ids=None, values=None, config=AlgorithmConfig(gamma=1.0)
    )
    assert torch.all(ret[0] == 0) and torch.all(adv[0] == 0)
    torch.testing.assert_close(ret[1], torch.tensor([3.0, 3.0]))


def test_reinforce_plus_plus_baseline_hand_computed():
    rewards, mask = outcome_rewards([1.0, 0.0, 3.0], [2, 1, 2], width=2)
    adv, _ = ADVANTAGE_ESTIMATORS.get("reinforce_plus_plus_baseline")(
        rewards, mask, group_ids=["a", "a", "b"], values=None, config=CFG
    )
    centred = torch.tensor([[0.5, 0.5], [-0.5, 0.0], [3.0, 3.0]])  # b is alone: mean 0
    valid = centred[mask == 1]
    torch.testing.assert_close(adv[mask == 1], (valid - valid.mean()) / torch.sqrt(valid.var() + 1e-8))
    assert adv[1, 1] == 0


# ------------------------------------------------------------------------------- priority two


def test_grpo_passk_only_best_sample_learns():
    rewards, mask = outcome_rewards([0.0, 1.0, 0.5, 2.0, 2.0], [1, 2, 1, 1, 2], width=2)
    labels = ["a", "a", "a", "b", "b"]
    adv, _ = ADVANTAGE_ESTIMATORS.get("grpo_passk")(rewards, mask, group_ids=labels, values=None, config=CFG)
    std_a = torch.tensor([0.0, 1.0, 0.5]).std()
    per_sample = adv.sum(-1) / mask.sum(-1)
    torch.testing.assert_close(
        per_sample[:3], torch.stack([torch.tensor(0.0), 0.5 / (std_a + 1e-6), torch.tensor(0.0)])
    )
    torch.testing.assert_close(per_sample[3:].sum(), torch.tensor(0.0))  # a tie: best - second = 0
    cfg = AlgorithmConfig(norm_adv_by_std_in_grpo=False)
    adv, _ = ADVANTAGE_ESTIMATORS.get("grpo_passk")(rewards, mask, group_ids=labels, values=None, config=cfg)
    assert float(adv[1, 0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match=">= 2 samples"):
        ADVANTAGE_ESTIMATORS.get("grpo_passk")(
            rewards, mask, group_ids=["a", "a", "a", "b", "c"], values=None, config=CFG
        )


def test_opo_length_weighted_baseline():
    rewards, mask = outcome_rewards([1.0, 0.0, 4.0], [3, 1, 2], width=3)
    adv, _ = ADVANTAGE_ESTIMATORS.get("opo")(
        rewards, mask, group_ids=["a", "a", "b"], values=None, config=CFG
    )
    baseline = (3 * 1.0 + 1 * 0.0) / 4
    expected = torch.tensor([1.0 - baseline, 0.0 - baseline, 4.0])
    torch.testing.assert_close(adv, expected.unsqueeze(-1) * mask)


def test_gpg_scales_by_batch_over_nonzero_scores():
    rewards, mask = outcome_rewards([1.0, 0.0, 0.0, 0.0], [1, 1, 1, 1], width=1)
    adv, _ = ADVANTAGE_ESTIMATORS.get("gpg")(
        rewards, mask, group_ids=["a", "a", "b", "b"], values=None, config=CFG
    )
    torch.testing.assert_close(adv[:, 0], 4.0 * torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_grpo_batch_std_uses_whole_batch_std():
    rewards, mask = outcome_rewards([1.0, 0.0, 3.0, 3.0], [1, 1, 1, 1], width=1)
    adv, _ = ADVANTAGE_ESTIMATORS.get("grpo_batch_std")(
        rewards, mask, group_ids=[0, 0, 1, 1], values=None, config=CFG
    )
    std = torch.tensor([1.0, 0.0, 3.0, 3.0]).std()
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.5, -0.5, 0.0, 0.0]) / (std + 1e-6))


def test_remax_subtracts_greedy_baseline_from_return_to_go():
    rewards = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    adv, ret = ADVANTAGE_ESTIMATORS.get("remax")(
        rewards, mask, group_ids=None, values=None, config=CFG, reward_baselines=torch.tensor([0.25, 3.0])
    )
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.75, 0.75, 0.0], [-1.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="reward_baselines"):
        ADVANTAGE_ESTIMATORS.get("remax")(rewards, mask, group_ids=None, values=None, config=CFG)


def test_group_std_epsilon_and_gpg_f_norm_are_settings():
    rewards, mask = outcome_rewards([1.0, 0.0, 0.0], [1, 1, 1], width=1)
    groups = ["a", "a", "a"]
    std = torch.tensor([1.0, 0.0, 0.0]).std()
    for eps in (1e-6, 1e-4):
        adv, _ = ADVANTAGE_ESTIMATORS.get("grpo")(
            rewards, mask, group_ids=groups, values=None, config=AlgorithmConfig(norm_adv_epsilon=eps)
        )
        torch.testing.assert_close(adv[:, 0], (torch.tensor([1.0, 0.0, 0.0]) - 1 / 3) / (std + eps))
    cfg = AlgorithmConfig(advantage_estimator="gpg", gpg_f_norm=4.0)
    adv, _ = ADVANTAGE_ESTIMATORS.get("gpg")(rewards, mask, group_ids=groups, values=None, config=cfg)
    # alpha = 3 samples / 1 nonzero score = 3
    torch.testing.assert_close(adv[:, 0], 3 * (torch.tensor([1.0, 0.0, 0.0]) - 1 / 3) / 4.0)


def test_estimator_options_for_another_estimator_are_refused():
    with pytest.raises(ValueError, match="algorithm.gpg_f_norm is set but algorithm.advantage_estimator='grpo'"):
        AlgorithmConfig(gpg_f_norm=2.0)
    with pytest.raises(ValueError, match="algorithm.norm_adv_epsilon is set but .*'gpg'"):
        AlgorithmConfig(advantage_estimator="gpg", norm_adv_epsilon=1e-4)
