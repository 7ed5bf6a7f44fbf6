"""GDPO and the optimal token baselines on hand-derived cases, their config rules, and the wiring:
the reward stage keeps the components for gdpo, the advantage task hands old_log_probs,
sum_pi_squared, reward_components and off-policy weights to the estimator.

The parity with verl on random inputs is tests/parity/test_verl_estimators.py.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tidal.algorithms import ADVANTAGE_ESTIMATORS
from tidal.config import ConfigError, config_from_dict
from tidal.config.algorithm import AlgorithmConfig
from tidal.config.loader import apply_overrides
from tidal.controller.stages.advantage_task import compute_advantages
from tidal.controller.stages.batch_tasks import combine_rewards
from tidal.dataflow.batch import Batch

DTYPES = [torch.float32, torch.float64]
COMBINATION = "{type: weighted_sum, components: [arithmetic, math_verify], weights: [1, 0.5]}"


def cfg_with(*overrides: str):
    base = {"model": {"path": "/tmp/m"}, "data": {"task": {"type": "arithmetic"}}}
    return config_from_dict(apply_overrides(copy.deepcopy(base), ["rollout.sampling.n=2", *overrides]))


def gdpo_config(weights=(1.0, 0.5)) -> AlgorithmConfig:
    combination = {"type": "weighted_sum", "components": ["a", "b"][: len(weights)], "weights": list(weights)}
    return AlgorithmConfig(advantage_estimator="gdpo", reward_combination=combination)


# ----------------------------------------------------------------------------------------- GDPO
@pytest.mark.parametrize("dtype", DTYPES)
def test_gdpo_normalises_each_component_then_whitens(dtype):
    # group a: component 0 is [1, 0] -> +-1/sqrt(2); component 1 is [0, 1] -> -+1/sqrt(2), weight 0.5
    # group b: component 0 is [1, 1] -> 0 (no spread); component 1 is [1, 0] -> +-1/sqrt(2)
    # so the combination is [c, -c, c, -c], c = 0.5 / sqrt(2), before whitening.
    comps = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]], dtype=dtype)
    mask = torch.tensor([[1, 0, 1], [1, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=dtype)  # hole; all-masked row
    rewards = torch.zeros(4, 3, dtype=dtype)
    adv, ret = ADVANTAGE_ESTIMATORS.get("gdpo")(
        rewards, mask, group_ids=["a", "a", "b", "b"], config=gdpo_config(), reward_components=comps
    )
    # valid tokens: five of c and one of -c -> mean 2c/3, unbiased var 2c^2/3, so +c -> 1/sqrt(6)
    # and -c -> -5/sqrt(6) whatever c is
    up, down = 1 / math.sqrt(6), -5 / math.sqrt(6)
    want = torch.tensor([[up, 0, up], [down, 0, 0], [up, up, up], [0, 0, 0]], dtype=dtype)
    assert adv.dtype == dtype and ret is adv
    torch.testing.assert_close(adv, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gdpo_group_of_one_keeps_its_raw_score(dtype):
    # singletons: mean 0, std 1 (verl), so the combination is [2, 0] / (1 + 1e-6); whitened +-1/sqrt(2).
    # If a singleton were zeroed the whitening would give 0 everywhere.
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=dtype)
    adv, _ = ADVANTAGE_ESTIMATORS.get("gdpo")(
        torch.zeros(2, 2, dtype=dtype),
        mask,
        group_ids=["x", "y"],
        config=gdpo_config((1.0,)),
        reward_components=torch.tensor([[2.0], [0.0]], dtype=dtype),
    )
    torch.testing.assert_close(adv[:, 0], torch.tensor([1, -1], dtype=dtype) / math.sqrt(2))
    assert (adv[:, 1] == 0).all()


def test_gdpo_without_components_is_whitened_grpo_and_checks_inputs():
    mask = torch.ones(4, 2)
    rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    adv, _ = ADVANTAGE_ESTIMATORS.get("gdpo")(rewards, mask, group_ids=list("aabb"), config=None)
    # GRPO gives +-c in both groups; whitening 8 tokens of +-c (unbiased var 8c^2/7) gives +-sqrt(7/8)
    signs = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]])
    torch.testing.assert_close(adv, signs * math.sqrt(7 / 8))
    with pytest.raises(ValueError, match="one weight per component"):
        ADVANTAGE_ESTIMATORS.get("gdpo")(
            rewards, mask, group_ids=list("aabb"), config=gdpo_config(), reward_components=torch.ones(4, 3)
        )
    with pytest.raises(ValueError, match=r"reward_components \[N, K\]"):
        ADVANTAGE_ESTIMATORS.get("gdpo")(
            rewards, mask, group_ids=list("aabb"), reward_components=torch.ones(3, 2)
        )
    with pytest.raises(ValueError, match="group_ids"):
        ADVANTAGE_ESTIMATORS.get("gdpo")(rewards, mask, group_ids=None)


# ------------------------------------------------------------------------ optimal token baselines
def otb_batch(dtype):
    """Rows 0-1: group g, row 1 with an interior hole; rows 2-3: a sample and an all-masked row;
    rows 4-5: tied lengths. p = 0.5 and sum p^2 = 0.5 everywhere, so w = 1 - 1 + 0.5 = 0.5."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 0], [0, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=dtype)
    rewards = torch.zeros(6, 3, dtype=dtype)
    rewards[0, 2], rewards[1, 2], rewards[2, 1], rewards[4, 1] = 1.0, 2.0, 3.0, 1.0
    inputs = {
        "old_log_probs": torch.full((6, 3), math.log(0.5), dtype=dtype),
        "sum_pi_squared": torch.full((6, 3), 0.5, dtype=dtype),
    }
    return rewards, mask, ["g", "g", "s", "s", "t", "t"], inputs


# Worked by hand. Returns G: row 0 [1, 1, 1], row 1 [2, -, 2]; cumulative weights W: row 0
# [.5, 1, 1.5], row 1 [.5, .5, 1]. By position: B = [(.5 + 1) / 1, 1 / 1, (1.5 + 2) / 2.5] =
# [1.5, 1, 1.4], and row 0, the sole longest (3 tokens against 2), gets B = 0 from position 2.
# By valid-token index: row 1's tokens are k = 0, 1 (positions 0 and 2): B_k = [1.5, (1 + 2) / 2,
# -], and row 0 gets B = 0 from index 2. Rows 2-3: the all-masked row is the only peer, so row 2
# keeps its return. Rows 4-5: equal weights, B = mean return 0.5, no tail (tied lengths).
WANT = {
    "optimal_token_baseline": [
        [-0.5, 0, 1],
        [0.5, 0, 0.6],
        [3, 3, 0],
        [0, 0, 0],
        [0.5, 0.5, 0],
        [-0.5, -0.5, 0],
    ],
    "tir_optimal_token_baseline": [
        [-0.5, -0.5, 1],
        [0.5, 0, 0.5],
        [3, 3, 0],
        [0, 0, 0],
        [0.5, 0.5, 0],
        [-0.5, -0.5, 0],
    ],
}


@pytest.mark.parametrize("name", sorted(WANT))
@pytest.mark.parametrize("dtype", DTYPES)
def test_optimal_token_baselines_by_hand(name, dtype):
    rewards, mask, uids, inputs = otb_batch(dtype)
    adv, ret = ADVANTAGE_ESTIMATORS.get(name)(rewards, mask, group_ids=uids, **inputs)
    assert adv.dtype == dtype
    torch.testing.assert_close(adv, torch.tensor(WANT[name], dtype=dtype), rtol=1e-6, atol=1e-6)
    want_returns = [[1, 1, 1], [2, 0, 2], [3, 3, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]]
    torch.testing.assert_close(ret, torch.tensor(want_returns, dtype=dtype))


@pytest.mark.parametrize("name", sorted(WANT))
def test_optimal_token_baseline_importance_weights_and_padding(name):
    rewards, mask, uids, inputs = otb_batch(torch.float64)
    is_weights = torch.ones(6, 3, dtype=torch.float64)
    is_weights[1] = 2.0  # row 1's variance weights count 4x: B_0 = (.5 + 2 * 2) / (.5 + 2) = 1.8
    adv, _ = ADVANTAGE_ESTIMATORS.get(name)(
        rewards, mask, group_ids=uids, rollout_is_weights=is_weights, **inputs
    )
    assert adv[0, 0].item() == pytest.approx(1 - 1.8)
    # garbage log-probs on padding (inf, NaN) must not leak into the weights
    inputs["old_log_probs"] = torch.where(mask > 0, inputs["old_log_probs"], torch.inf)
    inputs["sum_pi_squared"] = torch.where(mask > 0, inputs["sum_pi_squared"], torch.nan)
    clean, _ = ADVANTAGE_ESTIMATORS.get(name)(rewards, mask, group_ids=uids, **inputs)
    torch.testing.assert_close(clean, torch.tensor(WANT[name], dtype=torch.float64))
    with pytest.raises(ValueError, match="sum_pi_squared"):
        ADVANTAGE_ESTIMATORS.get(name)(rewards, mask, group_ids=uids)


# ------------------------------------------------------------------------------- config and wiring
def test_config_rules():
    otb = cfg_with("algorithm.advantage_estimator=optimal_token_baseline").algorithm
    assert otb.needs_sum_pi_squared and otb.needs_trainer_log_probs and not otb.keeps_reward_components
    gdpo = cfg_with(
        "algorithm.advantage_estimator=gdpo", f"algorithm.reward_combination={COMBINATION}"
    ).algorithm
    assert gdpo.keeps_reward_components and not gdpo.needs_sum_pi_squared
    assert not cfg_with().algorithm.needs_sum_pi_squared
    for overrides, message in [
        (["algorithm.advantage_estimator=gdpo"], "reward_combination is not set"),
        (
            ["algorithm.advantage_estimator=gdpo", "algorithm.reward_combination={type: min, components: [arithmetic]}"],
            "type=min",
        ),
        (
            ["algorithm.advantage_estimator=gdpo", f"algorithm.reward_combination={COMBINATION}",
             "algorithm.reward_shaping=[{type: overlong, buffer_length: 2}]"],
            "algorithm.reward_shaping changes the combined reward",
        ),
        (
            ["algorithm.advantage_estimator=gdpo", f"algorithm.reward_combination={COMBINATION}",
             "algorithm.use_kl_in_reward=true"],
            "use_kl_in_reward",
        ),
        (["algorithm.advantage_estimator=tir_optimal_token_baseline", "rollout.sampling.n=1"], "n>=2"),
    ]:  # fmt: skip
        with pytest.raises((ConfigError, ValueError), match=message):
            cfg_with(*overrides)


def test_reward_stage_keeps_components_for_gdpo_and_the_task_uses_them():
    cfg = cfg_with("algorithm.advantage_estimator=gdpo", f"algorithm.reward_combination={COMBINATION}")
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    parts = [
        Batch.from_dict({"seq_reward": torch.tensor([1.0, 0.0, 1.0, 1.0])}, {"reward_error": [None] * 4}),
        Batch.from_dict({"seq_reward": torch.tensor([0.0, 1.0, 1.0, 0.0])}, {"reward_error": [None] * 4}),
    ]
    scored, _ = combine_rewards(Batch.from_dict({"response_mask": mask}), parts, cfg)
    assert scored["reward_components"].tolist() == [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]
    batch = Batch.from_dict(
        {
            "response_mask": mask,
            "token_rewards": scored["token_rewards"],
            "reward_components": scored["reward_components"],
        },
        {"uid": list("aabb")},
    )
    out, _, _ = compute_advantages(batch, cfg, kl_coef=0.0, step=0)
    want, _ = ADVANTAGE_ESTIMATORS.get("gdpo")(
        scored["token_rewards"], mask, group_ids=list("aabb"), config=cfg.algorithm,
        reward_components=scored["reward_components"],
    )  # fmt: skip
    torch.testing.assert_close(out["advantages"], want)
    # without gdpo the reward stage does not keep the components
    plain, _ = combine_rewards(
        Batch.from_dict({"response_mask": mask}),
        parts,
        cfg_with(f"algorithm.reward_combination={COMBINATION}"),
    )
    assert "reward_components" not in plain


def test_advantage_task_hands_sum_pi_squared_and_is_weights_to_otb():
    rewards, mask, uids, inputs = otb_batch(torch.float32)
    columns = {"response_mask": mask, "token_rewards": rewards, **inputs}
    cfg = cfg_with("algorithm.advantage_estimator=optimal_token_baseline")
    out, _, _ = compute_advantages(Batch.from_dict(columns, {"uid": uids}), cfg, kl_coef=0.0, step=0)
    torch.testing.assert_close(out["advantages"], torch.tensor(WANT["optimal_token_baseline"]))
    # with an off-policy correction its weights reach the estimator as rollout_is_weights
    columns["rollout_log_probs"] = inputs["old_log_probs"] - math.log(2.0) * (torch.arange(6) == 1).unsqueeze(
        -1
    )
    cfg = cfg_with(
        "algorithm.advantage_estimator=optimal_token_baseline",
        "algorithm.off_policy={type: tis, threshold: 5}",
    )
    out, _, _ = compute_advantages(Batch.from_dict(columns, {"uid": uids}), cfg, kl_coef=0.0, step=0)
    assert out["advantages"][0, 0].item() == pytest.approx(1 - 1.8, abs=1e-6)  # row 1 weighted by 2^2
    assert "is_weights" in out
