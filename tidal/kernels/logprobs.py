"""Per-token log-probabilities (and entropy) from hidden states, without a [T, V] logits tensor.

A policy's log-prob of token t is `log_softmax(h_t @ W.T / temperature)[target_t]`. With a 150k
vocabulary and thousands of tokens per micro-batch the full logits (and autograd's copies of them)
would take tens of GiB, so `token_log_probs` computes blocks of [token chunk x vocab block] logits
at a time and recomputes them in backward (chunked.py): forward and backward hold one block.

Two implementations of the per-block elementwise work share that loop:
- "torch" (block_ops.py): plain torch, in place on reused buffers. The default off CUDA.
- "triton" (triton_ops.py): one fused pass per block. The default on CUDA when Triton is
  installed; on CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1), for tests.
`token_log_probs_reference` (reference.py) is the plain full-logits version the tests compare with.

`with_sum_pi_squared=True` adds a third output, sum_v p(v)^2 per token (no gradient), which the
optimal-token-baseline advantage estimators need; it costs one more row sum per block.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

from tidal.kernels.block_ops import TorchBlockOps
from tidal.kernels.chunked import ChunkedLogProbs, MakeOps
from tidal.kernels.reference import check_inputs, token_log_probs_reference

Backend = Literal["auto", "torch", "triton"]

# Block shapes (tokens x vocab). CPU: a float32 block of 1024 x 2048 (8 MiB) keeps the in-place
# elementwise passes near the last-level cache while the matmuls stay large enough to run at full
# speed; shapes from 512 x 1024 to 2048 x 8192 measured within noise of each other at one thread
# (benchmarks/logprob_kernel.py). CUDA: larger blocks keep the GPU busy; 4096 x 16384 in bf16 is
# 128 MiB (a first guess: not yet timed on a GPU).
DEFAULT_CHUNKS = {"cpu": (1024, 2048), "cuda": (4096, 16384)}

__all__ = ["token_log_probs", "token_log_probs_reference", "resolve_backend", "triton_available"]


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: Backend, device: torch.device) -> Literal["torch", "triton"]:
    """The implementation to run on `device`: Triton on CUDA when installed, torch elsewhere."""
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "torch":
        return "torch"
    if backend != "triton":
        raise ValueError(f"backend={backend!r} is not one of 'auto', 'torch', 'triton'")
    if not triton_available():
        raise ValueError(
            "backend='triton' needs the triton package: pip install triton, or use backend='torch'"
        )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"backend='triton' on {device.type} tensors runs only under Triton's interpreter: set "
            "TRITON_INTERPRET=1 before importing tidal.kernels.triton_ops, or use backend='torch'"
        )
    return "triton"


def _make_ops(name: str) -> MakeOps:
    if name == "triton":
        from tidal.kernels.triton_ops import TritonBlockOps  # imports triton: only when asked for

        return TritonBlockOps
    return TorchBlockOps


def token_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
    *,
    vocab_chunk_size: int | None = None,
    mask: torch.Tensor | None = None,
    backend: Backend = "auto",
    with_sum_pi_squared: bool = False,
) -> tuple[torch.Tensor, ...]:
    """log p(targets) [T] float32 (and entropy [T] float32) of softmax(hidden @ weight.T / temperature).

    hidden [T, H] and weight [V, H] (the lm_head, or the tied input embedding) share a dtype;
    targets [T] are token ids in [0, V). `chunk_size` tokens x `vocab_chunk_size` vocabulary
    entries is the largest block of logits that exists at once (defaults per device in
    DEFAULT_CHUNKS). Tokens where `mask` is False are skipped: log-prob and entropy 0, no gradient.
    Differentiable with respect to hidden and weight. With `with_sum_pi_squared` the result is
    (log_probs, entropy, sum_pi_squared [T] float32, 0 where masked, no gradient); without it the
    pair (log_probs, entropy) as before.
    """
    check_inputs(hidden, weight, targets, temperature, mask)
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 (or None for the default), got {value}")
    if mask is not None:
        index = mask.nonzero().squeeze(1)
        kept = token_log_probs(
            hidden.index_select(0, index),
            weight,
            targets.index_select(0, index),
            temperature,
            with_entropy,
            chunk_size,
            vocab_chunk_size=vocab_chunk_size,
            backend=backend,
            with_sum_pi_squared=with_sum_pi_squared,
        )
        zeros = kept[0].new_zeros(targets.shape[0])
        return tuple(zeros.index_put((index,), x) if x is not None else None for x in kept)
    if targets.numel():
        low, high = torch.aminmax(targets)
        if low < 0 or high >= weight.shape[0]:
            raise ValueError(
                f"targets must be token ids in [0, {weight.shape[0]}), got ids in [{low}, {high}]"
            )
    name = resolve_backend(backend, hidden.device)
    default_tokens, default_vocab = DEFAULT_CHUNKS["cuda" if hidden.device.type == "cuda" else "cpu"]
    log_probs, entropy, sum_squares = ChunkedLogProbs.apply(
        hidden,
        weight,
        targets.long(),
        float(temperature),
        with_entropy,
        chunk_size or default_tokens,
        vocab_chunk_size or default_vocab,
        _make_ops(name),
        with_sum_pi_squared,
    )
    return (log_probs, entropy, sum_squares) if with_sum_pi_squared else (log_probs, entropy)
