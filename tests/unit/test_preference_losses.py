"""Offline preference losses (DPO, SimPO, REDI + its SFT stage) and the KDRL distillation term."""

from __future__ import annotations

import math

import pytest
import torch

from tidal.algorithms import PREFERENCE_LOSSES, kdrl_beta, kdrl_kl_loss, sequence_log_probs, sft_loss

PAD = 100.0  # garbage in padded positions: must never reach a loss


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_registered_names():
    assert set(PREFERENCE_LOSSES.names()) == {"dpo", "simpo", "redi"}


def test_sequence_log_probs_sum_and_mean_ignore_padding():
    log_probs = torch.tensor([[-1.0, -3.0, PAD], [-4.0, PAD, PAD]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sequence_log_probs(log_probs, mask, False).tolist() == [-4.0, -4.0]
    assert sequence_log_probs(log_probs, mask, True).tolist() == [-2.0, -4.0]


# ---------------------------------------------------------------------------------------- DPO


def dpo_inputs(requires_grad: bool = False):
    chosen = torch.tensor([[-1.0, -1.0, PAD]], requires_grad=requires_grad)
    rejected = torch.tensor([[-2.0, PAD, PAD]], requires_grad=requires_grad)
    return dict(
        chosen_log_probs=chosen,
        chosen_mask=torch.tensor([[1.0, 1.0, 0.0]]),
        rejected_log_probs=rejected,
        rejected_mask=torch.tensor([[1.0, 0.0, 0.0]]),
        ref_chosen_log_probs=torch.tensor([[-1.5, -1.5, PAD]]),
        ref_rejected_log_probs=torch.tensor([[-1.0, PAD, PAD]]),
    )


def test_dpo_hand_computed():
    # h_chosen = -2 - (-3) = 1, h_rejected = -2 - (-1) = -1; beta 0.5 -> logit 1
    loss, metrics = PREFERENCE_LOSSES.get("dpo")(**dpo_inputs(), beta=0.5)
    assert loss.item() == pytest.approx(softplus(-1.0))
    assert metrics == pytest.approx(
        {
            "preference/chosen_reward": 0.5,
            "preference/rejected_reward": -0.5,
            "preference/margin": 1.0,
            "preference/accuracy": 1.0,
        }
    )
    smoothed, _ = PREFERENCE_LOSSES.get("dpo")(**dpo_inputs(), beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.9 * softplus(-1.0) + 0.1 * softplus(1.0))


def test_dpo_gradient_raises_chosen_lowers_rejected():
    inputs = dpo_inputs(requires_grad=True)
    loss, _ = PREFERENCE_LOSSES.get("dpo")(**inputs, beta=0.5)
    loss.backward()
    sig = 1 / (1 + math.exp(1.0))  # d softplus(-z)/dz = -sigmoid(-z)
    torch.testing.assert_close(inputs["chosen_log_probs"].grad, torch.tensor([[-0.5 * sig, -0.5 * sig, 0.0]]))
    torch.testing.assert_close(inputs["rejected_log_probs"].grad, torch.tensor([[0.5 * sig, 0.0, 0.0]]))


def test_dpo_needs_reference_and_pairs():
    inputs = dpo_inputs()
    inputs["ref_rejected_log_probs"] = None
    with pytest.raises(ValueError, match="reference"):
        PREFERENCE_LOSSES.get("dpo")(**inputs)
    inputs = dpo_inputs()
    inputs["rejected_log_probs"] = torch.zeros(2, 3)
    inputs["rejected_mask"] = torch.ones(2, 3)
    with pytest.raises(ValueError, match="pairs"):
        PREFERENCE_LOSSES.get("dpo")(**inputs)
    with pytest.raises(ValueError, match="label_smoothing"):
        PREFERENCE_LOSSES.get("dpo")(**dpo_inputs(), label_smoothing=0.5)


# -------------------------------------------------------------------------------------- SimPO


def test_simpo_hand_computed_and_reference_free():
    inputs = dict(
        chosen_log_probs=torch.tensor([[-1.0, -3.0, PAD]]),
        chosen_mask=torch.tensor([[1.0, 1.0, 0.0]]),
        rejected_log_probs=torch.tensor([[-4.0, PAD, PAD]]),
        rejected_mask=torch.tensor([[1.0, 0.0, 0.0]]),
    )
    # avg chosen -2, avg rejected -4; 2 * (-2 + 4) - 0.5 = 3.5
    loss, metrics = PREFERENCE_LOSSES.get("simpo")(**inputs, beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(softplus(-3.5))
    assert metrics["preference/margin"] == pytest.approx(4.0)
    with_ref, _ = PREFERENCE_LOSSES.get("simpo")(
        **inputs, ref_chosen_log_probs=torch.zeros(1, 3), ref_rejected_log_probs=torch.zeros(1, 3)
    )
    assert with_ref.item() == pytest.approx(loss.item())


# --------------------------------------------------------------------------------------- REDI


def redi_inputs():
    return dict(
        chosen_log_probs=torch.tensor([[-1.0, -3.0, PAD]], requires_grad=True),
        chosen_mask=torch.tensor([[1.0, 1.0, 0.0]]),
        rejected_log_probs=torch.tensor([[-4.0, -2.0, -6.0]], requires_grad=True),
        rejected_mask=torch.tensor([[1.0, 1.0, 1.0]]),
    )


def test_redi_hand_computed_asymmetric_and_length_normalised():
    inputs = redi_inputs()
    loss, metrics = PREFERENCE_LOSSES.get("redi")(**inputs, alpha=0.8)
    assert loss.item() == pytest.approx(2.0 + 0.8 * -4.0)  # -(avg pos) + alpha * (avg neg)
    loss.backward()
    torch.testing.assert_close(inputs["chosen_log_probs"].grad, torch.tensor([[-0.5, -0.5, 0.0]]))
    torch.testing.assert_close(inputs["rejected_log_probs"].grad, torch.full((1, 3), 0.8 / 3))
    assert metrics["preference/chosen_log_prob"] == pytest.approx(-2.0)
    assert metrics["preference/rejected_log_prob"] == pytest.approx(-4.0)
    with pytest.raises(ValueError, match="alpha"):
        PREFERENCE_LOSSES.get("redi")(**redi_inputs(), alpha=1.5)


def test_redi_alpha_zero_is_length_normalised_sft():
    inputs = redi_inputs()
    loss, _ = PREFERENCE_LOSSES.get("redi")(**inputs, alpha=0.0)
    expected = sft_loss(inputs["chosen_log_probs"], inputs["chosen_mask"], mode="seq-mean-token-mean")
    assert loss.item() == pytest.approx(expected.item())


def test_sft_loss_token_mean():
    log_probs = torch.tensor([[-1.0, -2.0], [-3.0, PAD]])
    assert sft_loss(log_probs, torch.tensor([[1, 1], [1, 0]])).item() == pytest.approx(2.0)


@pytest.mark.parametrize("name", ["dpo", "simpo", "redi"])
def test_pieces_with_global_denominator_add_up(name):
    gen = torch.Generator().manual_seed(0)
    chosen, rejected = -torch.rand(4, 5, generator=gen), -torch.rand(4, 6, generator=gen)
    chosen_mask = (torch.rand(4, 5, generator=gen) > 0.3).float()
    rejected_mask = (torch.rand(4, 6, generator=gen) > 0.3).float()
    ref_c, ref_r = -torch.rand(4, 5, generator=gen), -torch.rand(4, 6, generator=gen)
    loss_fn = PREFERENCE_LOSSES.get(name)

    def run(rows: slice, denominator):
        return loss_fn(
            chosen[rows],
            chosen_mask[rows],
            rejected[rows],
            rejected_mask[rows],
            ref_chosen_log_probs=ref_c[rows],
            ref_rejected_log_probs=ref_r[rows],
            denominator=denominator,
        )[0]

    whole = run(slice(0, 4), None)
    pieces = run(slice(0, 1), 4) + run(slice(1, 4), torch.tensor(4.0))
    assert pieces.item() == pytest.approx(whole.item(), rel=1e-6)


# --------------------------------------------------------------------------------------- KDRL


def test_kdrl_k2_reverse_kl_hand_computed():
    log_probs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    teacher = torch.tensor([[-1.5, -1.0]])
    loss, metrics = kdrl_kl_loss(log_probs, teacher, torch.ones(1, 2))
    # k2 = 0.5 * (log pi - log pi_T)^2 = [0.125, 0.5], token-mean
    assert loss.item() == pytest.approx(0.3125)
    assert metrics["kdrl/kl"] == pytest.approx(0.3125)
    loss.backward()
    torch.testing.assert_close(log_probs.grad, torch.tensor([[0.25, -0.5]]))  # (log pi - log pi_T) / 2 tokens


def test_kdrl_reward_guided_mask_keeps_the_denominator():
    log_probs = torch.tensor([[-1.0, -2.0], [-1.0, -2.0]])
    teacher = torch.tensor([[-1.5, -1.0], [-1.5, -1.0]])
    loss, metrics = kdrl_kl_loss(
        log_probs, teacher, torch.ones(2, 2), seq_reward=torch.tensor([0.0, 1.0]), correct_threshold=1.0
    )
    assert loss.item() == pytest.approx(0.625 / 4)  # the correct row is silent but still counted
    assert metrics["kdrl/masked_fraction"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="seq_reward"):
        kdrl_kl_loss(log_probs, teacher, torch.ones(2, 2), correct_threshold=1.0)
    k3, _ = kdrl_kl_loss(log_probs, teacher, torch.ones(2, 2), estimator="k3")
    assert k3.item() == pytest.approx((math.exp(-0.5) + 0.5 - 1 + math.exp(1) - 1 - 1) / 2)


def test_kdrl_beta_anneals():
    values = [kdrl_beta(step, anneal_steps=10) for step in (0, 5, 10, 50)]
    assert values == pytest.approx([5e-3, 3e-3, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="beta_start"):
        kdrl_beta(0, beta_start=-1.0, anneal_steps=10)
