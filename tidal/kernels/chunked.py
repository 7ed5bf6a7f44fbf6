"""Log-probs and entropies over a grid of [token chunk x vocab block] logits, forward and backward.

With z = hidden @ weight.T / temperature, p = softmax(z), lse = logsumexp(z), for each token:
    log_prob = z[target] - lse,  entropy = lse - sum(p * z),  sum_pi_squared = sum(p^2).
Forward walks vocab blocks (outer) and token chunks (inner), merging each block's row statistics
with the online-softmax rescaling, and keeps only the row max m, log s (lse = m + log s) and the
entropy per token ([T] float32 each). sum(p^2) = sum exp(2 (z - m)) / s^2 is merged the same way
(its terms rescale by exp(2 (m - m'))); it is a statistic of the sampling policy for the
advantage estimators, so it is an output without a gradient.

Backward recomputes each block's logits instead of keeping them. For upstream gradients g_lp and
g_ent (per token), the gradient with respect to the raw logits (hidden @ weight.T) is
    G = [g_lp * (onehot - p) - g_ent * p * (z - sum(p * z))] / temperature
      = p * ((z - lse) * a + b) + c * onehot,
    a = -g_ent / temperature,  b = -(g_lp + g_ent * entropy) / temperature,  c = g_lp / temperature
(z - sum(p z) = (z - lse) + entropy; z - lse is taken as (z - m) - log s, which keeps the low bits
of log s when logits are large). Then grad_hidden += G @ W_block, grad_weight_block += G.T @ h.
Vocab-outer order lets a 16-bit weight's gradient accumulate in float32 one vocab block at a time
instead of in a [V, H] float32 buffer. So at most one block of logits exists at any moment: memory
is O(block + T x H + V x H for the weight gradient), never O(T x V).

Matmul work is 4 x (2 T V H) against 3 x for autograd over full logits (the recompute); the
elementwise work runs on cache-sized blocks in place. The per-block elementwise ops are
pluggable (`BlockOps`): plain torch (block_ops.py) or Triton kernels (triton_ops.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch


class BlockOps(Protocol):
    """The elementwise half of the kernel; see block_ops.py for the contract of each method."""

    def logits(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor: ...

    def stats(
        self, z: torch.Tensor, local: torch.Tensor, with_entropy: bool, with_squares: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]: ...

    def grad(
        self,
        z: torch.Tensor,
        local: torch.Tensor,
        row_max: torch.Tensor,
        log_sum: torch.Tensor,
        a: torch.Tensor | None,
        b: torch.Tensor,
        c: torch.Tensor,
    ) -> torch.Tensor: ...


# (hidden, max rows, max cols, temperature, entropy buffers) -> ops
MakeOps = Callable[[torch.Tensor, int, int, float, bool], BlockOps]


Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _merge(acc: Stats, block: Stats) -> None:
    """Fold a block's (m, s, q, r) into the running (m, s, q, r) of the same rows, in place.

    Re-referencing sum exp(z - m) * (z - m) from m to m' gives exp(m - m') * (q + (m - m') * s);
    r = sum exp(2 (z - m)) picks up exp(m - m') squared.
    """
    m, s, q, r = acc
    bm, bs, bq, br = block
    new_m = torch.maximum(m, bm)
    dm, dbm = m - new_m, bm - new_m
    ra, rb = dm.exp(), dbm.exp()
    if q is not None:
        q.copy_(ra * (q + dm * s) + rb * (bq + dbm * bs))
    if r is not None:
        r.copy_(ra.square() * r + rb.square() * br)
    s.copy_(ra * s + rb * bs)
    m.copy_(new_m)


def _forward(
    ops: BlockOps,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    with_entropy: bool,
    token_chunk: int,
    vocab_chunk: int,
    with_squares: bool = False,
) -> tuple[torch.Tensor, ...]:
    """(log_probs, row max m, log s, entropy or None, sum p^2 or None), all float32 [T];
    lse = m + log s."""
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    f32 = {"dtype": torch.float32, "device": hidden.device}
    m, s, target_logit = (torch.empty(num_tokens, **f32) for _ in range(3))
    q = torch.empty(num_tokens, **f32) if with_entropy else None
    r = torch.empty(num_tokens, **f32) if with_squares else None
    for v0 in range(0, vocab, vocab_chunk):
        w = weight[v0 : v0 + vocab_chunk]
        for t0 in range(0, num_tokens, token_chunk):
            rows = slice(t0, t0 + token_chunk)
            local = targets[rows] - v0
            z = ops.logits(hidden[rows], w)
            bm, bs, bq, bt, br = ops.stats(z, local, with_entropy, with_squares)
            running = tuple(x[rows] if x is not None else None for x in (m, s, q, r))
            if v0 == 0:  # the first block initialises every row (no -inf rescaling)
                for dst, src in zip(running, (bm, bs, bq, br), strict=True):
                    if dst is not None:
                        dst.copy_(src)
            else:
                _merge(running, (bm, bs, bq, br))
            in_block = (local >= 0) & (local < w.shape[0])
            target_logit[rows] = torch.where(in_block, bt, target_logit[rows])
    log_s = s.log()
    entropy = log_s - q / s if q is not None else None
    # r / s^2 in (0, 1]: both are sums relative to the row max, so neither over- nor underflows
    sum_squares = r / s.square() if r is not None else None
    # (z_target - m) - log s, not z_target - (m + log s): m + log s would round log s to the
    # precision of m (float32 logits in the hundreds keep ~1e-5 of it)
    return (target_logit - m) - log_s, m, log_s, entropy, sum_squares


def _accumulate(acc: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """acc += x @ y, without a temporary when the dtypes allow it."""
    if acc.dtype == x.dtype:
        acc.addmm_(x, y)
    else:
        acc.add_(x @ y)


def _backward(
    ops: BlockOps,
    saved: tuple[torch.Tensor, ...],
    coefs: tuple[torch.Tensor | None, torch.Tensor, torch.Tensor],
    needs: tuple[bool, bool],
    token_chunk: int,
    vocab_chunk: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    hidden, weight, targets, row_max, log_sum = saved
    a, b, c = coefs
    need_h, need_w = needs
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    exact = hidden.dtype == torch.float32  # accumulate straight into the outputs
    f32 = {"dtype": torch.float32, "device": hidden.device}
    grad_h = torch.zeros(num_tokens, hidden.shape[1], **f32) if need_h else None
    grad_w = (torch.zeros_like if exact else torch.empty_like)(weight) if need_w else None
    w_acc = torch.empty(vocab_chunk, weight.shape[1], **f32) if need_w and not exact else None
    for v0 in range(0, vocab, vocab_chunk):
        w = weight[v0 : v0 + vocab_chunk]
        gw = None
        if need_w:
            gw = grad_w[v0 : v0 + vocab_chunk] if exact else w_acc[: w.shape[0]].zero_()
        for t0 in range(0, num_tokens, token_chunk):
            rows = slice(t0, t0 + token_chunk)
            h = hidden[rows]
            z = ops.logits(h, w)
            a_rows = a[rows] if a is not None else None
            g = ops.grad(z, targets[rows] - v0, row_max[rows], log_sum[rows], a_rows, b[rows], c[rows])
            if grad_h is not None:
                _accumulate(grad_h[rows], g, w)
            if gw is not None:
                _accumulate(gw, g.t(), h)
        if gw is not None and not exact:
            grad_w[v0 : v0 + vocab_chunk].copy_(gw)
    return (grad_h.to(hidden.dtype) if grad_h is not None else None), grad_w


class ChunkedLogProbs(torch.autograd.Function):
    """autograd.Function over `_forward` / `_backward`; saves inputs and [T] statistics only."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        with_entropy: bool,
        token_chunk: int,
        vocab_chunk: int,
        make_ops: MakeOps,
        with_squares: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        rows, cols = min(token_chunk, hidden.shape[0]), min(vocab_chunk, weight.shape[0])
        ops = make_ops(hidden, rows, cols, temperature, with_entropy)
        log_probs, row_max, log_sum, entropy, sum_squares = _forward(
            ops, hidden, weight, targets, with_entropy, token_chunk, vocab_chunk, with_squares
        )
        ctx.save_for_backward(hidden, weight, targets, row_max, log_sum, entropy)
        ctx.config = (temperature, token_chunk, vocab_chunk, make_ops)
        ctx.set_materialize_grads(False)  # None upstream gradients let backward skip work
        if sum_squares is not None:
            ctx.mark_non_differentiable(sum_squares)  # a statistic of the policy, not a loss term
        return log_probs, entropy, sum_squares

    @staticmethod
    def backward(
        ctx: Any, grad_lp: torch.Tensor | None, grad_ent: torch.Tensor | None, _grad_sq: None = None
    ) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, row_max, log_sum, entropy = ctx.saved_tensors
        temperature, token_chunk, vocab_chunk, make_ops = ctx.config
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        none = (None,) * 7
        if (grad_lp is None and grad_ent is None) or not any(needs):
            return None, None, *none
        inv_temp = 1.0 / temperature
        c = grad_lp.float() * inv_temp if grad_lp is not None else torch.zeros_like(log_sum)
        if grad_ent is None:
            a, b = None, -c
        else:
            a = grad_ent.float() * -inv_temp
            b = a * entropy - c
        rows, cols = min(token_chunk, hidden.shape[0]), min(vocab_chunk, weight.shape[0])
        ops = make_ops(hidden, rows, cols, temperature, a is not None)
        grad_h, grad_w = _backward(
            ops, (hidden, weight, targets, row_max, log_sum), (a, b, c), needs, token_chunk, vocab_chunk
        )
        return grad_h, grad_w, *none
