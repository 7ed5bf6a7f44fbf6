"""Per-token log-probabilities (and entropy) from hidden states, without a [T, V] logits tensor.

A policy's log-prob of token t is `log_softmax(h_t @ W.T / temperature)[target_t]`. With a 150k
vocabulary and tens of thousands of tokens per micro-batch the full logits would take tens of GiB,
so `token_log_probs` walks the tokens in chunks: only `chunk_size x V` logits exist at a time.

Under autograd each chunk runs inside activation checkpointing, so backward recomputes the chunk's
logits instead of keeping every chunk's logits alive until backward (which would bring the [T, V]
memory back). `token_log_probs_reference` is the plain full-logits version the tests compare with.

Logits are computed in the inputs' dtype (as the model's own lm_head would) and then upcast to
float32 for the softmax, so bf16 models get fp32 log-probs.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            f"expected hidden [T, H], weight [V, H], targets [T]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[0] != targets.shape[0] or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"targets {tuple(targets.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use 1.0 for greedy sampling), got {temperature}")


def _chunk(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    logits = (hidden @ weight.t()).float()
    if temperature != 1.0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    log_probs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    if not with_entropy:
        return log_probs, None
    # H = logsumexp(z) - sum softmax(z) * z
    entropy = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return log_probs, entropy


def token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(targets) [T] float32 (and entropy [T] float32) of softmax(hidden @ weight.T / temperature)."""
    _check(hidden, weight, targets, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    log_probs, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start : start + chunk_size], weight, targets[start : start + chunk_size])
        if needs_grad:
            lp, ent = checkpoint(_chunk, *args, temperature, with_entropy, use_reentrant=False)
        else:
            lp, ent = _chunk(*args, temperature, with_entropy)
        log_probs.append(lp)
        entropies.append(ent)
    if not log_probs:  # zero tokens
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    out = torch.cat(log_probs)
    return out, (torch.cat(entropies) if with_entropy else None)


def token_log_probs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as `token_log_probs`, with the full [T, V] logits (chunk_size is ignored)."""
    del chunk_size
    _check(hidden, weight, targets, temperature)
    logits = (hidden @ weight.t()).float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    out = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return out, entropy
