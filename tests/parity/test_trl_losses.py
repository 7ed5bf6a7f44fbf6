"""Tidal's TRL-named pieces against TRL 1.16 on random float64 inputs (ragged masks with holes).

TRL's losses live inside `GRPOTrainer._compute_loss` / `RLOOTrainer._compute_loss` and the RLOO
advantages inside `_generate_and_score_completions`, which need a model and a trainer. What is a
pure function is called directly: `GRPOTrainer.get_gamma_weights` (VESPO's phi) and
`trl.trainer.utils.nanstd`. The rest is re-derived here, line by line, from those methods' formulas
(`trl_*` helpers below, written for this test; each names the TRL lines it follows), with TRL's
(B, 1) advantages and its aggregation for the loss type, and compared with Tidal's loss and gradient.
"""

from __future__ import annotations

import pytest
import torch

from tidal.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, count_valid
from tidal.algorithms.objective import actor_objective
from tidal.algorithms.trl_losses import vespo_weights
from tidal.config.algorithm import AlgorithmConfig
from tidal.config.schema import ActorConfig

grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer", reason="TRL is a test dependency")
from trl.trainer.utils import nanstd  # noqa: E402

TOL = {"rtol": 1e-6, "atol": 1e-6}
EPS_LOW, EPS_HIGH = 0.2, 0.28


def case(seed: int, rows: int = 7, cols: int = 9, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(rows, cols, generator=g) > 0.2).double()
    mask *= (torch.arange(cols) < torch.randint(1, cols + 1, (rows,), generator=g).unsqueeze(1)).double()
    mask[:, 0] = 1.0  # TRL counts every row as a sequence; keep each non-empty
    old = -torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2
    new = old + spread * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    adv = torch.randn(rows, 1, generator=g, dtype=torch.float64)  # TRL: one advantage per sequence
    ref = old + 0.2 * torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return old, new, adv, mask, ref


def grad_of(loss_fn, new):
    new = new.clone().requires_grad_()
    loss = loss_fn(new)
    return loss, torch.autograd.grad(loss, new)[0]


def trl_clipped(coef_1, adv, delta=None):
    """GRPOTrainer._compute_loss, loss types grpo/bnpo/dr_grpo/dapo/luspo: coef_2, the delta cap, -min."""
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    return -torch.min(coef_1 * adv, coef_2 * adv)


def trl_k3(new, ref):
    """GRPOTrainer._compute_loss: per_token_kl, unclamped."""
    return torch.exp(ref - new) - (ref - new) - 1


@pytest.mark.parametrize("seed", range(3))
def test_vespo_weights_match_trl_get_gamma_weights(seed):
    old, new, adv, mask, _ = case(seed, spread=0.6)
    is_ratio = (
        torch.rand(*mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    )
    is_ratio = torch.where(mask > 0, is_ratio, torch.ones_like(is_ratio))  # padding carries weight 1 in TRL
    cfg = ActorConfig(policy_loss="vespo", vespo_k_pos=1.5, vespo_lambda_pos=2.5)
    for ratio in (None, is_ratio):
        theirs = grpo_trainer.GRPOTrainer.get_gamma_weights(
            adv, new - old, mask, ratio, k_pos=1.5, lambda_pos=2.5, k_neg=3.0, lambda_neg=2.0
        )
        ours = vespo_weights(new - old, adv.expand_as(mask), mask, cfg, ratio)
        torch.testing.assert_close(ours, theirs.expand_as(ours), **TOL)


def test_vespo_loss_matches_trl():
    """TRL: per_token_loss = -phi * A * logp, aggregated like dapo (token sum / token count)."""
    old, new, adv, mask, _ = case(4, spread=0.6)
    cfg = ActorConfig(policy_loss="vespo")

    def trl(lp):
        phi = grpo_trainer.GRPOTrainer.get_gamma_weights(adv, (lp - old).detach(), mask, None)
        return (-phi * adv * lp * mask).sum() / mask.sum()

    def ours(lp):
        return POLICY_LOSSES.get("vespo")(lp, old, adv.expand_as(mask), mask, config=cfg)[0]

    for a, b in zip(grad_of(ours, new), grad_of(trl, new)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("delta", [None, 1.1])  # 1.1 < 1 + eps_high: the cap binds for A > 0 too
def test_luspo_matches_trl(delta):
    """TRL luspo with importance_sampling_level="sequence": coef_1 = exp(mean log ratio) (B, 1);
    loss = (per_token_loss * mask).sum(-1).mean()."""
    old, new, adv, mask, _ = case(1, spread=0.5)
    cfg = ActorConfig(policy_loss="luspo", clip_ratio_low=EPS_LOW, clip_ratio_high=EPS_HIGH, delta=delta)

    def trl(lp):
        log_w = ((lp - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        return (trl_clipped(torch.exp(log_w), adv, delta) * mask).sum(-1).mean()

    def ours(lp):
        return POLICY_LOSSES.get("luspo")(lp, old, adv.expand_as(mask), mask, config=cfg)[0]

    for a, b in zip(grad_of(ours, new), grad_of(trl, new)):
        torch.testing.assert_close(a, b, **TOL)


def test_rloo_loss_matches_trl_rloo_trainer():
    """RLOOTrainer._compute_loss: logps summed over the completion, one clipped loss per sequence, mean."""
    old, new, adv, mask, _ = case(2, spread=0.15)
    cfg = ActorConfig(policy_loss="rloo", clip_ratio_low=EPS_LOW, clip_ratio_high=EPS_HIGH)

    def trl(lp):
        coef_1 = torch.exp((lp * mask).sum(1) - (old * mask).sum(1))
        return trl_clipped(coef_1, adv.squeeze(-1)).mean()

    def ours(lp):
        return POLICY_LOSSES.get("rloo")(lp, old, adv.expand_as(mask), mask, config=cfg)[0]

    for a, b in zip(grad_of(ours, new), grad_of(trl, new)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("delta", [None, 1.3])
@pytest.mark.parametrize("on_policy", [False, True])
def test_trl_default_grpo_loss_with_kl_is_reproduced(delta, on_policy):
    """TRL defaults (loss_type="dapo", use_bias_correction_kl=True) with beta != 0:
    per_token_loss = -min(coef_1 A, coef_2 A) + beta * k3 * coef_1 (coef_1 taken before the delta cap),
    loss = sum(per_token_loss * mask) / mask.sum(); old log-probs = detached current ones on-policy."""
    old, new, adv, mask, ref = case(3, spread=0.4)
    beta = 0.04
    cfg = ActorConfig(
        policy_loss="vanilla", clip_ratio_low=EPS_LOW, clip_ratio_high=EPS_HIGH, clip_ratio_c=1e9, delta=delta,
        loss_agg_mode="dapo", use_kl_loss=True, kl_loss_type="k3", use_bias_correction_kl=True,
    )  # fmt: skip

    def trl(lp):
        old_lp = lp.detach() if on_policy else old
        coef_1 = torch.exp(lp - old_lp)
        per_token = trl_clipped(coef_1, adv, delta) + beta * trl_k3(lp, ref) * coef_1
        return (per_token * mask).sum() / mask.sum()

    def ours(lp):
        micro = {
            "response_mask": mask,
            "advantages": adv.expand_as(mask),
            "ref_log_probs": ref,
            "old_log_probs": old,
        }
        return actor_objective(
            lp, torch.zeros_like(lp), micro, count_valid(mask), cfg, on_policy=on_policy, kl_coef=beta
        )[0]

    for a, b in zip(grad_of(ours, new), grad_of(trl, new)):
        torch.testing.assert_close(a, b, **TOL)


def test_trl_gspo_with_bias_corrected_kl_uses_the_sequence_ratio():
    """TRL loss_type="grpo", importance_sampling_level="sequence": coef_1 (B, 1) multiplies the
    per-token KL; loss = mean over sequences of the token mean."""
    old, new, adv, mask, ref = case(5, spread=0.3)
    beta = 0.1
    cfg = ActorConfig(
        policy_loss="gspo", clip_ratio_low=EPS_LOW, clip_ratio_high=EPS_HIGH, loss_agg_mode="grpo",
        use_kl_loss=True, kl_loss_type="k3", use_bias_correction_kl=True,
    )  # fmt: skip

    def trl(lp):
        log_w = ((lp - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)
        coef_1 = torch.exp(log_w)
        per_token = trl_clipped(coef_1, adv) + beta * trl_k3(lp, ref) * coef_1
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()

    def ours(lp):
        micro = {
            "response_mask": mask,
            "advantages": adv.expand_as(mask),
            "ref_log_probs": ref,
            "old_log_probs": old,
        }
        return actor_objective(
            lp, torch.zeros_like(lp), micro, count_valid(mask), cfg, on_policy=False, kl_coef=beta
        )[0]

    for a, b in zip(grad_of(ours, new), grad_of(trl, new)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rloo_normalize_advantages_matches_trl(dtype):
    """RLOOTrainer._generate_and_score_completions: TRL groups are a fixed num_generations wide; a
    sample without a scorable sibling is a NaN-padded group. Tidal's group of one is that case."""
    g = torch.Generator().manual_seed(6)
    sizes = [4, 1, 3, 2, 4]
    width = max(sizes)
    grouped = torch.full((len(sizes), width), float("nan"), dtype=torch.float64)
    for i, size in enumerate(sizes):
        grouped[i, :size] = torch.randn(size, generator=g, dtype=torch.float64)
    # TRL's lines: nan-aware leave-one-out baseline, then batch normalisation, then NaN -> 0
    counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)
    trl_adv = (grouped - baselines).view(-1)
    trl_adv = torch.nan_to_num((trl_adv - torch.nanmean(trl_adv)) / (nanstd(trl_adv) + 1e-4), nan=0.0)

    valid = ~torch.isnan(grouped.view(-1))
    scores = grouped.view(-1)[valid].to(dtype)
    labels = [i for i, size in enumerate(sizes) for _ in range(size)]
    mask = torch.ones(len(scores), 3, dtype=dtype)
    rewards = torch.zeros(len(scores), 3, dtype=dtype)
    rewards[:, -1] = scores
    cfg = AlgorithmConfig(advantage_estimator="rloo", rloo_normalize_advantages=True)
    adv, _ = ADVANTAGE_ESTIMATORS.get("rloo")(rewards, mask, group_ids=labels, values=None, config=cfg)
    tol = TOL if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(adv[:, 0], trl_adv[valid].to(dtype), **tol)
