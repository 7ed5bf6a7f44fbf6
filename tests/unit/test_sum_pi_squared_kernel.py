"""sum_v p(v)^2 from the chunked log-prob kernel (torch block ops) against softmax(logits)^2 summed.

The statistic the optimal-token-baseline estimators read: checked on float32 and float64 inputs,
many block shapes (so the online rescaling across vocab blocks is exercised), large logits, masks,
that it carries no gradient while log-probs keep theirs, and that no [T x V] tensor appears.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tidal.kernels import token_log_probs, token_log_probs_reference


def _inputs(num_tokens, hidden, vocab, seed, scale, dtype):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(num_tokens, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * scale
    t = torch.randint(0, vocab, (num_tokens,), generator=gen)
    return h.to(dtype), w.to(dtype), t


def _naive(h, w, temperature):
    """Ground truth in float64 from the full logits."""
    return torch.softmax((h.double() @ w.double().t()) / temperature, dim=-1).square().sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunks", [(1, 1), (3, 7), (8, 64), (64, 1000)])
@pytest.mark.parametrize("scale", [0.3, 3.0])  # near-uniform and peaked distributions
def test_kernel_matches_naive_softmax_squares(dtype, chunks, scale):
    h, w, t = _inputs(29, 12, 157, seed=chunks[1], scale=scale, dtype=dtype)
    lp, ent, sq = token_log_probs(
        h, w, t, 0.7, True, chunks[0], vocab_chunk_size=chunks[1], with_sum_pi_squared=True
    )
    assert sq.dtype == torch.float32 and sq.shape == (29,)
    torch.testing.assert_close(sq.double(), _naive(h, w, 0.7), rtol=2e-6, atol=1e-7)
    ref = token_log_probs_reference(h, w, t, 0.7, True, with_sum_pi_squared=True)
    torch.testing.assert_close(sq, ref[2], rtol=1e-5, atol=1e-6)  # both float32
    # the other outputs are unchanged by asking for the statistic
    lp2, ent2 = token_log_probs(h, w, t, 0.7, True, chunks[0], vocab_chunk_size=chunks[1])
    assert torch.equal(lp, lp2) and torch.equal(ent, ent2)


def test_bounds_and_large_logits():
    # logits in the hundreds: the per-block sums are taken relative to the row max, so no overflow
    h, w, t = _inputs(16, 8, 300, seed=1, scale=40.0, dtype=torch.float32)
    _, _, sq = token_log_probs(h, w, t, 1.0, False, 5, vocab_chunk_size=32, with_sum_pi_squared=True)
    assert torch.isfinite(sq).all()
    assert (sq >= 1.0 / 300 - 1e-7).all() and (sq <= 1.0 + 1e-6).all()
    torch.testing.assert_close(sq.double(), _naive(h, w, 1.0), rtol=1e-5, atol=1e-6)
    # a uniform distribution: exactly 1 / V
    uniform = token_log_probs(
        torch.zeros(3, 4), torch.randn(50, 4), t[:3] % 50, with_sum_pi_squared=True, vocab_chunk_size=7
    )[2]
    torch.testing.assert_close(uniform, torch.full((3,), 1 / 50))


def test_masked_tokens_are_zero_and_statistic_has_no_gradient():
    h, w, t = _inputs(10, 6, 40, seed=2, scale=1.0, dtype=torch.float32)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    hh = h.clone().requires_grad_()
    lp, ent, sq = token_log_probs(
        hh, w, t, 1.0, False, 3, vocab_chunk_size=9, mask=mask, with_sum_pi_squared=True
    )
    assert ent is None and not sq.requires_grad and lp.requires_grad
    assert (sq[~mask] == 0).all()
    torch.testing.assert_close(sq[mask].double(), _naive(h, w, 1.0)[mask], rtol=2e-6, atol=1e-7)
    lp.sum().backward()  # the log-prob gradient still flows with the extra output present
    assert hh.grad is not None and (hh.grad[~mask] == 0).all()
    empty = token_log_probs(h[:0], w, t[:0], with_sum_pi_squared=True)
    assert empty[2].shape == (0,)


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.numel = max(self.numel, x.numel())
        return out


def test_no_full_logits_tensor():
    h, w, t = _inputs(64, 8, 1000, seed=3, scale=0.5, dtype=torch.float32)
    with torch.no_grad(), _LargestTensor() as seen:
        token_log_probs(h, w, t, 0.9, True, 16, vocab_chunk_size=128, with_sum_pi_squared=True)
    assert seen.numel <= max(16 * 128, 1000 * 8)
