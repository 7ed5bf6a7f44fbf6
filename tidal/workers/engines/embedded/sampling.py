"""Next-token sampling: temperature, top-k, top-p, and the behaviour log-prob of the chosen token.

The log-prob returned is the one the trainer must see as the *sampling policy*: log_softmax of the
logits divided by the temperature, over the full vocabulary. Top-k/top-p only restrict which token
may be drawn; they do not renormalise the recorded log-prob, so it stays comparable with the
actor's recomputation (which knows nothing about truncation). Temperature 0 means greedy decoding,
and its log-probs are taken at temperature 1.
"""

from __future__ import annotations

import torch


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits of each row, set the rest to -inf. top_k <= 0 disables."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches `top_p`.

    A token is dropped when the tokens ranked before it already hold at least `top_p` of the mass,
    so the most likely token always survives. top_p >= 1 disables.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of `logits` [B,V]; return (tokens [B] int64, log_probs [B] float32)."""
    logits = logits.float()
    if temperature == 0.0:
        tokens = torch.argmax(logits, dim=-1)
        log_probs = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / temperature
        log_probs = torch.log_softmax(scaled, dim=-1)
        allowed = apply_top_p(apply_top_k(scaled, top_k), top_p)
        tokens = _draw(allowed, generator)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)


def _draw(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # torch.multinomial takes unnormalised weights; softmax of the -inf-masked logits gives exact 0s.
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_next_per_generator(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    draws: list[tuple[torch.Tensor, torch.Generator | None]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_next` for rows that draw from different generators (one per request, continuous.py).

    `draws` lists (row indices, generator) and covers every row once. The filtering is batched;
    only the draw runs per generator, so a row's token depends on its logits and its generator alone.
    """
    if temperature == 0.0:
        return sample_next(logits, temperature, top_k, top_p, None)
    scaled = logits.float() / temperature
    log_probs = torch.log_softmax(scaled, dim=-1)
    probs = torch.softmax(apply_top_p(apply_top_k(scaled, top_k), top_p), dim=-1)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for rows, generator in draws:
        tokens[rows] = torch.multinomial(probs[rows], 1, generator=generator).squeeze(-1)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)
