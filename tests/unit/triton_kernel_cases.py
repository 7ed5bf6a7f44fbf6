"""Cases for the Triton block kernels, run by test_logprobs_triton.py in a child pytest.

Not collected by a plain `pytest` run (the name does not start with test_): Triton decides when
it is FIRST imported whether @triton.jit functions, its own tl.max / tl.sum included, compile for a
GPU or run in its interpreter (TRITON_INTERPRET=1, numpy on CPU tensors). A pytest session may
import triton long before these cases run, so test_logprobs_triton.py starts a fresh interpreter
with the variable set (CPU), or without it (CUDA: compiled kernels), and runs this file there.
Run by hand: TRITON_INTERPRET=1 python -m pytest tests/unit/triton_kernel_cases.py
"""

import importlib
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

from tidal.kernels import token_log_probs, token_log_probs_reference  # noqa: E402
from tidal.kernels.block_ops import TorchBlockOps  # noqa: E402


@pytest.fixture(scope="module")
def triton_ops():
    return importlib.import_module("tidal.kernels.triton_ops")


def _block(rows: int, cols: int, seed: int, dtype: torch.dtype = torch.float32, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, cols, generator=gen) * scale).to(DEVICE, dtype)
    local = torch.randint(-cols, 2 * cols, (rows,), generator=gen).to(DEVICE)  # some outside the block
    coefs = torch.randn(4, rows, generator=gen).to(DEVICE)
    return z, local, coefs


@pytest.mark.parametrize("shape", [(5, 1), (7, 33), (3, 1500)])  # 1500 > one 1024-wide tile
@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("with_squares", [True, False])
def test_block_stats_match_torch(triton_ops, shape, with_entropy, with_squares):
    z, local, _ = _block(*shape, seed=shape[1])
    dummy = torch.empty(1, 1, device=DEVICE)
    ours = triton_ops.TritonBlockOps(dummy, *shape, 0.8, with_entropy)
    ref = TorchBlockOps(dummy, *shape, 0.8, with_entropy)
    got = ours.stats(z.clone(), local, with_entropy, with_squares)
    want = ref.stats(z.clone() * 1.25, local, with_entropy, with_squares)  # torch ops: pre-scaled logits
    if with_squares:
        torch.testing.assert_close(got[4], want[4], rtol=1e-5, atol=1e-5)
    else:
        assert got[4] is None
    in_block = (local >= 0) & (local < shape[1])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    if with_entropy:
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
    else:
        assert got[2] is None
    torch.testing.assert_close(got[3][in_block], want[3][in_block])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_block_grad_matches_torch(triton_ops, dtype, with_entropy):
    rows, cols = 6, 1100
    z, local, (m, log_s, a, b) = _block(rows, cols, seed=1, dtype=dtype)
    m, log_s = m + 5.0, log_s.abs() + 1.0
    c = torch.randn(rows, device=DEVICE)
    ours = triton_ops.TritonBlockOps(
        torch.empty(1, 1, dtype=dtype, device=DEVICE), rows, cols, 0.8, with_entropy
    )
    ref = TorchBlockOps(torch.empty(1, 1, dtype=dtype, device=DEVICE), rows, cols, 0.8, with_entropy)
    a = a if with_entropy else None
    got = ours.grad(z.clone(), local, m, log_s, a, b, c)
    assert got.dtype == dtype
    scaled = z.float() * 1.25  # what TorchBlockOps.logits would produce
    want = ref.grad(scaled, local, m, log_s, a, b, c)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def _values_and_grads(fn, h, w, t, temperature, **kw):
    gen = torch.Generator().manual_seed(9)
    c_lp, c_ent = torch.randn(2, h.shape[0], generator=gen).to(h.device)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = fn(hh, ww, t, temperature, True, **kw)
    ((lp * c_lp).sum() + (ent * c_ent).sum()).backward()
    return lp.detach(), ent.detach(), hh.grad, ww.grad


@pytest.mark.parametrize(("chunks", "temperature"), [((4, 50), 1.0), ((32, 4096), 0.6), ((5, 16), 1.4)])
def test_triton_backend_matches_reference(triton_ops, chunks, temperature):
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(19, 16, generator=gen).to(DEVICE)
    w = (torch.randn(203, 16, generator=gen) * 0.7).to(DEVICE)
    t = torch.randint(0, 203, (19,), generator=gen).to(DEVICE)
    kw = {"chunk_size": chunks[0], "vocab_chunk_size": chunks[1]}
    got = _values_and_grads(token_log_probs, h, w, t, temperature, backend="triton", **kw)
    want = _values_and_grads(token_log_probs_reference, h, w, t, temperature)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def test_triton_backend_masked_bf16(triton_ops):
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(11, 8, generator=gen).to(DEVICE, torch.bfloat16)
    w = (torch.randn(97, 8, generator=gen) * 0.5).to(DEVICE, torch.bfloat16)
    t = torch.randint(0, 97, (11,), generator=gen).to(DEVICE)
    mask = (torch.rand(11, generator=gen) < 0.6).to(DEVICE)
    got = token_log_probs(h, w, t, 0.9, True, 4, vocab_chunk_size=40, mask=mask, backend="triton")
    want = token_log_probs_reference(h, w, t, 0.9, True, mask=mask)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not ON_GPU, reason="compiled kernels need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernels_on_gpu_match_reference(triton_ops, dtype):
    """Compiled (not interpreted) kernels, auto backend, a real vocabulary size."""
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(700, 128, generator=gen).to("cuda", dtype)
    w = (torch.randn(40000, 128, generator=gen) * 0.1).to("cuda", dtype)
    t = torch.randint(0, 40000, (700,), generator=gen).cuda()
    got = _values_and_grads(token_log_probs, h, w, t, 0.8, chunk_size=256, vocab_chunk_size=16384)
    want = _values_and_grads(token_log_probs_reference, h, w, t, 0.8)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_sum_pi_squared_matches_reference(triton_ops, dtype):
    """sum_v p(v)^2 from the Triton stats kernel, merged over several vocab blocks, with a mask."""
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(13, 8, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(150, 8, generator=gen) * 1.5).to(DEVICE, dtype)
    t = torch.randint(0, 150, (13,), generator=gen).to(DEVICE)
    mask = (torch.rand(13, generator=gen) < 0.7).to(DEVICE)
    kw = {"mask": mask, "with_sum_pi_squared": True}
    got = token_log_probs(h, w, t, 0.7, False, 4, vocab_chunk_size=40, backend="triton", **kw)
    want = token_log_probs_reference(h, w, t, 0.7, False, **kw)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-6)
