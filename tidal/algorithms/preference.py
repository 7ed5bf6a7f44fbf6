"""Offline losses on pairs of responses to one prompt: a preferred ("chosen", positive) and a
dispreferred ("rejected", negative) one. Registered by name in `PREFERENCE_LOSSES`:

    fn(chosen_log_probs [N, R], chosen_mask [N, R], rejected_log_probs [N, R'], rejected_mask [N, R'],
       *, ref_chosen_log_probs=None, ref_rejected_log_probs=None, denominator=None, **params)
        -> (loss: scalar tensor, metrics: dict[str, float])

Log-probs are per token (the actor's `compute_log_probs` output), carrying the gradient; `ref_*`
are the frozen reference model's (DPO only). Row i of chosen and rejected form pair i. The loss is
a SUM over pairs divided by `denominator`, the number of pairs in the whole mini-batch (None: this
piece's N), so micro-batches and ranks add up to the mini-batch loss as in `aggregation.py`.
`sft_loss` is REDI's first stage (plain SFT on the positive traces).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from tidal.algorithms.aggregation import Denominator, aggregate_loss
from tidal.algorithms.masked import masked_sum

PreferenceLossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]

PairDenominator = float | int | torch.Tensor | None


def sequence_log_probs(log_probs: torch.Tensor, mask: torch.Tensor, length_normalise: bool) -> torch.Tensor:
    """log pi(y|x) per row [N] (sum over valid tokens), or its mean per token when `length_normalise`."""
    if log_probs.dim() != 2 or log_probs.shape != mask.shape:
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)} and mask {tuple(mask.shape)} must both be [N, R]"
        )
    mask = mask.to(log_probs.dtype)
    total = masked_sum(log_probs, mask, dim=-1)
    return total / mask.sum(dim=-1).clamp(min=1) if length_normalise else total


def _reduce(losses: torch.Tensor, denominator: PairDenominator) -> torch.Tensor:
    if denominator is None:
        return losses.sum() / max(len(losses), 1)
    if isinstance(denominator, torch.Tensor):
        return losses.sum() / denominator.clamp(min=1)
    return losses.sum() / max(float(denominator), 1.0)


def _check_pairs(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if len(chosen) != len(rejected):
        raise ValueError(
            f"{len(chosen)} chosen and {len(rejected)} rejected responses: give one rejected per chosen (pairs)"
        )


def _sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): eps > 0 assumes that fraction of labels is flipped."""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing={label_smoothing} must be in [0, 0.5) (the assumed label-noise rate)"
        )
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        if not len(chosen_rewards):
            return {}
        margin = chosen_rewards - rejected_rewards
        return {
            "preference/chosen_reward": float(chosen_rewards.mean()),
            "preference/rejected_reward": float(rejected_rewards.mean()),
            "preference/margin": float(margin.mean()),
            "preference/accuracy": float((margin > 0).float().mean()),
        }


def dpo(
    chosen_log_probs: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_log_probs: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    ref_chosen_log_probs: torch.Tensor | None = None,
    ref_rejected_log_probs: torch.Tensor | None = None,
    denominator: PairDenominator = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290): -log sigmoid(beta * (h_chosen - h_rejected)).

    h = log pi(y|x) - log pi_ref(y|x) (summed over tokens) is the implicit reward / beta; the loss
    is the Bradley-Terry likelihood of the preference under that reward, so no reward model or
    sampling is needed. `label_smoothing` > 0 is conservative DPO (cDPO).
    """
    if ref_chosen_log_probs is None or ref_rejected_log_probs is None:
        raise ValueError("dpo needs ref_chosen_log_probs and ref_rejected_log_probs (enable the reference)")
    _check_pairs(chosen_log_probs, rejected_log_probs)
    chosen = sequence_log_probs(chosen_log_probs, chosen_mask, False)
    rejected = sequence_log_probs(rejected_log_probs, rejected_mask, False)
    chosen_rewards = beta * (chosen - sequence_log_probs(ref_chosen_log_probs.detach(), chosen_mask, False))
    rejected_rewards = beta * (
        rejected - sequence_log_probs(ref_rejected_log_probs.detach(), rejected_mask, False)
    )
    losses = _sigmoid_loss(chosen_rewards - rejected_rewards, label_smoothing)
    return _reduce(losses, denominator), _pair_metrics(chosen_rewards, rejected_rewards)


def simpo(
    chosen_log_probs: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_log_probs: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    ref_chosen_log_probs: torch.Tensor | None = None,
    ref_rejected_log_probs: torch.Tensor | None = None,
    denominator: PairDenominator = None,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SimPO (Meng et al. 2024, arXiv 2405.14734): -log sigmoid(beta * (avg_c - avg_r) - gamma).

    avg = mean token log-prob of the response: the reward is the length-normalised likelihood the
    policy generates with, so no reference model is needed and long responses gain no edge; the
    margin gamma asks the chosen response to win by a gap. Reference log-probs are ignored.
    """
    _check_pairs(chosen_log_probs, rejected_log_probs)
    chosen_rewards = beta * sequence_log_probs(chosen_log_probs, chosen_mask, True)
    rejected_rewards = beta * sequence_log_probs(rejected_log_probs, rejected_mask, True)
    losses = _sigmoid_loss(chosen_rewards - rejected_rewards - gamma, label_smoothing)
    return _reduce(losses, denominator), _pair_metrics(chosen_rewards, rejected_rewards)


def redi(
    chosen_log_probs: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_log_probs: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    ref_chosen_log_probs: torch.Tensor | None = None,
    ref_rejected_log_probs: torch.Tensor | None = None,
    denominator: PairDenominator = None,
    alpha: float = 0.8,
) -> tuple[torch.Tensor, dict[str, float]]:
    """REDI stage 2 (Xu et al. 2025, "Harnessing Negative Signals", arXiv 2505.24850).

    loss = -log pi(y+)/|y+| + alpha * log pi(y-)/|y-|: reference-free, each term normalised by its
    own length. Pushing down a negative trace is unbounded (its log-prob can go to -inf) and drags
    shared tokens with it, so the negative term is down-weighted: alpha < 1 (paper: 0.8) keeps
    training stable; alpha = 1 is the symmetric objective the paper shows collapsing. Run stage 1
    (`sft_loss` on positive traces) first. Reference log-probs are ignored.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(
            f"redi alpha={alpha} must be in [0, 1] (the weight of the negative term; 0.8 typical)"
        )
    _check_pairs(chosen_log_probs, rejected_log_probs)
    positive = sequence_log_probs(chosen_log_probs, chosen_mask, True)
    negative = sequence_log_probs(rejected_log_probs, rejected_mask, True)
    losses = -positive + alpha * negative
    with torch.no_grad():
        metrics = _pair_metrics(positive, negative) if len(losses) else {}
        metrics = {key.replace("_reward", "_log_prob"): value for key, value in metrics.items()}
    return _reduce(losses, denominator), metrics


def sft_loss(
    log_probs: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", denominator: Denominator = None
) -> torch.Tensor:
    """Negative log-likelihood of the target tokens, aggregated like the RL losses.

    REDI stage 1 (and plain SFT): token-mean over the positive traces by default.
    """
    return aggregate_loss(-log_probs, mask, mode, denominator)
