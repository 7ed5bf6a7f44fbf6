"""Off-policy importance-sampling corrections (tidal.algorithms.off_policy)."""

from __future__ import annotations

import math

import pytest
import torch

from tidal.algorithms import (
    OFF_POLICY_CORRECTIONS,
    POLICY_LOSSES,
    decoupled_is_weights,
    masked_is,
    truncated_is_weights,
)
from tidal.config.schema import ActorConfig


def test_token_tis_truncates_and_zeros_padding():
    old = torch.log(torch.tensor([[1.5, 3.0, 0.5, 7.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    weights, metrics = truncated_is_weights(old, torch.zeros(1, 4), mask, level="token", threshold=2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.5, 2.0, 0.5, 0.0]]))
    assert metrics["is_fraction_truncated"] == pytest.approx(1 / 3)
    assert metrics["is_max"] == pytest.approx(3.0)
    assert metrics["is_mean"] == pytest.approx(4.0 / 3)


def test_sequence_tis_uses_product_of_token_ratios():
    old = torch.tensor([[0.2, 0.3, 5.0], [0.5, 0.5, 0.0]])
    rollout = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    weights, _ = truncated_is_weights(old, rollout, mask, level="sequence", threshold=2.0)
    expected = torch.tensor([[math.exp(0.5), math.exp(0.5), 0.0], [2.0, 2.0, 2.0]])  # e^1 truncated to 2
    torch.testing.assert_close(weights, expected)


def test_tis_batch_normalize_and_effective_sample_size():
    old = torch.log(torch.tensor([[2.0, 0.5], [1.5, 9.0]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    weights, metrics = truncated_is_weights(old, torch.zeros(2, 2), mask, batch_normalize=True)
    assert (weights * mask).sum().item() / 3 == pytest.approx(1.0)
    assert metrics["is_batch_norm_factor"] == pytest.approx(4 / 3)
    _, equal = truncated_is_weights(torch.zeros(2, 2), torch.zeros(2, 2), mask)
    assert equal["is_eff_sample_size"] == pytest.approx(1.0)
    seq_w, _ = truncated_is_weights(
        old * 0.1, torch.zeros(2, 2), mask, level="sequence", batch_normalize=True
    )
    assert (seq_w[0, 0] + seq_w[1, 0]).item() / 2 == pytest.approx(1.0)


def test_is_weights_carry_no_gradient_and_validate():
    old = torch.zeros(1, 2, requires_grad=True)
    weights, _ = truncated_is_weights(old, torch.zeros(1, 2), torch.ones(1, 2))
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="level"):
        truncated_is_weights(old, torch.zeros(1, 2), torch.ones(1, 2), level="geometric")
    with pytest.raises(ValueError, match="threshold"):
        truncated_is_weights(old, torch.zeros(1, 2), torch.ones(1, 2), threshold=0.0)
    with pytest.raises(ValueError, match="same"):
        truncated_is_weights(old, torch.zeros(1, 3), torch.ones(1, 2))


def test_masked_is_token_level_rejects_out_of_range_tokens():
    old = torch.log(torch.tensor([[0.4, 1.0, 2.5], [1.2, 0.9, 1.0]]))
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    weights, new_mask, metrics = masked_is(old, torch.zeros(2, 3), mask, level="token", lower=0.5, upper=2.0)
    assert new_mask.dtype == mask.dtype
    assert new_mask.tolist() == [[0, 1, 0], [1, 1, 0]]
    torch.testing.assert_close(weights, torch.tensor([[0.0, 1.0, 0.0], [1.2, 0.9, 0.0]]))
    assert metrics["is_rejected_token_fraction"] == pytest.approx(2 / 5)
    assert metrics["is_rejected_seq_fraction"] == pytest.approx(1 / 2)


@pytest.mark.parametrize(("level", "kept_row0"), [("sequence", False), ("geometric", True)])
def test_masked_is_sequence_levels_reject_whole_sequences(level, kept_row0):
    # row 0: four tokens of log-ratio 0.3 -> product e^1.2 = 3.3 (out), geometric e^0.3 = 1.35 (in)
    old = torch.tensor([[0.3, 0.3, 0.3, 0.3], [0.0, -0.1, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    weights, new_mask, _ = masked_is(old, torch.zeros(2, 4), mask, level=level, lower=0.5, upper=2.0)
    assert bool(new_mask[0].sum() == 4) is kept_row0
    assert new_mask[1].tolist() == [1.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(
        weights[1, :2], torch.full((2,), math.exp(-0.1 if level == "sequence" else -0.05))
    )


def test_reinforce_with_tis_weights_scales_token_gradients():
    log_probs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    rollout = torch.tensor([[-1.0 - math.log(1.5), -2.0 - math.log(3.0)]])
    weights, _ = truncated_is_weights(log_probs, rollout, torch.ones(1, 2), threshold=2.0)
    advantages = torch.tensor([[1.0, -1.0]])
    loss, _ = POLICY_LOSSES.get("reinforce")(
        log_probs, rollout, advantages, torch.ones(1, 2), config=ActorConfig(), is_weights=weights
    )
    loss.backward()
    torch.testing.assert_close(log_probs.grad, torch.tensor([[-1.5 / 2, 2.0 / 2]]))


def test_vanilla_with_decoupled_weights_is_the_decoupled_ppo_objective():
    # proximal policy = trainer's old log-probs; behaviour = rollout's
    proximal = torch.log(torch.tensor([[0.4, 0.2]]))
    behaviour = proximal - torch.log(torch.tensor([[2.0, 0.5]]))  # pi_prox / pi_behav = 2, 0.5
    log_probs = proximal + torch.log(torch.tensor([[1.1, 1.5]]))  # rho = pi / pi_prox = 1.1, 1.5
    advantages, mask = torch.ones(1, 2), torch.ones(1, 2)
    weights, kept, metrics = decoupled_is_weights(proximal, behaviour, mask)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5]]))
    loss, _ = POLICY_LOSSES.get("vanilla")(
        log_probs, proximal, advantages, kept, config=ActorConfig(), is_weights=weights
    )
    # -w * min(rho * A, clip(rho, 0.8, 1.2) * A) per token, token mean
    assert loss.item() == pytest.approx((-2.0 * 1.1 - 0.5 * 1.2) / 2, rel=1e-6)
    capped_weights, capped, metrics = decoupled_is_weights(proximal, behaviour, mask, cap=1.0)
    assert capped.tolist() == [[0.0, 1.0]] and metrics["is_capped_fraction"] == pytest.approx(0.5)
    loss, _ = POLICY_LOSSES.get("vanilla")(
        log_probs, proximal, advantages, capped, config=ActorConfig(), is_weights=capped_weights
    )
    assert loss.item() == pytest.approx(-0.5 * 1.2, rel=1e-6)


def test_corrections_registry_has_one_signature():
    assert set(OFF_POLICY_CORRECTIONS.names()) == {"tis", "mis", "decoupled"}
    old = torch.log(torch.tensor([[3.0, 1.0]]))
    mask = torch.ones(1, 2)
    for name in OFF_POLICY_CORRECTIONS.names():
        weights, new_mask, metrics = OFF_POLICY_CORRECTIONS.get(name)(old, torch.zeros(1, 2), mask)
        assert weights.shape == new_mask.shape == mask.shape and "is_mean" in metrics
    tis_weights, tis_mask, _ = OFF_POLICY_CORRECTIONS.get("tis")(old, torch.zeros(1, 2), mask, threshold=2.0)
    assert tis_weights.tolist() == [[2.0, 1.0]] and tis_mask is mask
