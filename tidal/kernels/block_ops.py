"""The elementwise work on one [n, v] block of logits, in plain torch (CPU, or CUDA without Triton).

`chunked.py` walks the (vocab block, token chunk) grid and does the matmuls; per block it needs

- forward, `stats`: the block's row max m, sum s = sum exp(z - m), q = sum exp(z - m) * (z - m)
  (for the entropy), optionally r = sum exp(2 (z - m)) (for sum_v p_v^2 = r / s^2, which the
  optimal-token-baseline estimators read) and the target's logit where the target falls in the
  block. Blocks of one row are merged with the usual online-softmax rescaling;
- backward, `grad`: dL/d(raw logits) of the block from the saved per-token row max m and
  log s (the log-normaliser is lse = m + log s) and three per-token coefficients a, b, c (see
  `chunked.py`): G = p * ((z - lse) * a + b) + c * onehot(target), p = exp(z - lse), with
  z - lse computed as (z - m) - log s, which keeps log s's low bits when logits are large.

Buffers are allocated once per call and reused for every block, and the math runs in place, so the
only [n, v] memory is two block-sized float32 buffers. z is the logits divided by the temperature,
in float32; for float32 inputs the division is folded into the matmul (`alpha` of addmm).
"""

from __future__ import annotations

import torch


class TorchBlockOps:
    """Per-block softmax statistics and logits gradients in plain torch, with reused buffers."""

    def __init__(
        self, hidden: torch.Tensor, max_rows: int, max_cols: int, temperature: float, with_entropy: bool
    ) -> None:
        self.dtype = hidden.dtype
        self.inv_temp = 1.0 / temperature
        size = max_rows * max_cols
        device = hidden.device
        self._z = torch.empty(size, dtype=torch.float32, device=device)
        # p next to z: the entropy terms need both log p and p at once
        self._p = torch.empty(size, dtype=torch.float32, device=device) if with_entropy else None
        self._raw = (
            torch.empty(size, dtype=self.dtype, device=device) if self.dtype != torch.float32 else None
        )

    def _view(self, flat: torch.Tensor, n: int, v: int) -> torch.Tensor:
        return flat[: n * v].view(n, v)  # a contiguous [n, v] prefix, whatever the block's shape

    def logits(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """z = (h @ w.T) / temperature as float32 [n, v], in a reused buffer."""
        n, v = h.shape[0], w.shape[0]
        z = self._view(self._z, n, v)
        if self._raw is None:
            return torch.addmm(z, h, w.t(), beta=0.0, alpha=self.inv_temp, out=z)
        raw = torch.mm(h, w.t(), out=self._view(self._raw, n, v))  # rounded like the lm_head's output
        return z.copy_(raw).mul_(self.inv_temp)

    def stats(
        self, z: torch.Tensor, local: torch.Tensor, with_entropy: bool, with_squares: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(m, s, q or None, target logit, r or None) per row; `z` is consumed. `local` = target -
        block start; r = sum exp(2 (z - m)) when `with_squares`."""
        v = z.shape[1]
        target = z.gather(1, local.clamp(0, v - 1).unsqueeze(1)).squeeze(1)
        m = z.amax(dim=1)
        u = z.sub_(m.unsqueeze(1))
        if not with_entropy:
            e = u.exp_()
            return m, e.sum(dim=1), None, target, (_row_dot(e, e) if with_squares else None)
        p = torch.exp(u, out=self._view(self._p, *z.shape))
        q = _row_dot(p, u)
        return m, p.sum(dim=1), q, target, (_row_dot(p, p) if with_squares else None)

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
        """G [n, v] in the inputs' dtype; `z` is consumed. a is None when the entropy has no gradient."""
        v = z.shape[1]
        u = z.sub_(row_max.unsqueeze(1)).sub_(log_sum.unsqueeze(1))  # log p
        if a is None:
            g = u.exp_().mul_(b.unsqueeze(1))
        else:
            g = torch.exp(u, out=self._view(self._p, *z.shape))
            g.mul_(torch.addcmul(b.unsqueeze(1), u, a.unsqueeze(1), out=u))
        in_block = (local >= 0) & (local < v)
        g.scatter_add_(1, local.clamp(0, v - 1).unsqueeze(1), torch.where(in_block, c, 0.0).unsqueeze(1))
        if self._raw is None:
            return g
        return self._view(self._raw, *g.shape).copy_(g)


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_j x[i, j] * y[i, j] per row, without an [n, v] product temporary."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1)
