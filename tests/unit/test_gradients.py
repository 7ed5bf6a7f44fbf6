"""Gradients of every loss with custom math against finite differences, in float64.

`torch.autograd.gradcheck` perturbs each input entry and compares the numerical Jacobian with
autograd's. The losses are piecewise smooth (clips, max, top-k selections); the inputs here are
random with a fixed seed, away from the kinks. Parametrised over the registries, so a newly
registered loss is checked without editing this file. Excluded on purpose, because their gradient
is by design NOT the gradient of their value (each is checked by hand elsewhere): straight-through
KL estimators ("<name>+", test_kl_and_aggregation.py) and CISPO, whose value is
-sg(clip(ratio)) * A * log pi (test_policy_losses.py). Advantages are per sequence, as GRPO-style
estimators give and as GSPO and GMPO assume.
"""

from __future__ import annotations

import pytest
import torch

from tidal.algorithms import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    aggregate_loss,
    entropy_from_logits,
    kdrl_kl_loss,
    sft_loss,
    value_loss,
)
from tidal.config.schema import ActorConfig

F64 = torch.float64


def inputs(seed: int, n: int = 3, width: int = 5, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, width, generator=g, dtype=F64) * 2
    log_probs = old + (torch.rand(n, width, generator=g, dtype=F64) - 0.5) * spread
    advantages = torch.randn(n, 1, generator=g, dtype=F64).expand(n, width)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=F64)[:n, :width]
    return log_probs.requires_grad_(), old, advantages, mask


LOSS_CONFIGS = {
    "clip_cov": ActorConfig(policy_loss="clip_cov", clip_cov_ratio=0.3, clip_cov_lb=-1.0, clip_cov_ub=1.0),
    "kl_cov": ActorConfig(policy_loss="kl_cov", kl_cov_ratio=0.3),
    "sapo": ActorConfig(policy_loss="sapo", sapo_tau_pos=0.7, sapo_tau_neg=1.6),
    "dro": ActorConfig(policy_loss="dro", dro_beta=0.3),
}


# Losses whose gradient is, by definition, not the derivative of their value (stop-gradient weights:
# CISPO's and DPPO's ratio, VESPO's phi); their gradients are checked by hand in their own tests.
SURROGATES = {"cispo", "dppo_tv", "dppo_kl", "vespo"}


@pytest.mark.parametrize("name", [n for n in POLICY_LOSSES.names() if n not in SURROGATES])
@pytest.mark.parametrize("weighted", [False, True])
def test_policy_loss_gradients(name, weighted):
    log_probs, old, advantages, mask = inputs(seed=7)
    cfg = LOSS_CONFIGS.get(name, ActorConfig(clip_ratio_low=0.2, clip_ratio_high=0.28))
    is_weights = torch.linspace(0.5, 1.5, mask.numel(), dtype=F64).view_as(mask) if weighted else None
    if weighted and name == "gspo":  # a sequence-level ratio pairs with sequence-level weights
        is_weights = is_weights[:, :1].expand_as(mask)

    def fn(lp):
        # clip_cov draws its detached subset at random: the same draw at every evaluation
        extra = {"generator": torch.Generator().manual_seed(0)} if name == "clip_cov" else {}
        loss, _ = POLICY_LOSSES.get(name)(
            lp, old, advantages, mask, config=cfg, is_weights=is_weights, **extra
        )
        return loss

    assert torch.autograd.gradcheck(fn, (log_probs,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in KL_ESTIMATORS.names() if not n.endswith("+")])
def test_kl_estimator_gradients(name):
    log_probs, ref, _, _ = inputs(seed=3)
    assert torch.autograd.gradcheck(
        lambda lp: KL_ESTIMATORS.get(name)(lp, ref), (log_probs,), eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregation_and_value_loss_gradients(mode):
    values, old_values, returns, mask = inputs(seed=5, spread=2.0)
    assert torch.autograd.gradcheck(
        lambda v: aggregate_loss(v**2, mask, mode), (values,), eps=1e-6, atol=1e-7
    )
    assert torch.autograd.gradcheck(
        lambda v: value_loss(v, old_values, returns, mask, cliprange=0.3, mode=mode)[0],
        (values,),
        eps=1e-6,
        atol=1e-7,
    )


@pytest.mark.parametrize("name", PREFERENCE_LOSSES.names())
def test_preference_loss_gradients(name):
    chosen, ref_chosen, _, chosen_mask = inputs(seed=11)
    rejected, ref_rejected, _, _ = inputs(seed=12)
    rejected_mask = chosen_mask.flip(0)

    def fn(c, r):
        loss, _ = PREFERENCE_LOSSES.get(name)(
            c,
            chosen_mask,
            r,
            rejected_mask,
            ref_chosen_log_probs=ref_chosen,
            ref_rejected_log_probs=ref_rejected,
        )
        return loss

    assert torch.autograd.gradcheck(fn, (chosen, rejected), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda c: sft_loss(c, chosen_mask), (chosen,), eps=1e-6, atol=1e-7)


def test_kdrl_and_entropy_gradients():
    log_probs, teacher, _, mask = inputs(seed=13)
    rewards = torch.tensor([1.0, 0.0, 0.0], dtype=F64)

    def kd(lp):
        return kdrl_kl_loss(lp, teacher, mask, seq_reward=rewards, correct_threshold=1.0)[0]

    assert torch.autograd.gradcheck(kd, (log_probs,), eps=1e-6, atol=1e-7)
    logits = torch.randn(2, 3, 6, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: entropy_from_logits(z), (logits,), eps=1e-6, atol=1e-7)
