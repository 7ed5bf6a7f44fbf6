"""Entropy of the categorical distribution given by logits, per position."""

from __future__ import annotations

import torch


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) over the last dim, shape logits.shape[:-1].

    Computed as -sum p * log_softmax(logits) rather than verl's logsumexp(z) - sum p * z: the two are
    equal in exact arithmetic, but log_softmax avoids cancelling two large numbers when logits are
    big, and zero-probability entries (logits of -inf, e.g. after top-k masking) contribute exactly 0
    with finite gradients instead of 0 * inf = NaN.
    """
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    # Where p == 0, log p is -inf; replace it before the product so neither value nor grad is NaN.
    safe_log_p = torch.where(p > 0, log_p, torch.zeros((), dtype=log_p.dtype, device=log_p.device))
    return -(p * safe_log_p).sum(dim=-1)
