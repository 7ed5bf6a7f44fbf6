"""The advantage task and the small batch tasks, run as plain functions on hand-made batches:
configured shaping, estimators, sample / token selection and off-policy corrections end up in the
columns the actor trains on."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tidal.config import config_from_dict
from tidal.config.loader import apply_overrides
from tidal.controller.stages.advantage_task import compute_advantages
from tidal.controller.stages.batch_tasks import attach_baselines, combine_rewards, filter_groups, keep_rows
from tidal.dataflow.batch import Batch
from tidal.workers.rewards.scorer import token_rewards_at_last_token

BASE = {"model": {"path": "/tmp/m"}, "data": {"task": {"type": "arithmetic"}}}


def cfg_with(*overrides: str):
    return config_from_dict(apply_overrides(copy.deepcopy(BASE), list(overrides)))


def mask_of(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(-1)).float()


def step_batch(rewards: list[float], lengths: list[int], uids: list[str], width: int = 6, **columns) -> Batch:
    mask = mask_of(lengths, width)
    seq_reward = torch.tensor(rewards)
    tensors = {
        "response_mask": mask,
        "seq_reward": seq_reward,
        "token_rewards": token_rewards_at_last_token(seq_reward, mask),
        **columns,
    }
    return Batch.from_dict(tensors, {"uid": uids})


def test_overlong_shaping_then_grpo():
    cfg = cfg_with(
        "rollout.sampling.n=2",
        "rollout.sampling.max_new_tokens=6",
        "algorithm.reward_shaping=[{type: overlong, buffer_length: 2}]",
    )
    batch = step_batch([1.0, 1.0, 0.0, 1.0], [3, 5, 6, 2], ["a", "a", "b", "b"])
    out, keep, metrics = compute_advantages(batch, cfg, kl_coef=0.0, step=1)
    # window [4, 6]: length 5 loses 0.5, length 6 loses 1 -> shaped rewards 1, 0.5, -1, 1
    shaped = out["token_rewards_total"].sum(-1)
    torch.testing.assert_close(shaped, torch.tensor([1.0, 0.5, -1.0, 1.0]))
    assert out["token_rewards_total"][1, 4] == pytest.approx(0.5)  # on the last valid token
    per_sample = out["advantages"][:, 0]
    torch.testing.assert_close(
        per_sample, torch.tensor([1.0, -1.0, -1.0, 1.0]) / math.sqrt(2), atol=1e-5, rtol=0
    )
    assert keep is None and "pg_mask" not in out
    assert metrics["reward/shaped_mean"] == pytest.approx(0.375)


def test_d3s_sample_selection_keeps_the_max_variance_pair_per_group():
    cfg = cfg_with(
        "rollout.sampling.n=4",
        "algorithm.sample_selection={type: d3s, keep_ratio_start: 0.5, keep_ratio_end: 0.5}",
    )
    batch = step_batch([0.0, 1.0, 0.4, 0.6, 1.0, 1.0, 0.0, 1.0], [2] * 8, ["a"] * 4 + ["b"] * 4)
    _, keep, metrics = compute_advantages(batch, cfg, kl_coef=0.0, step=1)
    assert keep[:4] == [True, True, False, False]  # the lowest and the highest
    assert sum(keep[4:]) == 2 and keep[6]  # the only failure and one success
    assert metrics["filter/d3s_kept_fraction"] == pytest.approx(0.5)


def test_token_selection_and_masked_is_make_pg_mask_and_weights():
    cfg = cfg_with(
        "rollout.sampling.n=2",
        "algorithm.token_selection={type: high_entropy, top_ratio: 0.5}",
        "algorithm.off_policy={type: mis, lower: 0.5, upper: 2.0}",
    )
    entropy = torch.tensor([[0.1, 0.9, 0.8, 0.0], [0.7, 0.2, 0.0, 0.0]])
    old = torch.zeros(2, 4)
    rollout = torch.tensor([[0.0, -math.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # token (0, 1): ratio 3
    batch = step_batch(
        [1.0, 0.0], [3, 2], ["a", "a"], width=4, entropy=entropy, old_log_probs=old, rollout_log_probs=rollout
    )
    out, _, metrics = compute_advantages(batch, cfg, kl_coef=0.0, step=1)
    # 5 valid tokens -> top ceil(2.5) = 3 by entropy: (0,1) 0.9, (0,2) 0.8, (1,0) 0.7; MIS rejects (0,1)
    assert out["pg_mask"].tolist() == [[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert out["is_weights"][0, 1] == 0.0 and out["is_weights"][0, 0] == pytest.approx(1.0)
    assert metrics["tokens/pg_fraction"] == pytest.approx(2 / 5)
    assert metrics["off_policy/is_rejected_token_fraction"] == pytest.approx(1 / 5)


def test_token_selection_without_entropy_says_what_to_run():
    cfg = cfg_with("rollout.sampling.n=2", "algorithm.token_selection={type: high_entropy}")
    with pytest.raises(ValueError, match="compute_log_probs"):
        compute_advantages(step_batch([1.0, 0.0], [2, 2], ["a", "a"]), cfg, kl_coef=0.0, step=1)


def test_remax_and_par_read_the_greedy_baselines():
    batch = step_batch([1.0, 0.0], [2, 3], ["a", "b"], reward_baselines=torch.tensor([0.5, 0.0]))
    out, _, _ = compute_advantages(
        batch, cfg_with("algorithm.advantage_estimator=remax"), kl_coef=0.0, step=1
    )
    torch.testing.assert_close(out["advantages"][:, 0], torch.tensor([0.5, 0.0]))
    cfg = cfg_with("rollout.sampling.n=2", "algorithm.reward_shaping=[{type: par}]")
    out, _, _ = compute_advantages(batch, cfg, kl_coef=0.0, step=1)
    expected = torch.sigmoid(torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(out["token_rewards_total"].sum(-1), expected)


def test_keep_rows_concatenates_kept_rows_in_order():
    first = Batch.from_dict({"x": torch.tensor([0, 1, 2])}, {"uid": ["a", "a", "b"]})
    second = Batch.from_dict({"x": torch.tensor([3, 4])}, {"uid": ["c", "c"]})
    kept = keep_rows(first, [second], [[True, False, True], [False, True]])
    assert kept["x"].tolist() == [0, 2, 4] and list(kept["uid"]) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="keep lists"):
        keep_rows(first, [second], [[True, True, True]])


def test_attach_baselines_maps_by_prompt_uid():
    batch = Batch.from_dict({"x": torch.zeros(3)}, {"uid": ["b", "a", "b"]})
    greedy = Batch.from_dict({"seq_reward": torch.tensor([1.0, 0.25])}, {"uid": ["a", "b"]})
    assert attach_baselines(batch, greedy)["reward_baselines"].tolist() == [0.25, 1.0, 0.25]
    with pytest.raises(ValueError, match="no greedy response"):
        attach_baselines(Batch.from_dict({"x": torch.zeros(1)}, {"uid": ["z"]}), greedy)


def test_combine_rewards_weighted_sum_and_first_error():
    cfg = cfg_with(
        "algorithm.reward_combination={type: weighted_sum, components: [arithmetic, math_verify], weights: [1, 0.5]}"
    )
    mask = mask_of([2, 3], 4)
    parts = [
        Batch.from_dict({"seq_reward": torch.tensor([1.0, 0.0])}, {"reward_error": [None, "ValueError: x"]}),
        Batch.from_dict({"seq_reward": torch.tensor([1.0, 1.0])}, {"reward_error": [None, None]}),
    ]
    out, metrics = combine_rewards(Batch.from_dict({"response_mask": mask}), parts, cfg)
    assert out["seq_reward"].tolist() == [1.5, 0.5]
    assert out["token_rewards"][1, 2] == pytest.approx(0.5)
    assert list(out["reward_error"]) == [None, "arithmetic: ValueError: x"]
    assert metrics["reward_combination/mean"] == pytest.approx(1.0)


def test_filter_groups_keeps_groups_whose_rewards_vary():
    cfg = cfg_with("algorithm.dynamic_sampling={type: zero_variance, atol: 0.1}")
    batch = Batch.from_dict(
        {"seq_reward": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.55])}, {"uid": list("aabbcc")}
    )
    column, keep, uids = filter_groups(batch, cfg)
    assert keep == [True, True, False, False, False, False]  # c varies by 0.05 <= atol
    assert uids == list("aabbcc") and column["keep"].tolist() == keep
