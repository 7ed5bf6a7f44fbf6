"""Reward shaping and combination, sample filters, dynamic sampling, token selection, and the docs table."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tidal.algorithms as algorithms
from tidal.algorithms import (
    REWARD_COMBINERS,
    REWARD_SHAPERS,
    SAMPLE_FILTERS,
    TOKEN_SELECTORS,
    DynamicSamplingQuota,
    Registry,
    add_at_last_token,
    linear_schedule,
)
from tidal.algorithms.filters import max_variance_subset
from tidal.controller.stages.batch_tasks import attach_baselines, reference_rows
from tidal.dataflow.batch import Batch
from tidal.workers.rewards.scorer import score_batch

SETTINGS = settings(max_examples=40, deadline=None)
DOCS = Path(__file__).resolve().parents[2] / "docs" / "algorithms.md"


def mask_of(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(-1)).float()


def test_registered_names():
    assert set(REWARD_SHAPERS.names()) == {"overlong", "length_penalty", "par"}
    assert set(REWARD_COMBINERS.names()) == {"weighted_sum", "min", "uncertainty_weighted"}
    assert set(SAMPLE_FILTERS.names()) == {"zero_variance", "d3s"}
    assert set(TOKEN_SELECTORS.names()) == {"high_entropy", "d3s"}


# ------------------------------------------------------------------------------------ shaping


def test_overlong_penalty_hand_computed():
    # L_max 10, window 4 -> no penalty up to 6, linear to -1 at 10, -1 beyond.
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])
    mask = mask_of([5, 6, 8, 10, 12], width=12)
    shaped, metrics = REWARD_SHAPERS.get("overlong")(
        rewards, mask, group_ids=None, max_response_length=10, buffer_length=4
    )
    assert shaped.tolist() == pytest.approx([1.0, 1.0, -0.5, 0.0, -1.0])
    assert metrics["shaping/overlong_fraction"] == pytest.approx(3 / 5)
    half, _ = REWARD_SHAPERS.get("overlong")(
        rewards, mask, group_ids=None, max_response_length=10, buffer_length=4, penalty_factor=0.5
    )
    assert half.tolist() == pytest.approx([1.0, 1.0, -0.25, 0.5, -0.5])


@pytest.mark.parametrize("buffer_length", [0, 11])
def test_overlong_rejects_bad_window(buffer_length):
    with pytest.raises(ValueError, match="buffer_length"):
        REWARD_SHAPERS.get("overlong")(
            torch.zeros(1), torch.ones(1, 3), max_response_length=10, buffer_length=buffer_length
        )


def test_length_penalty_only_in_accurate_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    lengths = [2, 4, 6, 8, 2, 4, 6, 8, 2, 8, 4, 6]
    uids = ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    shaped, metrics = REWARD_SHAPERS.get("length_penalty")(
        rewards, mask_of(lengths, 8), group_ids=uids, coef=1.0, accuracy_threshold=0.5
    )
    # a: accuracy 0.75 > 0.5, L_min 2, L_max 8: correct get 0.5 - (L - 2) / 6; the wrong one is unchanged.
    # b: accuracy 0.25, c: accuracy 0.5 (not above the threshold): plain 0/1 rewards.
    expected_a = [1.5, 1 + 1 / 6, 1 - 1 / 6, 0.0]
    assert shaped.tolist() == pytest.approx(expected_a + rewards[4:].tolist())
    assert metrics["shaping/length_penalty_active_groups"] == pytest.approx(1 / 3)


def test_length_penalty_equal_lengths_and_threshold():
    shaped, _ = REWARD_SHAPERS.get("length_penalty")(
        torch.tensor([1.0, 1.0]), mask_of([3, 3], 4), group_ids=[0, 0], accuracy_threshold=0.0
    )
    assert shaped.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="accuracy_threshold"):
        REWARD_SHAPERS.get("length_penalty")(
            torch.ones(1), torch.ones(1, 1), group_ids=[0], accuracy_threshold=2
        )
    with pytest.raises(ValueError, match="group_ids"):
        REWARD_SHAPERS.get("length_penalty")(torch.ones(1), torch.ones(1, 1), group_ids=None)


def test_add_at_last_token_changes_the_sequence_sum_by_delta():
    token_rewards = torch.tensor([[0.0, 0.2, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    mask = mask_of([3, 0, 1], width=4)
    out = add_at_last_token(token_rewards, torch.tensor([-0.5, 7.0, 1.0]), mask)
    torch.testing.assert_close(
        out, torch.tensor([[0.0, 0.2, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [1.5, 0.0, 0.0, 0.0]])
    )
    assert token_rewards[0, 2] == 1.0  # input untouched


def test_par_hand_computed():
    shaped, _ = REWARD_SHAPERS.get("par")(
        torch.tensor([1.0, 0.0]), None, reward_baselines=torch.tensor([0.0, 0.0])
    )
    assert shaped.tolist() == pytest.approx([1 / (1 + math.exp(-1)), 0.5])
    # two references at 0 and 2: mean(sigmoid(1), sigmoid(-1)) = 0.5
    shaped, _ = REWARD_SHAPERS.get("par")(
        torch.tensor([1.0]), None, reward_baselines=torch.tensor([[0.0, 2.0]])
    )
    assert shaped.item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="reward_baselines"):
        REWARD_SHAPERS.get("par")(torch.zeros(2), None, reward_baselines=torch.zeros(3))


def test_par_data_baseline_averages_over_each_prompts_own_references():
    """Ragged references (NaN-padded by attach_baselines) count only where present."""
    par = REWARD_SHAPERS.get("par")
    nan = float("nan")
    refs = torch.tensor([[0.0, 2.0, nan], [1.0, nan, nan], [0.0, 0.0, 0.0]])
    shaped, metrics = par(torch.tensor([1.0, 1.0, 1.0]), None, reward_baselines=refs, baseline="data")
    assert shaped.tolist() == pytest.approx([0.5, 0.5, 1 / (1 + math.exp(-1))])
    assert metrics["shaping/par_ref_reward_mean"] == pytest.approx(3 / 6)  # present references only
    assert not shaped.isnan().any()
    with pytest.raises(ValueError, match="greedy response went unscored"):
        par(torch.ones(3), None, reward_baselines=refs)  # greedy: a NaN is a bug
    with pytest.raises(ValueError, match="all NaN"):
        par(torch.ones(1), None, reward_baselines=torch.tensor([[nan, nan]]), baseline="data")


def test_par_data_baseline_rows_and_attached_rewards_follow_the_prompts():
    prompts = Batch.from_dict(
        {"prompt_ids": torch.zeros((2, 3), dtype=torch.int64)},
        {
            "uid": ["p0", "p1"],
            "prompt_text": ["2+2=", "1+1="],
            "ground_truth": ["4", "2"],
            "reference_responses": [("4", "5"), ("2",)],
        },
    )
    rows = reference_rows(prompts)
    assert list(rows["uid"]) == ["p0", "p0", "p1"] and list(rows["response_text"]) == ["4", "5", "2"]
    assert list(rows["prompt_text"]) == ["2+2=", "2+2=", "1+1="] and list(rows["ground_truth"]) == [
        "4",
        "4",
        "2",
    ]
    scored, _ = score_batch(rows, "arithmetic")  # the scorer's input columns are all there
    scored = rows.union(scored)
    assert scored["seq_reward"].tolist() == [1.0, 0.0, 1.0]
    samples = Batch.from_dict({"x": torch.zeros(3)}, {"uid": ["p1", "p0", "p0"]})
    baselines = attach_baselines(samples, scored)["reward_baselines"]
    assert baselines[:, 0].tolist() == [1.0, 1.0, 1.0] and baselines[0, 1].isnan()
    assert baselines[1:, 1].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="no reference_responses"):
        reference_rows(prompts.select("uid", "prompt_text", "ground_truth"))


# -------------------------------------------------------------------------------- combination


def test_reward_combiners_hand_computed():
    components = torch.tensor([[1.0, 0.5], [0.0, 1.0]])
    total, _ = REWARD_COMBINERS.get("weighted_sum")(components, weights=[1.0, 0.1])
    assert total.tolist() == pytest.approx([1.05, 0.1])
    assert REWARD_COMBINERS.get("weighted_sum")(components)[0].tolist() == pytest.approx([1.5, 1.0])
    assert REWARD_COMBINERS.get("min")(components)[0].tolist() == pytest.approx([0.5, 0.0])
    # mean [0.75, 0.5], population std [0.25, 0.5]
    cautious, _ = REWARD_COMBINERS.get("uncertainty_weighted")(components, uncertainty_coef=2.0)
    assert cautious.tolist() == pytest.approx([0.25, -0.5])


def test_reward_combiners_validate():
    with pytest.raises(ValueError, match="one weight per component"):
        REWARD_COMBINERS.get("weighted_sum")(torch.zeros(2, 3), weights=[1.0])
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        REWARD_COMBINERS.get("min")(torch.zeros(3))
    with pytest.raises(ValueError, match="uncertainty_coef"):
        REWARD_COMBINERS.get("uncertainty_weighted")(torch.zeros(2, 2), uncertainty_coef=-1)


# ---------------------------------------------------------------------------------- filters


def test_zero_variance_filter():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    uids = ["a", "a", "b", "b", "c", "d", "d"]
    keep, metrics = SAMPLE_FILTERS.get("zero_variance")(scores, group_ids=uids)
    # a varies, b is all solved (dropped), c is a singleton (kept), d varies
    assert keep.tolist() == [True, True, False, False, True, True, True]
    assert metrics["filter/kept_group_fraction"] == pytest.approx(3 / 4)


def test_d3s_binary_group_keeps_a_balanced_half():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    keep, metrics = SAMPLE_FILTERS.get("d3s")(scores, group_ids=[0] * 8, keep_ratio=0.5)
    assert int(keep.sum()) == 4
    assert scores[keep].sum().item() == 2  # two solved and two failed: variance 0.25, the maximum
    assert metrics["filter/d3s_group_var_after"] == pytest.approx(0.25)
    assert metrics["filter/d3s_group_var_before"] == pytest.approx(15 / 64)


def test_d3s_keeps_at_least_a_pair_and_whole_small_groups():
    scores = torch.tensor([0.0, 1.0, 2.0, 5.0, 3.0])
    keep, _ = SAMPLE_FILTERS.get("d3s")(scores, group_ids=[0, 0, 0, 0, 1], keep_ratio=0.1)
    assert keep.tolist() == [True, False, False, True, True]
    with pytest.raises(ValueError, match="keep_ratio"):
        SAMPLE_FILTERS.get("d3s")(scores, group_ids=[0] * 5, keep_ratio=0.0)


@SETTINGS
@given(
    values=st.lists(st.integers(-5, 5), min_size=1, max_size=8),
    data=st.data(),
)
def test_max_variance_subset_matches_brute_force(values, data):
    size = data.draw(st.integers(1, len(values)))
    tensor = torch.tensor(values, dtype=torch.float64)
    chosen = max_variance_subset(tensor, size)
    best = max(
        float(tensor[list(c)].var(unbiased=False)) for c in itertools.combinations(range(len(values)), size)
    )
    assert len(set(chosen)) == size
    assert float(tensor[chosen].var(unbiased=False)) == pytest.approx(best, abs=1e-9)


def test_linear_schedule():
    values = [linear_schedule(s, start=0.25, end=1.0, num_steps=4) for s in (0, 2, 4, 10)]
    assert values == pytest.approx([0.25, 0.625, 1.0, 1.0])
    assert linear_schedule(3, start=0.1, end=0.5, num_steps=0) == 0.5


# --------------------------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_quota_fills_with_whole_groups_and_trims():
    quota = DynamicSamplingQuota(target_groups=2, max_rounds=3)
    take = quota.admit(torch.tensor([True, True, False, False]), ["x", "x", "y", "y"])
    assert take.tolist() == [True, True, False, False] and not quota.full
    take = quota.admit(torch.tensor([True, True, True, True]), ["z", "z", "w", "w"])
    assert take.tolist() == [True, True, False, False] and quota.full
    metrics = quota.metrics()
    assert metrics["dynamic_sampling/rounds"] == 2
    assert metrics["dynamic_sampling/kept_groups"] == 2
    assert metrics["dynamic_sampling/qualified_fraction"] == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="already full"):
        quota.admit(torch.tensor([True]), ["v"])


def test_dynamic_sampling_quota_gives_up_after_max_rounds():
    quota = DynamicSamplingQuota(target_groups=2, max_rounds=2)
    keep, _ = SAMPLE_FILTERS.get("zero_variance")(torch.tensor([1.0, 1.0]), group_ids=["a", "a"])
    quota.admit(keep, ["a", "a"])
    with pytest.raises(ValueError, match="max_rounds=2"):
        quota.admit(keep, ["b", "b"])
    unlimited = DynamicSamplingQuota(target_groups=1, max_rounds=0)
    for _ in range(20):
        unlimited.admit(keep, ["a", "a"])
    assert not unlimited.full


# ---------------------------------------------------------------------------- token selection


def test_high_entropy_tokens_hand_computed():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 9.0], [0.8, 0.2, 0.3, 0.7]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    selected, metrics = TOKEN_SELECTORS.get("high_entropy")(mask, entropy=entropy, top_ratio=0.3)
    # 7 valid tokens -> ceil(2.1) = 3: 0.9, 0.8, 0.7 (the padded 9.0 never counts)
    assert selected.tolist() == [[0, 1, 0, 0], [1, 0, 0, 1]]
    assert metrics["tokens/high_entropy_score_threshold"] == pytest.approx(0.7)
    default, _ = TOKEN_SELECTORS.get("high_entropy")(mask, entropy=entropy)
    assert int(default.sum()) == 2  # ceil(0.2 * 7)


def test_d3s_tokens_rank_by_advantage_times_entropy():
    advantages = torch.tensor([[1.0, 1.0], [-2.0, -2.0]])
    entropy = torch.tensor([[0.5, 0.1], [0.2, 0.3]])
    selected, _ = TOKEN_SELECTORS.get("d3s")(
        torch.ones(2, 2), entropy=entropy, advantages=advantages, keep_ratio=0.5
    )
    assert selected.tolist() == [[1, 0], [0, 1]]  # |A| x H = [[.5, .1], [.4, .6]]
    with pytest.raises(ValueError, match="advantages"):
        TOKEN_SELECTORS.get("d3s")(torch.ones(2, 2), entropy=entropy, advantages=None, keep_ratio=0.5)


@SETTINGS
@given(
    entropy=st.lists(st.floats(0, 5, allow_nan=False), min_size=12, max_size=12),
    lengths=st.lists(st.integers(0, 4), min_size=3, max_size=3),
    ratio=st.floats(0.01, 1.0),
)
def test_high_entropy_selection_properties(entropy, lengths, ratio):
    mask = mask_of(lengths, 4)
    entropy_t = torch.tensor(entropy).view(3, 4)
    selected, _ = TOKEN_SELECTORS.get("high_entropy")(mask, entropy=entropy_t, top_ratio=ratio)
    num_valid = int(mask.sum())
    assert int(selected.sum()) == (min(num_valid, math.ceil(ratio * num_valid - 1e-9)) if num_valid else 0)
    assert not bool(((selected > 0) & (mask == 0)).any())
    chosen = entropy_t[selected > 0]
    others = entropy_t[(selected == 0) & (mask > 0)]
    if len(chosen) and len(others):
        assert chosen.min() >= others.max()


# ------------------------------------------------------------------------------------- docs


def all_registries() -> dict[str, Registry]:
    return {name: value for name, value in vars(algorithms).items() if isinstance(value, Registry)}


def test_every_registered_name_is_documented():
    text = DOCS.read_text()
    documented = set(re.findall(r"`([^`\s]+)`", text))
    registries = all_registries()
    assert len(registries) >= 8
    missing = [
        f"{registry}:{name}"
        for registry, reg in registries.items()
        for name in reg.names()
        if name not in documented
    ]
    missing += [
        mode for mode in (*algorithms.LOSS_AGG_MODES, *algorithms.LOSS_AGG_ALIASES) if mode not in documented
    ]
    assert not missing, f"docs/algorithms.md lacks rows for {missing}"
    for registry in registries:
        assert registry in text, f"docs/algorithms.md does not name the registry {registry}"
