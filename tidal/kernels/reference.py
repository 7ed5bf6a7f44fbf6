"""The plain full-logits log-prob / entropy, and the argument checks every implementation shares.

`token_log_probs_reference` builds the whole [T, V] logits tensor and lets autograd differentiate
it: the simplest correct version, used by the tests as ground truth and by the benchmark as the
naive path. Never call it on a real vocabulary in training (150k x 8k tokens is ~5 GB in fp32).

Semantics every implementation follows: logits are computed in the inputs' dtype (as the model's
own lm_head would), upcast to float32, divided by the temperature; log-probs and entropies are
float32. Tokens where `mask` is False get log-prob 0 and entropy 0, and no gradient.
"""

from __future__ import annotations

import torch


def check_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> None:
    """Raise ValueError naming the argument when shapes, dtypes or the temperature are wrong."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"expected hidden [T, H], weight [V, H], targets [T]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[0] != targets.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}; need hidden [T, H], weight [V, H], targets [T]"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one so both match "
            "(the lm_head computes in one dtype)"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 token ids, got {targets.dtype}")
    if mask is not None and (mask.shape != targets.shape or mask.dtype != torch.bool):
        raise ValueError(
            f"mask must be a bool tensor shaped like targets {tuple(targets.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use 1.0 for greedy sampling), got {temperature}")


def token_log_probs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    *,
    mask: torch.Tensor | None = None,
    with_sum_pi_squared: bool = False,
    **_ignored: object,
) -> tuple[torch.Tensor, ...]:
    """Same contract as `token_log_probs`, with the full [T, V] logits (chunk options are ignored)."""
    del chunk_size
    check_inputs(hidden, weight, targets, temperature, mask)
    logits = (hidden @ weight.t()).float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    out = log_probs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    squares = log_probs.detach().exp().square().sum(-1) if with_sum_pi_squared else None
    if mask is not None:
        out = torch.where(mask, out, 0.0)
        entropy = torch.where(mask, entropy, 0.0) if entropy is not None else None
        squares = torch.where(mask, squares, 0.0) if squares is not None else None
    return (out, entropy, squares) if with_sum_pi_squared else (out, entropy)
