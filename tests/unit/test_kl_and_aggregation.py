"""KL estimators and controllers, loss aggregation, value loss, masked stats and entropy."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.algorithms import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    AdaptiveKLController,
    FixedKLController,
    GlobalCounts,
    aggregate_loss,
    apply_kl_penalty,
    build_kl_controller,
    count_valid,
    entropy_from_logits,
    masked_mean,
    masked_whiten,
    value_loss,
)
from tidal.algorithms.masked import masked_var
from tidal.config.schema import KLControlConfig

SETTINGS = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------------------------ KL estimators


def test_kl_estimators_hand_computed():
    logp, ref = torch.tensor([[-1.0, -3.0]]), torch.tensor([[-2.0, -2.5]])
    expected = {
        "kl": [1.0, -0.5],
        "abs": [1.0, 0.5],
        "mse": [0.5, 0.125],
        "low_var_kl": [math.exp(-1) + 1 - 1, math.exp(0.5) - 0.5 - 1],
    }
    aliases = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
    for name, values in expected.items():
        for key in (name, aliases.get(name, name)):
            torch.testing.assert_close(KL_ESTIMATORS.get(key)(logp, ref), torch.tensor([values]), msg=key)


@SETTINGS
@given(
    st.lists(st.floats(-60, 0), min_size=1, max_size=8), st.lists(st.floats(-60, 0), min_size=8, max_size=8)
)
def test_k3_is_nonnegative_finite_and_clamped(logps, refs):
    logp = torch.tensor(logps)
    ref = torch.tensor(refs[: len(logps)])
    k3 = KL_ESTIMATORS.get("low_var_kl")(logp, ref)
    assert torch.all(k3 >= 0) and torch.all(k3 <= 10) and torch.all(torch.isfinite(k3))


def test_k3_clamps_match_verl():
    k3 = KL_ESTIMATORS.get("k3")
    # log r = ref - logp = 30 is clamped to 20 inside, e^20 - 21 is clamped to 10 outside
    assert k3(torch.tensor([0.0]), torch.tensor([30.0])).item() == 10.0
    # log r = -30 -> clamped to -20: e^-20 + 20 - 1 ~ 19 -> clamped to 10
    assert k3(torch.tensor([0.0]), torch.tensor([-30.0])).item() == 10.0


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "low_var_kl", "k3"])
def test_straight_through_has_value_of_estimator_and_gradient_of_k2(name):
    logp = torch.tensor([-1.0, -0.2, -4.0], requires_grad=True)
    ref = torch.tensor([-1.5, -0.1, -2.0])
    value = KL_ESTIMATORS.get(name + "+")(logp, ref)
    torch.testing.assert_close(value, KL_ESTIMATORS.get(name)(logp, ref))
    value.sum().backward()
    torch.testing.assert_close(logp.grad, (logp - ref).detach())
    assert KL_ESTIMATORS.get("k2+") is KL_ESTIMATORS.get("k2")


# -------------------------------------------------------------------------------- KL in reward


def test_apply_kl_penalty_fixed():
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 5.0]])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -0.5, 9.0], [-1.0, -1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    ctrl = FixedKLController(0.1)
    new, metrics = apply_kl_penalty(rewards, logp, ref, mask, ctrl, "kl")
    expected = torch.tensor([[-0.05, 1.05, 0.0], [0.0, 2.1, 5.0]])
    torch.testing.assert_close(new, expected)
    assert metrics["reward_kl_penalty"] == pytest.approx(((0.5 - 0.5) / 2 + (0 - 1) / 2) / 2)
    assert metrics["reward_kl_penalty_coeff"] == 0.1
    assert ctrl.value == 0.1


def test_adaptive_kl_controller_update_rule():
    ctrl = AdaptiveKLController(init_kl_coef=0.1, target_kl=0.1, horizon=100)
    ctrl.update(current_kl=0.5, n_steps=10)  # error clipped to +0.2
    assert ctrl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctrl.update(current_kl=0.09, n_steps=50)  # error -0.1
    assert ctrl.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 50 / 100))
    state = ctrl.state_dict()
    fresh = AdaptiveKLController(0.1, 0.1, 100)
    fresh.load_state_dict(state)
    assert fresh.value == ctrl.value


def test_apply_kl_penalty_updates_adaptive_controller_after_using_beta():
    ctrl = build_kl_controller(KLControlConfig(type="adaptive", kl_coef=0.2, target_kl=0.01, horizon=10))
    assert isinstance(ctrl, AdaptiveKLController)
    logp, ref, mask = torch.zeros(4, 2), torch.full((4, 2), -1.0), torch.ones(4, 2)
    _, metrics = apply_kl_penalty(torch.zeros(4, 2), logp, ref, mask, ctrl, "k1")
    assert metrics["reward_kl_penalty_coeff"] == 0.2
    assert ctrl.value == pytest.approx(0.2 * (1 + 0.2 * 4 / 10))
    assert isinstance(build_kl_controller(KLControlConfig()), FixedKLController)


# --------------------------------------------------------------------------------- aggregation


RAGGED_LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0], [99.0, 99.0, 99.0], [-2.0, 2.0, 99.0]])
RAGGED_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 2 + 3 + 4 - 2 + 2) / 6),
        ("seq-mean-token-sum", (6 + 4 + 0) / 3),  # the fully padded row does not count
        ("seq-mean-token-mean", (2 + 4 + 0) / 3),
        ("seq-mean-token-sum-norm", (6 + 4 + 0) / (3 * 3)),
        ("bnpo", 10 / 6),
        ("dr_grpo", 10 / 9),
        ("grpo", 2.0),
    ],
)
def test_aggregation_modes_on_ragged_mask(mode, expected):
    assert aggregate_loss(RAGGED_LOSS, RAGGED_MASK, mode).item() == pytest.approx(expected)


def test_aggregation_norm_length_and_errors():
    loss = aggregate_loss(RAGGED_LOSS, RAGGED_MASK, "seq-mean-token-sum-norm", norm_length=10)
    assert loss.item() == pytest.approx(10 / 30)
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'mean'"):
        aggregate_loss(RAGGED_LOSS, RAGGED_MASK, "mean")
    assert aggregate_loss(RAGGED_LOSS[2:3], RAGGED_MASK[2:3], "token-mean").item() == 0.0  # no NaN


@st.composite
def ragged_batches(draw):
    n, r = draw(st.integers(1, 8)), draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(0, r), min_size=n, max_size=n))
    losses = draw(st.lists(st.floats(-5, 5), min_size=n * r, max_size=n * r))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=4)))
    mask = (torch.arange(r).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).double()
    return torch.tensor(losses, dtype=torch.float64).view(n, r), mask, [0, *cuts, n]


@SETTINGS
@given(ragged_batches(), st.sampled_from(LOSS_AGG_MODES))
def test_chunk_losses_with_global_denominator_sum_to_whole(batch, mode):
    loss_mat, mask, bounds = batch
    whole = aggregate_loss(loss_mat, mask, mode)
    counts = count_valid(mask)
    plain = counts.num_tokens if mode == "token-mean" else counts.num_sequences
    for denominator in (counts, plain):
        chunks = [
            aggregate_loss(loss_mat[a:b], mask[a:b], mode, denominator, norm_length=mask.shape[-1])
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        torch.testing.assert_close(sum(chunks), whole)


def naive_aggregate(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str) -> float:
    """The definitions written out with python loops over rows (fully padded rows skipped; the
    implementation adds verl's 1e-8 to per-row token counts, hence the relative tolerance)."""
    rows = [[float(x) for x, m in zip(row, row_mask) if m > 0] for row, row_mask in zip(loss_mat, mask)]
    rows = [row for row in rows if row]
    if not rows:
        return 0.0
    if mode == "token-mean":
        return sum(map(sum, rows)) / sum(map(len, rows))
    if mode == "token-sum":
        return sum(map(sum, rows))
    if mode == "seq-mean-token-sum":
        return sum(map(sum, rows)) / len(rows)
    if mode == "seq-mean-token-mean":
        return sum(sum(row) / len(row) for row in rows) / len(rows)
    return sum(map(sum, rows)) / (len(rows) * loss_mat.shape[-1])


@SETTINGS
@given(ragged_batches(), st.sampled_from(LOSS_AGG_MODES))
def test_aggregation_modes_match_their_definitions_on_ragged_masks(batch, mode):
    loss_mat, mask, _ = batch
    garbage = torch.where(mask > 0, loss_mat, torch.full_like(loss_mat, float("nan")))  # padding never leaks
    assert aggregate_loss(garbage, mask, mode).item() == pytest.approx(
        naive_aggregate(loss_mat, mask, mode), rel=1e-6, abs=1e-9
    )


def test_seq_mean_token_mean_chunks_with_equal_rows_average_to_whole():
    # Without a global denominator a mean over pieces is only right when pieces have equal counts.
    mask = torch.ones(4, 3)
    whole = aggregate_loss(RAGGED_LOSS, mask, "seq-mean-token-mean", GlobalCounts(12, 4))
    local = [aggregate_loss(RAGGED_LOSS[i : i + 2], mask[i : i + 2], "seq-mean-token-mean") for i in (0, 2)]
    torch.testing.assert_close(sum(local) / 2, whole)


# -------------------------------------------------------------------------------- value loss


def test_value_loss_hand_computed():
    values = torch.tensor([[1.0, 0.0, 2.0, 7.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 2.0, 0.0]])
    returns = torch.tensor([[0.5, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = value_loss(values, old, returns, mask, cliprange=0.2, mode="token-mean")
    # token 0: unclipped 0.25, clipped (0.2-0.5)^2 = 0.09 -> 0.25; token 1: 1 vs 1; token 2: 4 vs 4
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1.0 + 4.0) / 3)
    assert metrics["vf_clipfrac"] == 0.0
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.5 / 3, -1 / 3, 2 / 3, 0.0]]))
    # moved from 0 past the target 1 to 1.1: the clipped value 0.5 is further away, so it wins
    values2 = torch.tensor([[1.1]], requires_grad=True)
    loss2, metrics2 = value_loss(
        values2, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.5, "token-mean"
    )
    assert loss2.item() == pytest.approx(0.5 * 0.25)
    assert metrics2["vf_clipfrac"] == 1.0
    loss2.backward()
    assert values2.grad.item() == 0.0
    with pytest.raises(ValueError, match="cliprange"):
        value_loss(values2, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.0, "token-mean")


def test_value_loss_denominator_split():
    g = torch.Generator().manual_seed(0)
    values, old, returns = (torch.randn(5, 4, generator=g) for _ in range(3))
    mask = (torch.arange(4).unsqueeze(0) < torch.tensor([4, 2, 0, 1, 3]).unsqueeze(1)).float()
    whole, _ = value_loss(values, old, returns, mask, 0.3, "seq-mean-token-mean")
    counts = count_valid(mask)
    parts = [
        value_loss(values[a:b], old[a:b], returns[a:b], mask[a:b], 0.3, "seq-mean-token-mean", counts)[0]
        for a, b in ((0, 3), (3, 5))
    ]
    torch.testing.assert_close(sum(parts), whole)


# ----------------------------------------------------------------------- masked stats, entropy


def test_masked_stats_ignore_padding_even_nan():
    values = torch.tensor([[1.0, 3.0, float("nan")], [5.0, float("inf"), 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(values, mask).item() == pytest.approx(3.0)
    assert masked_var(values, mask).item() == pytest.approx(4.0)
    whitened = masked_whiten(values, mask)
    torch.testing.assert_close(whitened[mask == 1], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([2.0, 5.0]))
    with pytest.raises(ValueError, match="at least 2 valid"):
        masked_var(values, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_entropy_from_logits():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))
    assert entropy_from_logits(torch.zeros(7)).item() == pytest.approx(math.log(7))
    big = torch.tensor([1000.0, 1000.0, -1000.0])
    assert entropy_from_logits(big).item() == pytest.approx(math.log(2))
    masked = torch.tensor([0.0, 0.0, float("-inf")], requires_grad=True)
    value = entropy_from_logits(masked)
    value.backward()
    assert value.item() == pytest.approx(math.log(2))
    assert torch.all(torch.isfinite(masked.grad))
