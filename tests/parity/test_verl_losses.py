"""Tidal's `dppo_tv`, `dppo_kl` and `dro` against the installed verl 0.9.1 functions of the same
names, on random float64 inputs with ragged masks, interior holes and an all-masked row: loss,
gradient and metrics, for every aggregation mode, with and without off-policy weights."""

from __future__ import annotations

import pytest
import torch
from parity_cases import holey_mask

from tidal.algorithms import POLICY_LOSSES
from tidal.config.schema import ActorConfig

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos", reason="scripts/setup.sh installs verl")
from verl.workers.config.actor import ActorConfig as VerlActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402

TOL = {"rtol": 1e-6, "atol": 1e-6}
MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean")
VERL_FNS = {
    "dppo_tv": core_algos.compute_policy_loss_dppo_tv,
    "dppo_kl": core_algos.compute_policy_loss_dppo_kl,
    "dro": core_algos.compute_policy_loss_dro,
}


def random_case(seed: int, rows: int = 10, cols: int = 12):
    """Old probabilities spread over (0, 1) and large moves, so that tokens leave DPPO's trust region
    in both directions and ratios pass the truncation cap."""
    g = torch.Generator().manual_seed(seed)
    mask = holey_mask(g, rows, cols, hole_share=0.25)
    old = torch.log(torch.rand(rows, cols, generator=g, dtype=torch.float64).clamp(min=0.02))
    new = old + 0.8 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    new = new.clamp(max=-1e-3)  # a probability above 1 is not a probability
    advantages = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    is_weights = torch.rand(rows, cols, generator=g, dtype=torch.float64) + 0.5
    return old, new, advantages, mask, is_weights


def configs(name: str, mode: str) -> tuple[ActorConfig, VerlActorConfig]:
    clip = {"clip_ratio_low": 0.15, "clip_ratio_high": 0.25, "clip_ratio_c": 1.5}
    ours = {"dro": {"policy_loss": "dro", "dro_beta": 0.3}}.get(name, {"policy_loss": name})
    theirs = VerlActorConfig(
        strategy="fsdp",
        ppo_micro_batch_size_per_gpu=1,
        rollout_n=1,
        loss_agg_mode=mode,
        policy_loss=PolicyLossConfig(loss_mode=name, dro_beta=0.3 if name == "dro" else None),
        **clip,
    )
    return ActorConfig(loss_agg_mode=mode, **clip, **ours), theirs


@pytest.mark.parametrize("name", sorted(VERL_FNS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_loss_gradient_and_metrics_match_verl(name, mode, with_weights, seed):
    old, new, advantages, mask, is_weights = random_case(seed)
    weights = is_weights if with_weights else None
    ours_cfg, theirs_cfg = configs(name, mode)
    new_ours = new.clone().requires_grad_()
    ours, metrics = POLICY_LOSSES.get(name)(
        new_ours, old, advantages, mask, config=ours_cfg, is_weights=weights
    )
    (grad_ours,) = torch.autograd.grad(ours, new_ours)
    new_theirs = new.clone().requires_grad_()
    theirs, verl_metrics = VERL_FNS[name](
        old, new_theirs, advantages, mask, mode, theirs_cfg, rollout_is_weights=weights
    )
    (grad_theirs,) = torch.autograd.grad(theirs, new_theirs)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(grad_ours, grad_theirs, **TOL)
    for key, value in verl_metrics.items():
        assert metrics[key.removeprefix("actor/")] == pytest.approx(value, rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl"])
def test_cases_exercise_both_trust_region_sides_and_the_cap(name):
    """Guards the parity test above against passing on inputs where nothing is masked or truncated."""
    old, new, advantages, mask, _ = random_case(0)
    _, metrics = POLICY_LOSSES.get(name)(new, old, advantages, mask, config=configs(name, "token-mean")[0])
    assert 0.05 < metrics["pg_clipfrac"] < 0.95
    assert metrics["pg_clipfrac_lower"] > 0.0
