"""KDRL (Xu et al. 2025, arXiv 2506.02208): on-policy distillation added to the GRPO objective.

    J_KDRL = J_GRPO - beta * KL(pi_student || pi_teacher),   i.e.   loss = pg_loss + beta * kl_loss

The reverse KL is estimated per token on the student's own samples, so it teaches the student
where IT goes wrong (mode seeking) instead of imitating teacher text (forward KL = SFT). The
teacher's log-probs of the sampled tokens come from the reference slot (`ref_log_probs`;
`reference.model_path` loads the teacher there). Two refinements from the paper:
- k2 (0.5 * (log pi - log pi_T)^2) is the default estimator: its gradient is the true
  reverse-KL gradient, unlike k3's;
- reward-guided masking: responses already judged correct (reward >= `correct_threshold`) get no
  KD term, so the teacher only pulls where the student failed;
and beta is annealed (5e-3 -> 1e-3 in the paper) with `kdrl_beta`.
"""

from __future__ import annotations

import torch

from tidal.algorithms.aggregation import Denominator, aggregate_loss
from tidal.algorithms.filters import linear_schedule
from tidal.algorithms.masked import masked_mean
from tidal.registry import KL_ESTIMATORS


def kdrl_beta(step: int, *, beta_start: float = 5e-3, beta_end: float = 1e-3, anneal_steps: int) -> float:
    """The annealed KL coefficient at `step`: linear from beta_start to beta_end over anneal_steps."""
    if beta_start < 0 or beta_end < 0:
        raise ValueError(f"kdrl beta_start={beta_start} and beta_end={beta_end} must be >= 0")
    return linear_schedule(step, start=beta_start, end=beta_end, num_steps=anneal_steps)


def kdrl_kl_loss(
    log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    estimator: str = "k2",
    loss_agg_mode: str = "token-mean",
    denominator: Denominator = None,
    seq_reward: torch.Tensor | None = None,
    correct_threshold: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The reverse-KL term (before beta) and metrics; add `beta * kl_loss` to the policy loss.

    `log_probs` [N, R] carry the gradient (student); `teacher_log_probs` are constants.
    With `correct_threshold` set (needs `seq_reward` [N]), rows with seq_reward >= threshold
    contribute zero; they still count in the denominator, so beta keeps its per-token meaning
    whether or not a row is masked. `denominator`: the global counts of `response_mask`, as for
    the policy loss. `weights` [N, R] multiply each token's KL, gradient kept (TRL's bias-corrected
    KL passes the ratio pi / pi_old). Metrics: kdrl/kl (mean unweighted KL over all valid tokens),
    kdrl/masked_fraction.
    """
    if log_probs.shape != teacher_log_probs.shape or log_probs.shape != response_mask.shape:
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)}, teacher_log_probs {tuple(teacher_log_probs.shape)} and "
            f"response_mask {tuple(response_mask.shape)} must have the same [N, R] shape"
        )
    kl = KL_ESTIMATORS.get(estimator)(log_probs, teacher_log_probs.detach())
    kd_rows = torch.ones(len(log_probs), dtype=log_probs.dtype, device=log_probs.device)
    if correct_threshold is not None:
        if seq_reward is None:
            raise ValueError("kdrl reward-guided masking (correct_threshold set) needs seq_reward [N]")
        kd_rows = (seq_reward < correct_threshold).to(log_probs.dtype)
    weighted_kl = kl if weights is None else kl * weights
    kl_loss = aggregate_loss(weighted_kl * kd_rows.unsqueeze(-1), response_mask, loss_agg_mode, denominator)
    with torch.no_grad():
        metrics = {
            "kdrl/kl": float(masked_mean(kl, response_mask)),
            "kdrl/masked_fraction": float(1 - kd_rows.mean()) if len(kd_rows) else 0.0,
        }
    return kl_loss, metrics
