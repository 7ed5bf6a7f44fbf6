"""Failed rewards (raised, timed out, NaN) never steer the policy: `reward.on_error` drops the samples
(or their groups) before anything reads their reward, or scores them `reward.error_score`; too many
failures stop the run; the first error of each kind is logged once. Plain functions, no Ray."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

from tidal.algorithms import ADVANTAGE_ESTIMATORS, count_valid
from tidal.algorithms.objective import actor_objective
from tidal.config import config_from_dict
from tidal.config.loader import apply_overrides
from tidal.config.schema import RewardConfig
from tidal.controller.stages.advantage_task import compute_advantages
from tidal.controller.stages.batch_tasks import (
    attach_baselines_keeping,
    combine_rewards,
    drop_failed_rewards,
    keep_rows,
    rows_to_keep,
)
from tidal.dataflow.batch import Batch
from tidal.workers.rewards import scorer
from tidal.workers.rewards.scorer import (
    RewardFailureError,
    check_error_share,
    describe_error,
    log_first_errors,
    token_rewards_at_last_token,
)

BASE = {"model": {"path": "/tmp/m"}, "data": {"task": {"type": "arithmetic"}}}
COMBINATION = "algorithm.reward_combination={type: weighted_sum, components: [arithmetic, math_verify]}"


def cfg_with(*overrides: str):
    return config_from_dict(apply_overrides(copy.deepcopy(BASE), list(overrides)))


def test_rows_to_keep_for_each_setting():
    uids = list("aaabbbccc")
    failed = [False, True, False, False, False, False, True, True, False]
    assert rows_to_keep(failed, uids, "score", group_estimator=True) == [True] * 9
    assert rows_to_keep(failed, uids, "drop_group", group_estimator=False) == [True] * 0 + [
        False, False, False, True, True, True, False, False, False,
    ]  # fmt: skip
    # drop_sample: the failed ones; with a group estimator also c's lone survivor (no peer left).
    assert rows_to_keep(failed, uids, "drop_sample", group_estimator=False) == [not f for f in failed]
    assert rows_to_keep(failed, uids, "drop_sample", group_estimator=True) == [
        True, False, True, True, True, True, False, False, False,
    ]  # fmt: skip
    # A group that was a singleton from the start (no failure) is not touched.
    assert rows_to_keep([False, True, True], ["x", "y", "y"], "drop_sample", True) == [True, False, False]


def step_batch(failed_value: float) -> Batch:
    """Three prompts x three samples, every optional estimator input present; samples 1, 6 and 7
    failed and carry `failed_value` as their reward (and reward components)."""
    g = torch.Generator().manual_seed(0)
    n, width = 9, 5
    lengths = torch.tensor([5, 3, 4, 2, 5, 1, 3, 4, 5])
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(-1)).float()
    failed = [1, 6, 7]
    seq_reward = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    seq_reward[failed] = failed_value
    components = torch.stack([seq_reward, torch.rand(n, generator=g)], dim=1)
    components[failed] = failed_value
    old = -torch.rand(n, width, generator=g) * mask
    tensors = {
        "response_mask": mask,
        "seq_reward": seq_reward,
        "token_rewards": token_rewards_at_last_token(seq_reward, mask),
        "reward_components": components,
        "values": torch.randn(n, width, generator=g) * mask,
        "reward_baselines": torch.rand(n, generator=g),
        "old_log_probs": old,
        "sum_pi_squared": torch.rand(n, width, generator=g) * mask,
        "entropy": torch.rand(n, width, generator=g),
        "log_probs": old + 0.1 * torch.randn(n, width, generator=g) * mask,
    }
    errors = [("ZeroDivisionError: division by zero" if i in failed else None) for i in range(n)]
    return Batch.from_dict(tensors, {"uid": list("aaabbbccc"), "reward_error": errors})


@pytest.mark.parametrize("estimator", ADVANTAGE_ESTIMATORS.names())
@pytest.mark.parametrize("on_error", ["drop_sample", "drop_group"])
def test_a_failed_rewards_value_reaches_neither_the_advantages_nor_the_loss(estimator, on_error):
    """The program's path: drop_failed_rewards -> keep_rows -> the advantage task -> the actor's
    loss, with the failed samples' reward set to 0, to a huge value and to NaN: every output is the
    same, the failed rows are gone, and nothing is NaN."""
    overrides = [
        f"algorithm.advantage_estimator={estimator}",
        "rollout.sampling.n=3",
        f"reward.on_error={on_error}",
    ]
    if estimator == "gdpo":
        overrides.append(COMBINATION)
    cfg = cfg_with(*overrides)
    results = []
    for failed_value in (0.0, 1e6, math.nan):
        batch = step_batch(failed_value)
        _, keep = drop_failed_rewards(batch.select("uid", "reward_error"), cfg)
        kept = keep_rows(batch, [], [keep])
        assert all(error is None for error in kept["reward_error"])
        adv, selected, _ = compute_advantages(kept, cfg, kl_coef=0.0, step=0)
        assert selected is None
        micro = {"response_mask": kept["response_mask"], "old_log_probs": kept["old_log_probs"]}
        micro["advantages"] = adv["advantages"]
        loss, _, _ = actor_objective(
            kept["log_probs"], kept["entropy"], micro, count_valid(kept["response_mask"]), cfg.actor,
            on_policy=False, kl_coef=0.0,
        )  # fmt: skip
        assert not adv["advantages"].isnan().any() and not loss.isnan()
        results.append((keep, adv["advantages"], adv["returns"], loss))
    for keep, advantages, returns, loss in results[1:]:
        assert keep == results[0][0]
        torch.testing.assert_close(advantages, results[0][1], rtol=0, atol=0)
        torch.testing.assert_close(returns, results[0][2], rtol=0, atol=0)
        torch.testing.assert_close(loss, results[0][3], rtol=0, atol=0)
    if on_error == "drop_group":
        kept = [3, 4, 5]  # b: the one prompt without a failure
    elif estimator in {"gae", "reinforce_plus_plus", "remax"}:  # no peers: c's survivor stays
        kept = [0, 2, 3, 4, 5, 8]
    else:
        kept = [0, 2, 3, 4, 5]
    assert [i for i, k in enumerate(results[0][0]) if k] == kept


def test_drop_sample_grpo_equals_grpo_on_the_samples_that_were_scored():
    """The survivors of a group are normalised among themselves only."""
    cfg = cfg_with("rollout.sampling.n=3")
    batch = step_batch(123.0)
    _, keep = drop_failed_rewards(batch.select("uid", "reward_error"), cfg)
    adv, _, _ = compute_advantages(keep_rows(batch, [], [keep]), cfg, kl_coef=0.0, step=0)
    per_sample = adv["advantages"][:, 0].tolist()
    # a: rewards (1, 0) -> +-1/sqrt(2) * ...; b: (1, 0, 1)
    a = (1.0 - 0.5) / (math.sqrt(0.5) + 1e-6)
    b_mean, b_std = 2 / 3, math.sqrt(1 / 3)
    want = [
        a,
        -a,
        (1 - b_mean) / (b_std + 1e-6),
        (0 - b_mean) / (b_std + 1e-6),
        (1 - b_mean) / (b_std + 1e-6),
    ]
    assert per_sample == pytest.approx(want, rel=1e-5)


def test_on_error_score_trains_on_the_error_score():
    cfg = cfg_with("rollout.sampling.n=3", "reward.on_error=score", "reward.error_score=-1")
    assert cfg.reward.error_score == -1.0
    batch = step_batch(-1.0)
    _, keep = drop_failed_rewards(batch.select("uid", "reward_error"), cfg)
    assert keep == [True] * 9


def test_too_many_failures_stop_the_run_with_the_share_the_limit_the_error_and_the_fix():
    cfg = RewardConfig(max_error_share=0.5)
    check_error_share(4, 8, "x", cfg, "sample")  # exactly the limit is still allowed
    check_error_share(0, 0, None, cfg, "sample")
    first = describe_error("my_fn", "ZeroDivisionError: division by zero")
    with pytest.raises(RewardFailureError) as err:
        check_error_share(5, 8, first, cfg, "sample")
    message = str(err.value)
    assert isinstance(err.value, RuntimeError)
    for part in (
        "62%",
        "5 of 8",
        "reward.max_error_share=0.5",
        "my_fn raised ZeroDivisionError: division by zero",
    ):
        assert part in message
    assert "Fix the reward function" in message and "raise reward.max_error_share" in message
    with pytest.raises(RewardFailureError, match="100%"):
        check_error_share(3, 3, None, RewardConfig(max_error_share=0.0), "reference")


def test_errors_are_described_by_kind():
    assert (
        describe_error("f", "timeout", 30.0)
        == "reward function f timed out (no result within reward.timeout_s=30 s)"
    )
    assert describe_error("f", "NonFiniteReward: returned nan") == "reward function f returned nan"
    assert describe_error("f", "KeyError: 'x'") == "reward function f raised KeyError: 'x'"


def test_the_first_error_of_each_kind_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(scorer, "_LOGGED_KINDS", set())
    examples = {
        "ZeroDivisionError": ("ZeroDivisionError: division by zero", "1+1=", "2"),
        "timeout": ("timeout", "", ""),
    }
    with caplog.at_level(logging.WARNING, logger="tidal.workers.rewards.scorer"):
        log_first_errors("my_fn", examples, 30.0)
        log_first_errors("my_fn", examples, 30.0)  # already seen: only counted
        log_first_errors("my_fn", {"KeyError": ("KeyError: 'a'", "p", "r")}, 30.0)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert messages[0] == (
        "reward function my_fn raised ZeroDivisionError: division by zero (first of its kind; later ones "
        "are counted in reward/num_errors); sample: prompt='1+1=' response='2'"
    )
    assert messages[1].startswith("reward function my_fn timed out")
    assert messages[2].startswith("reward function my_fn raised KeyError: 'a'")


def test_combined_rewards_count_each_failed_sample_once():
    cfg = cfg_with(COMBINATION)
    mask = torch.ones(3, 2)
    parts = [
        Batch.from_dict({"seq_reward": torch.tensor([1.0, 0.0, 0.0])}, {"reward_error": [None, "ValueError: x", "timeout"]}),
        Batch.from_dict({"seq_reward": torch.tensor([1.0, 0.0, 1.0])}, {"reward_error": [None, "timeout", None]}),
    ]  # fmt: skip
    out, metrics = combine_rewards(Batch.from_dict({"response_mask": mask}), parts, cfg)
    assert list(out["reward_error"]) == [None, "arithmetic: ValueError: x", "arithmetic: timeout"]
    assert metrics["reward/num_errors"] == 2 and metrics["reward/num_timeouts"] == 2
    assert metrics["reward/error_share"] == pytest.approx(2 / 3)
    assert metrics["reward/mean"] == 2.0  # over the one sample no component failed


def test_failed_references_are_left_out_and_a_prompt_without_one_drops_its_samples():
    samples = Batch.from_dict({"x": torch.zeros(4)}, {"uid": ["a", "a", "b", "c"]})
    references = Batch.from_dict(
        {"seq_reward": torch.tensor([1.0, 0.0, 0.5, 0.0])},
        {"uid": ["a", "b", "b", "c"], "reward_error": [None, "KeyError: k", None, "timeout"]},
    )
    baselines, keep = attach_baselines_keeping(samples, references, drop_failed=True)
    assert keep == [True, True, True, False]  # c's only reference failed
    assert baselines["reward_baselines"].tolist() == [1.0, 1.0, 0.5, 0.0]
    # Without dropping (on_error=score) a failed reference counts with its (error_score) value.
    baselines, keep = attach_baselines_keeping(samples, references, drop_failed=False)
    assert keep == [True] * 4
    assert baselines["reward_baselines"][2].tolist()[:2] == [0.0, 0.5]
