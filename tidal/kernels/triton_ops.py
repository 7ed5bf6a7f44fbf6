"""The per-block elementwise work of the log-prob kernel as Triton kernels (one pass per block).

Same contract as `TorchBlockOps` (block_ops.py); chunked.py does the matmuls with torch (cuBLAS)
and calls these on each [n, v] block of raw logits, which stay in the inputs' dtype:
- `_stats_kernel`: one program per row reads the row once and keeps an online softmax per lane
  (running max m, sum s of exp(z - m), q = sum exp(z - m) * (z - m), and with WITH_SQUARES
  r = sum exp(2 (z - m)) for sum p^2), then folds the lanes;
- `_grad_kernel`: one program per row overwrites the raw logits with
  G = p * ((z - lse) * a + b) + c * onehot(target), p = exp(z - lse), in the same buffer
  (z - lse as (z - m) - log s, see block_ops.py).
The torch version makes four or five passes over a float32 copy of the block; these make one
(stats) and one read-modify-write (grad) over the 16-bit block, which is what matters on a GPU,
where the elementwise part is bound by memory bandwidth.

Triton decides at import whether its kernels compile for the GPU or run in its interpreter
(TRITON_INTERPRET=1, CPU tensors, slow): the tests import this module with the variable set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stats_kernel(
    z_ptr,
    local_ptr,
    m_ptr,
    s_ptr,
    q_ptr,
    target_ptr,
    r_ptr,
    num_cols,
    row_stride,
    inv_temp,
    WITH_ENTROPY: tl.constexpr,
    WITH_SQUARES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * row_stride
    offs = tl.arange(0, BLOCK)
    # a finite "minus infinity": lanes that have seen no column yet rescale by exp(-huge) = 0
    # without the -inf - -inf = nan that a true -inf start would need guarding against
    m = tl.full([BLOCK], -1e30, tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    q = tl.zeros([BLOCK], tl.float32)
    r = tl.zeros([BLOCK], tl.float32)
    for start in range(0, num_cols, BLOCK):
        cols = start + offs
        valid = cols < num_cols
        x = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
        new_m = tl.maximum(m, x)
        dm = m - new_m
        scale = tl.exp(dm)
        u = tl.where(valid, x - new_m, 0.0)
        p = tl.where(valid, tl.exp(u), 0.0)
        if WITH_ENTROPY:
            q = scale * (q + dm * s) + p * u
        if WITH_SQUARES:
            r = scale * scale * r + p * p
        s = scale * s + p
        m = new_m
    row_max = tl.max(m, axis=0)
    d = m - row_max
    scale = tl.exp(d)
    tl.store(m_ptr + row, row_max)
    tl.store(s_ptr + row, tl.sum(scale * s, axis=0))
    if WITH_ENTROPY:
        tl.store(q_ptr + row, tl.sum(scale * (q + d * s), axis=0))
    if WITH_SQUARES:
        tl.store(r_ptr + row, tl.sum(scale * scale * r, axis=0))
    target = tl.load(local_ptr + row)
    in_block = (target >= 0) & (target < num_cols)
    value = tl.load(base + tl.where(in_block, target, 0)).to(tl.float32) * inv_temp
    tl.store(target_ptr + row, tl.where(in_block, value, 0.0))


@triton.jit
def _grad_kernel(
    z_ptr,
    local_ptr,
    max_ptr,
    log_sum_ptr,
    a_ptr,
    b_ptr,
    c_ptr,
    num_cols,
    row_stride,
    inv_temp,
    WITH_ENTROPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * row_stride
    offs = tl.arange(0, BLOCK)
    row_max = tl.load(max_ptr + row)
    log_sum = tl.load(log_sum_ptr + row)
    b = tl.load(b_ptr + row)
    c = tl.load(c_ptr + row)
    target = tl.load(local_ptr + row)
    if WITH_ENTROPY:
        a = tl.load(a_ptr + row)
    for start in range(0, num_cols, BLOCK):
        cols = start + offs
        valid = cols < num_cols
        u = (tl.load(base + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp - row_max) - log_sum
        p = tl.exp(u)
        if WITH_ENTROPY:
            g = p * (u * a + b)
        else:
            g = p * b
        g = tl.where(cols == target, g + c, g)
        tl.store(base + cols, g.to(z_ptr.dtype.element_ty), mask=valid)


def _launch_shape(num_cols: int, interpret: bool) -> tuple[int, int]:
    """(BLOCK, num_warps): wide vectors on a GPU; the interpreter runs numpy, any width is fine."""
    block = min(triton.next_power_of_2(num_cols), 1024 if interpret else 4096)
    return block, (4 if block <= 1024 else 8)


class TritonBlockOps:
    """Per-block softmax statistics and logits gradients as Triton kernels, on 16-bit or fp32 blocks."""

    def __init__(
        self, hidden: torch.Tensor, max_rows: int, max_cols: int, temperature: float, with_entropy: bool
    ) -> None:
        del with_entropy  # the kernels need no extra buffer for it
        self.inv_temp = 1.0 / temperature
        self.interpret = hidden.device.type != "cuda"
        self._raw = torch.empty(max_rows * max_cols, dtype=hidden.dtype, device=hidden.device)

    def logits(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Raw logits h @ w.T in the inputs' dtype (the temperature is applied in the kernels)."""
        n, v = h.shape[0], w.shape[0]
        return torch.mm(h, w.t(), out=self._raw[: n * v].view(n, v))

    def stats(
        self, z: torch.Tensor, local: torch.Tensor, with_entropy: bool, with_squares: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        n, v = z.shape
        m, s, q, target, r = torch.empty(5, n, dtype=torch.float32, device=z.device)
        block, warps = _launch_shape(v, self.interpret)
        _stats_kernel[(n,)](
            z, local.contiguous(), m, s, q, target, r, v, z.stride(0), self.inv_temp,
            WITH_ENTROPY=with_entropy, WITH_SQUARES=with_squares, BLOCK=block, num_warps=warps,
        )  # fmt: skip
        return m, s, (q if with_entropy else None), target, (r if with_squares else None)

    def grad(
        self,
        z: torch.Tensor,
        local: torch.Tensor,
        row_max: torch.Tensor,
        log_sum: torch.Tensor,
        a: torch.Tensor | None,
        b: torch.Tensor,
        c: torch.Tensor,
    ) -> torch.Tensor:
        n, v = z.shape
        block, warps = _launch_shape(v, self.interpret)
        _grad_kernel[(n,)](
            z, local.contiguous(), row_max.contiguous(), log_sum.contiguous(), a if a is not None else b, b.contiguous(),
            c.contiguous(), v, z.stride(0), self.inv_temp,
            WITH_ENTROPY=a is not None, BLOCK=block, num_warps=warps,
        )  # fmt: skip
        return z
