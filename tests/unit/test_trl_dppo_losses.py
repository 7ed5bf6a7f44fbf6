"""DPPO, DRO, VESPO, LUSPO, TRL's RLOO loss, TRL's delta cap, bias-corrected KL and RLOO advantage
normalisation: hand-computed cases (ragged masks, interior holes, an all-masked row, float32 and
float64), gradients, micro-batch additivity and the config errors."""

from __future__ import annotations

import math

import pytest
import torch

from tidal.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, count_valid
from tidal.algorithms.objective import actor_objective
from tidal.config.algorithm import AlgorithmConfig
from tidal.config.schema import ActorConfig

DTYPES = [torch.float32, torch.float64]


def call(name, log_probs, old, advantages, mask, config, **kwargs):
    return POLICY_LOSSES.get(name)(log_probs, old, advantages, mask, config=config, **kwargs)


# ---------------------------------------------------------------------------------- DPPO, DRO


@pytest.mark.parametrize("dtype", DTYPES)
def test_dppo_tv_masks_tokens_that_left_the_probability_region(dtype):
    # probabilities old -> new; advantages; token 2 sits in a hole of the mask
    old_p = torch.tensor([[0.5, 0.5, 0.3, 0.2], [0.9, 0.1, 0.4, 0.4]], dtype=dtype)
    new_p = torch.tensor([[0.8, 0.8, 0.1, 0.1], [0.5, 0.5, 0.4, 0.4]], dtype=dtype)
    adv = torch.tensor([[1.0, -1.0, 2.0, -1.0], [-1.0, 1.0, 1.0, 1.0]], dtype=dtype)
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]], dtype=dtype)
    cfg = ActorConfig(policy_loss="dppo_tv", clip_ratio_low=0.3, clip_ratio_high=0.2, clip_ratio_c=3.0)
    log_probs = new_p.log().requires_grad_()
    loss, metrics = call("dppo_tv", log_probs, old_p.log(), adv, mask, cfg)
    # (0,0) A>0 moved up 0.3 > 0.2: masked. (0,1) A<0 moved up: trusted, ratio 1.6.
    # (0,3) A<0 moved down 0.1 <= 0.3: trusted, ratio 0.5. (1,0) A<0 moved down 0.4 > 0.3: masked.
    # (1,1) A>0 moved up 0.4 > 0.2: masked.
    trusted = torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=dtype)
    weight = torch.tensor([[0.0, 1.6, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0]], dtype=dtype)  # sg(min(ratio, c))
    expected = (-adv * weight * new_p.log() * trusted * mask).sum() / 5
    torch.testing.assert_close(loss, expected)
    loss.backward()
    torch.testing.assert_close(log_probs.grad, -adv * weight * trusted * mask / 5)
    assert metrics["pg_clipfrac"] == pytest.approx(3 / 5)
    assert metrics["pg_clipfrac_lower"] == 0.0


def test_dppo_truncates_the_ratio_at_clip_ratio_c():
    old = torch.log(torch.tensor([[0.01, 0.01]], dtype=torch.float64))
    new = torch.log(torch.tensor([[0.05, 0.02]], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    cfg = ActorConfig(policy_loss="dppo_kl", clip_ratio_c=3.0)
    loss, metrics = call("dppo_kl", new, old, adv, torch.ones(1, 2, dtype=torch.float64), cfg)
    loss.backward()
    # ratios 5 (capped at 3) and 2; binary KLs are tiny, so both stay trusted
    torch.testing.assert_close(new.grad, torch.tensor([[-3.0 / 2, -2.0 / 2]], dtype=torch.float64))
    assert metrics["pg_clipfrac"] == 0.0 and metrics["pg_clipfrac_lower"] == pytest.approx(0.5)


def test_dppo_kl_uses_the_binary_kl_in_the_advantages_direction():
    old_p, new_p = 0.5, 0.9
    binary_kl = old_p * math.log(old_p / new_p) + (1 - old_p) * math.log((1 - old_p) / (1 - new_p))
    old = torch.full((1, 2), math.log(old_p), dtype=torch.float64)
    new = torch.full((1, 2), math.log(new_p), dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    for threshold, masked in ((binary_kl - 1e-3, 0.5), (binary_kl + 1e-3, 0.0)):
        cfg = ActorConfig(policy_loss="dppo_kl", clip_ratio_high=threshold, clip_ratio_c=10.0)
        _, metrics = call("dppo_kl", new, old, adv, mask, cfg)
        # the A<0 token moved up: never masked, whatever its KL
        assert metrics["pg_clipfrac"] == pytest.approx(masked)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dro_value_and_gradient(dtype):
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0]], dtype=dtype)
    new = torch.tensor([[-0.5, -2.5, -0.5], [-1.0, -1.0, -1.0]], dtype=dtype).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]], dtype=dtype)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=dtype)  # an all-masked row
    cfg = ActorConfig(policy_loss="dro", dro_beta=0.4)
    loss, _ = call("dro", new, old, adv, mask, cfg)
    # token losses: -(A logp - 0.2 d^2): -(-0.5 - 0.2*0.25) = 0.55, -(-2.5 - 0.05) = 2.55
    assert loss.item() == pytest.approx((0.55 + 2.55) / 2, rel=1e-6)
    loss.backward()
    # d/dlogp = -(A - beta * d) / count: d = +0.5 -> -(1 - 0.2) / 2, d = -0.5 -> -(1 + 0.2) / 2
    expected = torch.tensor([[-0.4, -0.6, 0.0], [0.0, 0.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(new.grad, expected)


# ------------------------------------------------------------------------------ VESPO, LUSPO, RLOO


@pytest.mark.parametrize("dtype", DTYPES)
def test_vespo_weights_by_the_gamma_function_of_the_sequence_ratio(dtype):
    old = torch.zeros(3, 3, dtype=dtype)
    new = torch.tensor([[0.1, 0.3, 5.0], [-0.2, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=dtype).requires_grad_()
    adv = torch.tensor([[1.0] * 3, [-1.0] * 3, [1.0] * 3], dtype=dtype)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=dtype)
    cfg = ActorConfig(policy_loss="vespo")

    def phi(log_w, k, lam):
        return math.exp(lam + k * log_w - lam * math.exp(log_w))

    phi0, phi1 = phi(0.4, 2.0, 3.0), phi(-0.2, 3.0, 2.0)  # A >= 0: (k, lam) = (2, 3); A < 0: (3, 2)
    loss, metrics = call("vespo", new, old, adv, mask, cfg)
    expected = (-phi0 * (0.1 + 0.3) + phi1 * (-0.2 + 0.0)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    grad = torch.tensor([[-phi0, -phi0, 0.0], [phi1, 0.0, phi1], [0.0, 0.0, 0.0]], dtype=dtype) / 4
    torch.testing.assert_close(new.grad, grad)  # phi is a constant
    assert metrics["vespo/phi_mean"] == pytest.approx((2 * phi0 + 2 * phi1) / 4, rel=1e-5)


def test_vespo_on_policy_is_reinforce_and_is_weights_join_the_sequence_ratio():
    g = torch.Generator().manual_seed(0)
    log_probs = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 1, generator=g, dtype=torch.float64).expand(3, 4)
    mask = torch.ones(3, 4, dtype=torch.float64)
    cfg = ActorConfig(policy_loss="vespo")
    loss, _ = call("vespo", log_probs, log_probs, adv, mask, cfg)
    reinforce, _ = call("reinforce", log_probs, log_probs, adv, mask, cfg)
    torch.testing.assert_close(loss, reinforce)  # w = 1 -> phi = 1
    # weights whose product is 1 per row leave w, hence the loss, unchanged (they are not a factor)
    weights = torch.tensor([[2.0, 0.5, 4.0, 0.25]] * 3, dtype=torch.float64)
    torch.testing.assert_close(
        call("vespo", log_probs, log_probs, adv, mask, cfg, is_weights=weights)[0], loss
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_luspo_sums_each_sequence_and_caps_at_delta(dtype):
    old = torch.zeros(3, 4, dtype=dtype)
    new = torch.tensor([[0.1, 0.0, 0.2, 9.0], [2.0, 2.0, 2.0, 0.0], [0.0] * 4], dtype=dtype).requires_grad_()
    adv = torch.tensor([[1.0] * 4, [-1.0] * 4, [3.0] * 4], dtype=dtype)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [0.0] * 4], dtype=dtype)
    cfg = ActorConfig(policy_loss="luspo", clip_ratio_high=0.3)
    loss, _ = call("luspo", new, old, adv, mask, cfg)
    s0, s1 = math.exp(0.15), math.exp(2.0)  # row 0: mean over its 2 valid tokens, inside the clip
    # row 0: 2 tokens * -s0; row 1 (A<0): 3 tokens * s1 (pessimistic max takes the unclipped ratio)
    assert loss.item() == pytest.approx((-2 * s0 + 3 * s1) / 2, rel=1e-5)
    loss.backward()
    # d/dlogp_t of L_i * (-A s_i): -A s_i, spread evenly over the row's valid tokens, / 2 sequences
    grad = torch.tensor([[-s0 / 2, 0, -s0 / 2, 0], [s1 / 2, s1 / 2, s1 / 2, 0], [0] * 4], dtype=dtype)
    torch.testing.assert_close(new.grad, grad)
    capped = ActorConfig(policy_loss="luspo", clip_ratio_high=0.3, delta=4.0)
    loss_capped, _ = call("luspo", new, old, adv, mask, capped)
    assert loss_capped.item() == pytest.approx((-2 * s0 + 3 * 4.0) / 2, rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rloo_loss_clips_the_ratio_of_summed_log_probs(dtype):
    old = torch.zeros(4, 3, dtype=dtype)
    new = torch.tensor([[0.1, 0.05, 7.0], [0.1, 0.2, 0.3], [-0.4, 9.0, -0.4], [0.0] * 3], dtype=dtype)
    new.requires_grad_()
    adv = torch.tensor([[2.0] * 3, [1.0] * 3, [-1.0] * 3, [5.0] * 3], dtype=dtype)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0] * 3], dtype=dtype)
    cfg = ActorConfig(policy_loss="rloo")
    loss, metrics = call("rloo", new, old, adv, mask, cfg)
    r0 = math.exp(0.15)  # rows 1 and 2: exp(0.6) > 1.2 and exp(-0.8) < 0.8
    # row 0: inside [0.8, 1.2]; row 1: A>0, above 1.2 -> 1.2 (no gradient); row 2: A<0, below 0.8 -> 0.8
    assert loss.item() == pytest.approx((-2 * r0 - 1.2 + 0.8) / 3, rel=1e-5)
    assert metrics["pg_clipfrac"] == pytest.approx(2 / 3)
    loss.backward()
    expected = torch.zeros(4, 3, dtype=dtype)
    expected[0, :2] = -2 * r0 / 3  # every valid token gets the sequence ratio's gradient
    torch.testing.assert_close(new.grad, expected)


@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl", "dro", "vespo", "luspo", "rloo"])
def test_micro_batch_losses_sum_to_mini_batch_loss(name):
    g = torch.Generator().manual_seed(3)
    old = -torch.rand(7, 6, generator=g, dtype=torch.float64)
    log_probs = (old + 0.3 * torch.randn(7, 6, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(7, 1, generator=g, dtype=torch.float64).expand(7, 6)
    mask = (torch.arange(6).unsqueeze(0) < torch.tensor([6, 1, 0, 3, 4, 2, 5]).unsqueeze(1)).double()
    mask[0, 2] = 0.0  # an interior hole
    cfg = ActorConfig(policy_loss=name, **({"dro_beta": 0.2} if name == "dro" else {}))
    whole, _ = call(name, log_probs, old, adv, mask, cfg)
    counts = count_valid(mask)
    pieces = [(0, 2), (2, 3), (3, 3), (3, 7)]
    total = sum(
        call(name, log_probs[a:b], old[a:b], adv[a:b], mask[a:b], cfg, denominator=counts)[0]
        for a, b in pieces
    )
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(
        torch.autograd.grad(total, log_probs)[0], torch.autograd.grad(whole, log_probs)[0]
    )


# --------------------------------------------------------------------- delta, bias-corrected KL


def test_delta_caps_the_unclipped_ratio_of_vanilla():
    ratios = torch.tensor([[5.0, 5.0, 1.1]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, 1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.float64)
    plain, _ = call("vanilla", ratios.log(), torch.zeros(1, 3), adv, mask, ActorConfig(clip_ratio_c=1e9))
    capped, _ = call(
        "vanilla", ratios.log(), torch.zeros(1, 3), adv, mask, ActorConfig(clip_ratio_c=1e9, delta=2.0)
    )
    # A<0, ratio 5: 5 -> 2; A>0 ratio 5: clipped at 1.2 either way; ratio 1.1: untouched
    assert plain.item() == pytest.approx((5.0 - 1.2 + 1.1) / 3)
    assert capped.item() == pytest.approx((2.0 - 1.2 + 1.1) / 3)


def test_bias_corrected_kl_keeps_the_value_on_policy_but_changes_the_gradient():
    g = torch.Generator().manual_seed(5)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    log_probs = -torch.rand(2, 3, generator=g, dtype=torch.float64)
    micro = {
        "response_mask": mask,
        "advantages": torch.zeros(2, 3, dtype=torch.float64),
        "ref_log_probs": log_probs - 0.3,
    }
    results = {}
    for corrected in (False, True):
        cfg = ActorConfig(use_kl_loss=True, kl_loss_type="k3", use_bias_correction_kl=corrected)
        lp = log_probs.clone().requires_grad_()
        loss, _, _ = actor_objective(
            lp, torch.zeros_like(lp), micro, count_valid(mask), cfg, on_policy=True, kl_coef=1.0
        )
        results[corrected] = (loss, torch.autograd.grad(loss, lp)[0])
    torch.testing.assert_close(results[True][0], results[False][0])
    # d(kl * rho)/dlogp at rho = 1 is dkl + kl: k3 with log r = -0.3 is e^-0.3 + 0.3 - 1 per token
    k3 = math.exp(-0.3) + 0.3 - 1
    torch.testing.assert_close(results[True][1] - results[False][1], k3 * mask / 4)


# ---------------------------------------------------------------------- RLOO normalisation


@pytest.mark.parametrize("dtype", DTYPES)
def test_rloo_normalize_advantages_standardises_over_the_batch(dtype):
    # scores 1, 0, 0, 2, 5, 7 on each row's last valid token (ragged rows, one with a leading hole)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [0, 1], [1, 1]], dtype=dtype)
    rewards = torch.tensor([[0, 1], [0, 0], [0, 0], [0, 2], [0, 5], [0, 7]], dtype=dtype)
    groups = ["a", "a", "a", "b", "b", "c"]  # sizes 3, 2 and 1 (no baseline)
    cfg = AlgorithmConfig(advantage_estimator="rloo", rloo_normalize_advantages=True)
    adv, _ = ADVANTAGE_ESTIMATORS.get("rloo")(rewards, mask, group_ids=groups, values=None, config=cfg)
    loo = torch.tensor([1.0, -0.5, -0.5, -3.0, 3.0], dtype=torch.float64)  # r - mean of the others
    normed = (loo - loo.mean()) / (loo.std() + 1e-4)
    expected = torch.cat([normed, torch.zeros(1, dtype=torch.float64)]).to(dtype)
    torch.testing.assert_close(adv, expected.unsqueeze(-1) * mask)


def test_rloo_normalize_with_fewer_than_two_baselined_samples_gives_zeros():
    cfg = AlgorithmConfig(advantage_estimator="rloo", rloo_normalize_advantages=True)
    rewards = torch.tensor([[1.0], [3.0]])
    adv, _ = ADVANTAGE_ESTIMATORS.get("rloo")(
        rewards, torch.ones(2, 1), group_ids=[0, 1], values=None, config=cfg
    )
    assert torch.equal(adv, torch.zeros(2, 1))


# ------------------------------------------------------------------------------ config errors


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"policy_loss": "dro"}, "needs actor.dro_beta"),
        ({"dro_beta": 0.1}, "actor.dro_beta is set"),
        ({"vespo_k_pos": 1.0}, "actor.vespo_k_pos is set"),
        ({"policy_loss": "sapo", "delta": 2.0}, "does not apply it"),
        ({"delta": 0.5}, "greater than 1"),
        ({"use_bias_correction_kl": True}, "actor.use_kl_loss=false"),
        (
            {"policy_loss": "luspo", "loss_agg_mode": "token-mean"},
            "always aggregates with seq-mean-token-sum",
        ),
        ({"policy_loss": "rloo", "loss_agg_mode": "token-mean"}, "always aggregates"),
    ],
)
def test_settings_a_loss_cannot_honour_are_config_errors(fields, needle):
    with pytest.raises(ValueError, match=needle):
        ActorConfig(**fields)


def test_rloo_normalize_advantages_needs_rloo():
    with pytest.raises(ValueError, match="algorithm.rloo_normalize_advantages is set"):
        AlgorithmConfig(advantage_estimator="grpo", rloo_normalize_advantages=True)
