"""The actor's objective (tidal.algorithms.objective): the loss the worker back-propagates."""

from __future__ import annotations

import pytest
import torch

from tidal.algorithms import POLICY_LOSSES, aggregate_loss, count_valid
from tidal.algorithms.aggregation import GlobalCounts
from tidal.algorithms.objective import actor_objective, kl_loss_coef
from tidal.config.schema import ActorConfig


def random_step(seed: int = 0, n: int = 6, width: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 1, 4, 2, 5])[:n]
    mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(-1)).double()
    old = -torch.rand(n, width, generator=g, dtype=torch.float64)
    return {
        "response_mask": mask,
        "old_log_probs": old,
        "log_probs": old + (torch.rand(n, width, generator=g, dtype=torch.float64) - 0.5) * 0.2,
        "advantages": torch.randn(n, 1, generator=g, dtype=torch.float64).expand(n, width).clone(),
        "pg_mask": mask * (torch.rand(n, width, generator=g, dtype=torch.float64) > 0.4),
        "entropy": torch.rand(n, width, generator=g, dtype=torch.float64),
        "ref_log_probs": old - 0.1,
        "seq_reward": torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=torch.float64)[:n],
    }


def engine_counts(step: dict[str, torch.Tensor]) -> GlobalCounts:
    """What the engine all-reduces for a mini-batch: response_mask, plus pg_mask's counts."""
    full = count_valid(step["response_mask"])
    return GlobalCounts(full.num_tokens, full.num_sequences, {"pg_mask": count_valid(step["pg_mask"])})


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_pg_mask_pieces_add_up_to_each_mini_batchs_loss_on_its_selected_tokens(mode):
    """Exact per mini-batch, even when the mini-batches keep different shares of their tokens."""
    step = random_step()
    cfg = ActorConfig(loss_agg_mode=mode)
    log_probs = step["log_probs"].requires_grad_()
    for mini_lo, mini_hi, micros in [(0, 3, [(0, 2), (2, 3)]), (3, 6, [(3, 4), (4, 6)])]:
        mini = {key: value[mini_lo:mini_hi] for key, value in step.items()}
        counts = engine_counts(mini)
        total = 0.0
        for lo, hi in micros:
            micro = {key: value[lo:hi] for key, value in step.items()}
            loss, _, _ = actor_objective(
                log_probs[lo:hi], micro["entropy"], micro, counts, cfg, on_policy=False, kl_coef=0.0
            )
            total = total + loss
        expected, _ = POLICY_LOSSES.get("vanilla")(
            log_probs[mini_lo:mini_hi], mini["old_log_probs"], mini["advantages"], mini["pg_mask"], config=cfg
        )
        torch.testing.assert_close(total, expected)


def test_pg_mask_without_its_counts_is_a_clear_error():
    step = random_step()
    with pytest.raises(KeyError, match="count_masks=\\('pg_mask',\\)"):
        actor_objective(
            step["log_probs"], step["entropy"], step, count_valid(step["response_mask"]), ActorConfig(),
            on_policy=False, kl_coef=0.0,
        )  # fmt: skip


def test_entropy_bonus_kl_term_and_on_policy_ratio():
    step = random_step(seed=1)
    cfg = ActorConfig(entropy_coeff=0.01, use_kl_loss=True, kl_loss_type="k2", kl_loss_correct_threshold=1.0)
    log_probs = step["log_probs"].requires_grad_()
    counts = count_valid(step["response_mask"])
    micro = {k: v for k, v in step.items() if k not in ("old_log_probs", "pg_mask")}
    loss, sums, means = actor_objective(
        log_probs, step["entropy"], micro, counts, cfg, on_policy=True, kl_coef=0.5
    )
    mask = step["response_mask"]
    pg = aggregate_loss(-step["advantages"], mask, "token-mean")  # ratio 1 on-policy
    entropy = aggregate_loss(step["entropy"], mask, "token-mean")
    failed = (step["seq_reward"] < 1.0).double().unsqueeze(-1)  # reward-guided: no KD on solved rows
    kl = aggregate_loss(0.5 * (log_probs - step["ref_log_probs"]) ** 2 * failed, mask, "token-mean")
    torch.testing.assert_close(loss, pg - 0.01 * entropy + 0.5 * kl)
    assert sums["loss"] == pytest.approx(float(loss.detach()))
    assert means["kl_coef"] == 0.5 and sums["kl_loss"] == pytest.approx(float(kl.detach()))


def test_is_weights_scale_the_policy_gradient():
    step = random_step(seed=2)
    cfg = ActorConfig()
    counts = count_valid(step["response_mask"])
    base = {k: step[k] for k in ("response_mask", "old_log_probs", "advantages")}
    plain, _, _ = actor_objective(
        step["log_probs"], step["entropy"], base, counts, cfg, on_policy=False, kl_coef=0
    )
    weighted_micro = base | {"is_weights": torch.full_like(step["log_probs"], 3.0)}
    weighted, _, _ = actor_objective(
        step["log_probs"], step["entropy"], weighted_micro, counts, cfg, on_policy=False, kl_coef=0
    )
    torch.testing.assert_close(weighted, 3 * plain)


def test_kl_loss_coef_anneals_only_when_an_end_is_set():
    assert kl_loss_coef(ActorConfig(use_kl_loss=True, kl_loss_coef=0.01), step=50) == 0.01
    cfg = ActorConfig(use_kl_loss=True, kl_loss_coef=5e-3, kl_loss_coef_end=1e-3, kl_loss_anneal_steps=100)
    assert kl_loss_coef(cfg, 0) == pytest.approx(5e-3)
    assert kl_loss_coef(cfg, 50) == pytest.approx(3e-3)
    assert kl_loss_coef(cfg, 400) == pytest.approx(1e-3)


def test_rollout_kl_is_the_k3_mismatch_of_the_forward_and_moves_no_gradient():
    """actor/rollout_kl: KL(rollout || trainer) from the update's own forward, with no recompute."""
    from tidal.algorithms.off_policy import mismatch_kl

    step = random_step()
    mask = step["response_mask"]
    rollout = step["log_probs"] - 0.05 * torch.arange(5, dtype=torch.float64)  # drifts along the response
    step["rollout_log_probs"] = rollout
    log_probs = step["log_probs"].clone().requires_grad_()
    cfg = ActorConfig()
    with_kl = actor_objective(log_probs, step["entropy"], step, engine_counts(step), cfg, on_policy=True, kl_coef=0.0)
    log_ratio = step["log_probs"] - rollout  # log pi_trainer - log pi_rollout on the rollout's samples
    expected = float(((log_ratio.exp() - 1 - log_ratio) * mask).sum() / mask.sum())
    assert with_kl[2]["rollout_kl"] == pytest.approx(expected) == pytest.approx(mismatch_kl(step["log_probs"], rollout, mask))
    assert expected > 0 and mismatch_kl(rollout, rollout, mask) == 0.0
    del step["rollout_log_probs"]
    without = actor_objective(log_probs, step["entropy"], step, engine_counts(step), cfg, on_policy=True, kl_coef=0.0)
    assert "rollout_kl" not in without[2]
    torch.testing.assert_close(with_kl[0], without[0])  # a metric only: the loss is unchanged
