"""Tidal against the installed verl 0.9.1 (`verl.trainer.ppo.core_algos`, installed without its
dependencies by scripts/setup.sh) on random inputs, float64, for the names whose definitions were
corrected: REINFORCE++ across masked spans, GSPO under every aggregation mode, token-sum, the GRPO
epsilon, GPG's f_norm and KL-Cov's choice among tied tokens (gradients, not only values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_cases import holey_mask

from tidal.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, aggregate_loss
from tidal.config.algorithm import AlgorithmConfig
from tidal.config.schema import ActorConfig

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="scripts/setup.sh installs verl")
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.workers.config.actor import ActorConfig as VerlActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402

TOL = {"rtol": 1e-6, "atol": 1e-6}
MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean")


def verl_actor(**fields) -> VerlActorConfig:
    return VerlActorConfig(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=1, **fields)


@pytest.mark.parametrize("seed", range(4))
def test_reinforce_plus_plus_matches_verl(seed):
    g = torch.Generator().manual_seed(seed)
    mask = holey_mask(g, 6, 9)
    rewards = torch.randn(6, 9, generator=g, dtype=torch.float64) * mask
    ours = ADVANTAGE_ESTIMATORS.get("reinforce_plus_plus")(
        rewards, mask, group_ids=None, values=None, config=AlgorithmConfig(gamma=0.9)
    )
    theirs = core_algos.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=AlgoConfig(gamma=0.9))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("mode", MODES)
def test_gspo_follows_the_aggregation_mode_like_verl(mode):
    g = torch.Generator().manual_seed(1)
    mask = holey_mask(g, 5, 7)
    old = -torch.rand(5, 7, generator=g, dtype=torch.float64)
    new = (old + 0.05 * torch.randn(5, 7, generator=g, dtype=torch.float64)).requires_grad_()
    advantages = torch.randn(5, 1, generator=g, dtype=torch.float64).expand(5, 7).contiguous()
    ours, _ = POLICY_LOSSES.get("gspo")(new, old, advantages, mask, config=ActorConfig(loss_agg_mode=mode))
    (grad_ours,) = torch.autograd.grad(ours, new)
    theirs, _ = core_algos.compute_policy_loss_gspo(old, new, advantages, mask, mode, verl_actor())
    (grad_theirs,) = torch.autograd.grad(theirs, new)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(grad_ours, grad_theirs, **TOL)


def test_token_sum_matches_verl():
    g = torch.Generator().manual_seed(2)
    mask = holey_mask(g, 4, 6)
    loss_mat = torch.randn(4, 6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        aggregate_loss(loss_mat, mask, "token-sum"), core_algos.agg_loss(loss_mat, mask, "token-sum"), **TOL
    )


GROUPS = [0] * 4 + [1] * 3 + [2] + [3] * 2  # sizes 4, 3, 1 (a group of one) and 2


def grouped_rewards(seed: int, groups: list[int] = GROUPS) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Outcome rewards on the last valid token of each row, float64."""
    g = torch.Generator().manual_seed(seed)
    mask = holey_mask(g, len(groups), 5)
    mask[0] = 1.0  # the all-masked row of holey_mask would carry no reward: keep every row scored
    scores = torch.randint(0, 3, (len(groups),), generator=g).double()
    rewards = torch.zeros_like(mask)
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    rewards[torch.arange(len(groups)), last] = scores
    return rewards, mask, groups


@pytest.mark.parametrize("epsilon", [1e-6, 1e-4])
def test_grpo_epsilon_matches_verl(epsilon):
    rewards, mask, groups = grouped_rewards(3)
    cfg = AlgorithmConfig(norm_adv_epsilon=epsilon)
    ours = ADVANTAGE_ESTIMATORS.get("grpo")(rewards, mask, group_ids=groups, values=None, config=cfg)
    theirs = core_algos.compute_grpo_outcome_advantage(rewards, mask, np.array(groups), epsilon=epsilon)
    torch.testing.assert_close(ours[0], theirs[0], **TOL)


def test_grpo_passk_epsilon_matches_verl():
    rewards, mask, groups = grouped_rewards(4, [0] * 4 + [1] * 3 + [2] * 2)  # pass@k needs pairs
    cfg = AlgorithmConfig(advantage_estimator="grpo_passk", norm_adv_epsilon=1e-4)
    ours = ADVANTAGE_ESTIMATORS.get("grpo_passk")(rewards, mask, group_ids=groups, values=None, config=cfg)
    theirs = core_algos.compute_grpo_passk_outcome_advantage(
        rewards, mask, np.array(groups), epsilon=1e-4, config=AlgoConfig()
    )
    torch.testing.assert_close(ours[0], theirs[0], **TOL)


@pytest.mark.parametrize("f_norm", [1.0, 2.5])
def test_gpg_f_norm_matches_verl(f_norm):
    rewards, mask, groups = grouped_rewards(5)
    cfg = AlgorithmConfig(advantage_estimator="gpg", gpg_f_norm=f_norm)
    ours = ADVANTAGE_ESTIMATORS.get("gpg")(rewards, mask, group_ids=groups, values=None, config=cfg)
    theirs = core_algos.compute_gpg_outcome_advantage(rewards, mask, np.array(groups), f_norm=f_norm)
    torch.testing.assert_close(ours[0], theirs[0], **TOL)


@pytest.mark.parametrize("seed", range(3))
def test_kl_cov_picks_the_same_tied_tokens_as_verl(seed):
    """Sequence-level advantages and log-probs drawn from few values make many covariances equal;
    the penalised tokens, hence the gradients, must be the ones verl picks. (At this size a top-k
    over the padded matrix, as before, or a stable sort picks other tied tokens in most draws.)"""
    g = torch.Generator().manual_seed(seed)
    rows, cols = 32, 256
    mask = holey_mask(g, rows, cols)
    values = torch.tensor([-0.5, -1.0, -2.0], dtype=torch.float64)
    old = values[torch.randint(0, 3, (rows, cols), generator=g)]
    new = (old + 0.1 * values[torch.randint(0, 3, (rows, cols), generator=g)]).requires_grad_()
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)[torch.randint(0, 2, (rows,), generator=g)]
    advantages = advantages.unsqueeze(1).expand(rows, cols).contiguous()
    ratio = 0.2  # many tokens penalised, so ties straddle the cut
    cfg = ActorConfig(policy_loss="kl_cov", kl_cov_ratio=ratio, kl_cov_coef=0.7)
    ours, _ = POLICY_LOSSES.get("kl_cov")(new, old, advantages, mask, config=cfg)
    (grad_ours,) = torch.autograd.grad(ours, new)
    verl_cfg = verl_actor(policy_loss=PolicyLossConfig(loss_mode="kl_cov", kl_cov_ratio=ratio, ppo_kl_coef=0.7))
    theirs, _ = core_algos.compute_policy_loss_kl_cov(old, new, advantages, mask, "token-mean", verl_cfg)
    (grad_theirs,) = torch.autograd.grad(theirs, new)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(grad_ours, grad_theirs, **TOL)
