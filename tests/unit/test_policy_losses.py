"""Policy losses: hand-computed cases, gradients and properties (tidal.algorithms)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.algorithms import POLICY_LOSSES, GlobalCounts, count_valid
from tidal.config.schema import ActorConfig

CFG = ActorConfig()  # clip 0.2 / 0.2, dual clip 3.0, token-mean
SETTINGS = settings(max_examples=40, deadline=None)


def call(name: str, log_probs, old_log_probs, advantages, mask, config=CFG, **kwargs):
    return POLICY_LOSSES.get(name)(log_probs, old_log_probs, advantages, mask, config=config, **kwargs)


def test_all_losses_registered():
    expected = {"vanilla", "gspo", "sapo", "cispo", "geo_mean", "gpg", "reinforce", "clip_cov", "kl_cov"}
    expected |= {"dppo_tv", "dppo_kl", "dro", "vespo", "luspo", "rloo"}  # dppo_losses.py, trl_losses.py
    assert set(POLICY_LOSSES.names()) == expected


# ------------------------------------------------------------------------------------- vanilla


def test_vanilla_hand_computed_clip_and_dual_clip():
    ratios = torch.tensor([[1.5, 0.5, 5.0, 0.5]])
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    old = torch.zeros(1, 4)
    loss, metrics = call("vanilla", ratios.log(), old, advantages, torch.ones(1, 4))
    # token 1: A>0 clipped at 1.2; token 2: A<0 clipped at 0.8; token 3: A<0, ratio 5 -> dual clip 3;
    # token 4: A>0 ratio below range -> unclipped (pessimistic max keeps -0.5)
    assert loss.item() == pytest.approx((-1.2 + 0.8 + 3.0 - 0.5) / 4)
    assert metrics["pg_clipfrac"] == pytest.approx(0.5)
    assert metrics["pg_clipfrac_lower"] == pytest.approx(0.25)
    assert metrics["ppo_kl"] == pytest.approx(
        -(math.log(1.5) + 2 * math.log(0.5) + math.log(5.0)) / 4, rel=1e-5
    )


def test_vanilla_asymmetric_clip_and_masking():
    cfg = ActorConfig(clip_ratio_low=0.1, clip_ratio_high=0.3)
    ratios = torch.tensor([[1.5, 0.5, 7.0], [1.25, 0.85, 7.0]])
    advantages = torch.tensor([[1.0, -1.0, 9.0], [1.0, -1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    loss, metrics = call("vanilla", ratios.log(), torch.zeros(2, 3), advantages, mask, config=cfg)
    assert loss.item() == pytest.approx((-1.3 + 0.9 - 1.25 + 0.9) / 4)
    assert metrics["pg_clipfrac"] == pytest.approx(0.75)


def test_vanilla_log_ratio_is_clamped():
    loss, _ = call(
        "vanilla",
        torch.tensor([[100.0, -100.0]]),
        torch.zeros(1, 2),
        torch.tensor([[-1.0, 1.0]]),
        torch.ones(1, 2),
    )
    assert torch.isfinite(loss)
    # A<0 with ratio e^20: dual clip caps at 3; A>0 with ratio e^-20 ~ 0: loss ~ 0
    assert loss.item() == pytest.approx(1.5)


def test_vanilla_rejects_dual_clip_at_most_one():
    cfg = ActorConfig.model_construct(**{**CFG.model_dump(), "clip_ratio_c": 1.0})
    with pytest.raises(ValueError, match="clip_ratio_c"):
        call("vanilla", torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), config=cfg)


@st.composite
def near_policy_batch(draw):
    n, r = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, r, generator=g, dtype=torch.float64) * 3
    delta = (torch.rand(n, r, generator=g, dtype=torch.float64) - 0.5) * 0.3  # ratio within [0.86, 1.17]
    advantages = torch.randn(n, r, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, r + 1, (n,), generator=g)
    mask = (torch.arange(r).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float64)
    return old + delta, old, advantages, mask


@SETTINGS
@given(near_policy_batch())
def test_unclipped_vanilla_equals_minus_advantage_times_ratio_token_mean(batch):
    log_probs, old, advantages, mask = batch
    loss, metrics = call("vanilla", log_probs, old, advantages, mask)
    ratio = torch.exp(log_probs - old)
    expected = (-advantages * ratio * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected)
    assert metrics["pg_clipfrac"] == 0.0


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_vanilla_gradcheck_float64(mode):
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    log_probs = (old + (torch.rand(3, 5, generator=g, dtype=torch.float64) - 0.5) * 1.5).requires_grad_()
    advantages = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float64)
    cfg = ActorConfig(loss_agg_mode=mode, clip_ratio_low=0.2, clip_ratio_high=0.28)

    def fn(lp):
        return call("vanilla", lp, old, advantages, mask, config=cfg)[0]

    assert torch.autograd.gradcheck(fn, (log_probs,), eps=1e-6, atol=1e-6)


def test_vanilla_on_policy_gradient_is_policy_gradient():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    advantages = torch.tensor([[2.0, -1.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, _ = call("vanilla", log_probs, log_probs.detach(), advantages, mask)
    loss.backward()
    torch.testing.assert_close(log_probs.grad, torch.tensor([[-1.0, 0.5, 0.0]]))


def test_is_weights_multiply_token_losses():
    log_probs, advantages, mask = torch.zeros(1, 2), torch.tensor([[1.0, -2.0]]), torch.ones(1, 2)
    weights = torch.tensor([[0.5, 2.0]])
    loss, _ = call("vanilla", log_probs, log_probs, advantages, mask, is_weights=weights)
    assert loss.item() == pytest.approx((-0.5 + 4.0) / 2)


@pytest.mark.parametrize("name", ["vanilla", "gspo", "sapo", "cispo", "geo_mean", "gpg", "reinforce"])
@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
)
def test_micro_batch_losses_sum_to_mini_batch_loss(name, mode):
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(7, 6, generator=g, dtype=torch.float64)
    log_probs = (old + (torch.rand(7, 6, generator=g, dtype=torch.float64) - 0.5)).requires_grad_()
    advantages = torch.randn(7, 1, generator=g, dtype=torch.float64).expand(7, 6)
    mask = (torch.arange(6).unsqueeze(0) < torch.tensor([6, 1, 0, 3, 4, 2, 5]).unsqueeze(1)).to(torch.float64)
    cfg = ActorConfig(loss_agg_mode=mode)
    whole, _ = call(name, log_probs, old, advantages, mask, config=cfg)
    counts = count_valid(mask)
    pieces = [(0, 2), (2, 3), (3, 3), (3, 7)]  # uneven, one empty, one fully padded row
    total = sum(
        call(name, log_probs[a:b], old[a:b], advantages[a:b], mask[a:b], config=cfg, denominator=counts)[0]
        for a, b in pieces
    )
    torch.testing.assert_close(total, whole)
    (grad_whole,) = torch.autograd.grad(whole, log_probs)
    (grad_total,) = torch.autograd.grad(total, log_probs)
    torch.testing.assert_close(grad_total, grad_whole)


# ---------------------------------------------------------------------------- the other losses


def test_gspo_uses_sequence_ratio_and_token_gradients():
    old = torch.zeros(2, 3)
    log_probs = torch.tensor([[0.1, 0.3, 9.0], [0.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    cfg = ActorConfig(clip_ratio_low=0.1, clip_ratio_high=0.3, loss_agg_mode="seq-mean-token-mean")
    loss, _ = call("gspo", log_probs, old, advantages, mask, config=cfg)
    seq_ratio = math.exp(0.2)  # mean log-ratio of row 0 = 0.2, inside [0.9, 1.3]
    assert loss.item() == pytest.approx((-seq_ratio + 2.0) / 2, rel=1e-6)
    loss.backward()
    # d/dlogp_t of -A * s: -A * s / (len * num_seqs) per valid token (seq-mean-token-mean)
    expected = torch.tensor([[-seq_ratio / 4, -seq_ratio / 4, 0.0], [2 / 6, 2 / 6, 2 / 6]])
    torch.testing.assert_close(log_probs.grad, expected)


def test_gspo_follows_loss_agg_mode():
    """verl aggregates GSPO by loss_agg_mode (token-mean by default), not always per sequence."""
    old = torch.zeros(2, 3)
    log_probs = torch.tensor([[0.1, 0.3, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    seq_ratio = math.exp(0.2)
    token_losses = [-seq_ratio, -seq_ratio, 2.0, 2.0, 2.0]  # the five valid tokens
    for mode, expected in (
        ("token-mean", sum(token_losses) / 5),
        ("token-sum", sum(token_losses)),
        ("seq-mean-token-sum", (-2 * seq_ratio + 6.0) / 2),
    ):
        cfg = ActorConfig(clip_ratio_high=0.3, loss_agg_mode=mode)  # e^0.2 stays unclipped
        loss, _ = call("gspo", log_probs, old, advantages, mask, config=cfg)
        assert loss.item() == pytest.approx(expected, rel=1e-6), mode


def test_losses_with_their_own_aggregation_refuse_another_mode():
    for loss in ("sapo", "geo_mean"):
        with pytest.raises(ValueError, match=f"actor.policy_loss={loss} always aggregates"):
            ActorConfig(policy_loss=loss, loss_agg_mode="token-mean")
        ActorConfig(policy_loss=loss, loss_agg_mode="seq-mean-token-mean")  # its own: fine
    ActorConfig(policy_loss="gspo", loss_agg_mode="token-mean")


def test_gspo_delta_caps_the_unclipped_sequence_ratio():
    """TRL's delta at sequence level: for A < 0 the unclipped term -A * min(s, delta) bounds the loss."""
    log_probs = torch.tensor([[1.0, 1.0]])  # s = e
    advantages = -torch.ones(1, 2)
    cfg = ActorConfig(delta=1.5, loss_agg_mode="token-mean")
    loss, _ = call("gspo", log_probs, torch.zeros(1, 2), advantages, torch.ones(1, 2), config=cfg)
    assert loss.item() == pytest.approx(1.5)  # max(-A * min(e, 1.5), -A * clip(e, 0.8, 1.2)) = 1.5
    loss, _ = call("gspo", log_probs, torch.zeros(1, 2), advantages, torch.ones(1, 2))
    assert loss.item() == pytest.approx(math.e, rel=1e-6)


def test_gspo_clipped_sequence_has_no_gradient():
    log_probs = torch.tensor([[0.5, 0.5]], requires_grad=True)  # sequence ratio e^0.5 > 1.2
    loss, metrics = call("gspo", log_probs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2))
    loss.backward()
    assert loss.item() == pytest.approx(-1.2)
    assert torch.all(log_probs.grad == 0)
    assert metrics["pg_clipfrac"] == 1.0


def test_sapo_gate_matches_policy_gradient_on_policy():
    g = torch.Generator().manual_seed(3)
    log_probs = (-torch.rand(3, 4, generator=g)).requires_grad_()
    advantages = torch.randn(3, 4, generator=g)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    loss, _ = call("sapo", log_probs, log_probs.detach(), advantages, mask)
    tau = torch.where(advantages > 0, 1.0, 1.05)
    expected_value = ((-advantages * 2 / tau * mask).sum(-1) / mask.sum(-1)).mean()
    torch.testing.assert_close(loss, expected_value)
    (grad_sapo,) = torch.autograd.grad(loss, log_probs)
    cfg = ActorConfig(loss_agg_mode="seq-mean-token-mean")
    vanilla, _ = call("vanilla", log_probs, log_probs.detach(), advantages, mask, config=cfg)
    (grad_vanilla,) = torch.autograd.grad(vanilla, log_probs)
    torch.testing.assert_close(grad_sapo, grad_vanilla)  # gate slope at ratio 1 is exactly 1


def test_cispo_keeps_gradient_of_clipped_tokens():
    log_probs = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    advantages = torch.tensor([[1.0, 2.0]])
    loss, metrics = call("cispo", log_probs, torch.zeros(1, 2), advantages, torch.ones(1, 2))
    expected = (-1.2 * 1.0 * math.log(1.5) - 0.8 * 2.0 * math.log(0.5)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(log_probs.grad, torch.tensor([[-0.6, -0.8]]))
    assert metrics["pg_clipfrac"] == 1.0


def test_geo_mean_hand_computed():
    log_probs = torch.tensor([[0.1, 0.3, 0.0], [-0.5, 0.0, 0.0]])
    advantages = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    cfg = ActorConfig(clip_ratio_low=0.2, clip_ratio_high=0.28)
    loss, metrics = call("geo_mean", log_probs, torch.zeros(2, 3), advantages, mask, config=cfg)
    # row 0 (A>0): log-ratios clipped above at 0.28 -> mean 0.19; row 1 (A<0): clipped below at -0.2
    expected = (-math.exp(0.19) + math.exp(-0.2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["pg_clipfrac"] == pytest.approx(1 / 3)
    assert metrics["pg_clipfrac_lower"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", ["gpg", "reinforce"])
def test_plain_policy_gradient_losses(name):
    log_probs = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0], [-2.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, metrics = call(name, log_probs, log_probs.detach() - 0.1, advantages, mask)
    assert loss.item() == pytest.approx((1.0 + 2.0 - 1.0) / 3)
    assert metrics["ppo_kl"] == pytest.approx(-0.1)
    weighted, _ = call(
        name, log_probs, log_probs.detach(), advantages, mask, is_weights=torch.full((2, 2), 2.0)
    )
    assert weighted.item() == pytest.approx(2 * loss.item())


def test_global_counts_add_up():
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]])
    assert count_valid(mask) == GlobalCounts(num_tokens=3.0, num_sequences=2.0)
    assert count_valid(mask[:1]) + count_valid(mask[1:]) == count_valid(mask)


# ------------------------------------------------------------------------------- Clip-/KL-Cov


def clip_cov_case():
    advantages = torch.tensor([[2.0, -2.0, 0.0, 0.0]])
    log_probs = torch.tensor([[-0.5, -2.5, -1.5, -1.5]], requires_grad=True)  # centred: 1, -1, 0, 0
    return log_probs, advantages, torch.ones(1, 4)  # covariance: 2, 2, 0, 0 -> two candidates in (1, 5)


def test_clip_cov_detaches_all_candidates_when_ratio_allows():
    log_probs, advantages, mask = clip_cov_case()
    cfg = ActorConfig(policy_loss="clip_cov", clip_cov_ratio=1.0)
    loss, metrics = call("clip_cov", log_probs, log_probs.detach(), advantages, mask, config=cfg)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(log_probs.grad == 0)
    assert metrics["pg_clipfrac"] == pytest.approx(0.5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_clip_cov_detaches_exactly_one_random_candidate(seed):
    log_probs, advantages, mask = clip_cov_case()
    generator = torch.Generator().manual_seed(seed)
    cfg = ActorConfig(policy_loss="clip_cov", clip_cov_ratio=0.25)
    loss, metrics = call(
        "clip_cov", log_probs, log_probs.detach(), advantages, mask, config=cfg, generator=generator
    )
    loss.backward()
    assert metrics["pg_clipfrac"] == pytest.approx(0.25)
    grad = log_probs.grad[0]
    kept = 0 if grad[0] != 0 else 1
    assert grad[1 - kept] == 0
    assert grad[kept] == pytest.approx(-advantages[0, kept].item() / 4)
    assert loss.item() == pytest.approx(-advantages[0, kept].item() / 4)


def test_kl_cov_penalises_top_covariance_token():
    advantages = torch.tensor([[3.0, -1.0, -1.0, -1.0]])
    log_probs = torch.tensor([[0.0, -0.5, -1.5, -2.0]], requires_grad=True)  # centred: 1, .5, -.5, -1
    cfg = ActorConfig(policy_loss="kl_cov", kl_cov_ratio=0.25)
    loss, metrics = call(
        "kl_cov", log_probs, log_probs.detach() - 0.1, advantages, torch.ones(1, 4), config=cfg
    )
    # sum(-A) = 0, so only the |log ratio| = 0.1 penalty on token 0 (covariance 3) remains
    assert loss.item() == pytest.approx(0.1 / 4, rel=1e-5)
    assert metrics["ppo_kl"] == pytest.approx(0.1, rel=1e-5)
    loss.backward()
    ratio = math.exp(0.1)
    expected = torch.tensor([[-3 * ratio + 1, ratio, ratio, ratio]]) / 4
    torch.testing.assert_close(log_probs.grad, expected)


def test_sapo_hand_computed_with_configured_temperatures():
    cfg = ActorConfig(policy_loss="sapo", sapo_tau_pos=2.0, sapo_tau_neg=0.5)
    ratios = torch.tensor([[1.5, 0.5]])
    loss, _ = call(
        "sapo", ratios.log(), torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), config=cfg
    )
    positive = -(4 / 2.0) * torch.sigmoid(torch.tensor(2.0 * 0.5))  # A = 1, tau_pos
    negative = (4 / 0.5) * torch.sigmoid(torch.tensor(0.5 * -0.5))  # A = -1, tau_neg
    assert loss.item() == pytest.approx(float(positive + negative) / 2, rel=1e-6)
