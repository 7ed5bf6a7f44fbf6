"""The chunked log-prob kernel (torch block ops) against the full-logits reference.

Values, entropies and gradients with respect to hidden and weight on random shapes, block shapes,
temperatures and masks; bf16; tied embeddings; and that no tensor of [T x V] size is ever created,
forward or backward.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tidal.kernels import token_log_probs, token_log_probs_reference
from tidal.kernels.logprobs import resolve_backend


def _inputs(num_tokens: int, hidden: int = 16, vocab: int = 37, seed: int = 0, scale: float = 0.5):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(num_tokens, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * scale
    t = torch.randint(0, vocab, (num_tokens,), generator=gen)
    return h, w, t


def _values_and_grads(fn, h, w, t, temperature, with_entropy, mask=None, **kw):
    """(log_probs, entropy, grad hidden, grad weight) of a random per-token loss."""
    gen = torch.Generator().manual_seed(123)
    c_lp, c_ent = torch.randn(2, h.shape[0], generator=gen)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = fn(hh, ww, t, temperature, with_entropy, mask=mask, **kw)
    loss = (lp * c_lp).sum() + ((ent * c_ent).sum() if with_entropy else 0.0)
    loss.backward()
    return lp.detach(), (ent.detach() if with_entropy else None), hh.grad, ww.grad


def _assert_matches_reference(h, w, t, temperature, with_entropy, mask=None, **kw):
    got = _values_and_grads(token_log_probs, h, w, t, temperature, with_entropy, mask, **kw)
    want = _values_and_grads(token_log_probs_reference, h, w, t, temperature, with_entropy, mask)
    for name, a, b in zip(("log_probs", "entropy", "grad_hidden", "grad_weight"), got, want, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(1, 40),
    hidden=st.integers(1, 24),
    vocab=st.integers(1, 300),
    chunk_size=st.integers(1, 48),
    vocab_chunk_size=st.integers(1, 320),
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.7]),
    with_entropy=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_match_reference(
    num_tokens, hidden, vocab, chunk_size, vocab_chunk_size, temperature, with_entropy, masked, seed
):
    h, w, t = _inputs(num_tokens, hidden, vocab, seed)
    mask = torch.rand(num_tokens, generator=torch.Generator().manual_seed(seed)) < 0.7 if masked else None
    _assert_matches_reference(
        h, w, t, temperature, with_entropy, mask, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size
    )


@pytest.mark.parametrize("chunks", [(1, 1), (4, 7), (7, 37), (1024, 4096)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_entropy_match_reference(chunks, temperature):
    h, w, t = _inputs(23)
    lp, ent = token_log_probs(h, w, t, temperature, True, chunks[0], vocab_chunk_size=chunks[1])
    lp_ref, ent_ref = token_log_probs_reference(h, w, t, temperature, with_entropy=True)
    assert lp.dtype == torch.float32 and lp.shape == (23,)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-5)
    # the reference itself against an independent formula: log-probs normalise, entropy >= 0
    full = torch.log_softmax(h @ w.t() / temperature, -1)
    torch.testing.assert_close(lp_ref, full[torch.arange(23), t])
    assert (ent_ref >= 0).all()


def _float64_truth(h, w, t, temperature):
    """(log_probs, entropy, grad hidden, grad weight) in float64, by the textbook formulas."""
    hh, ww = h.double().requires_grad_(), w.double().requires_grad_()
    log_p = torch.log_softmax(hh @ ww.t() / temperature, dim=-1)
    lp, ent = log_p[torch.arange(len(t)), t], -(log_p.exp() * log_p).sum(-1)
    c_lp, c_ent = torch.randn(2, h.shape[0], generator=torch.Generator().manual_seed(123)).double()
    ((lp * c_lp).sum() + (ent * c_ent).sum()).backward()
    return lp.detach(), ent.detach(), hh.grad, ww.grad


def test_large_logits_as_accurate_as_the_reference():
    # logits in the hundreds: a naive exp overflows and float32 keeps ~5 digits of z - lse, so
    # both float32 versions are compared with float64 truth: ours may not be worse than autograd's
    h, w, t = _inputs(12, vocab=50, scale=40.0)
    truth = _float64_truth(h, w, t, 0.5)
    ours = _values_and_grads(token_log_probs, h, w, t, 0.5, True, chunk_size=5, vocab_chunk_size=8)
    ref = _values_and_grads(token_log_probs_reference, h, w, t, 0.5, True)
    for name, a, b, exact in zip(("lp", "ent", "grad_h", "grad_w"), ours, ref, truth, strict=True):
        assert torch.isfinite(a).all(), name
        err_ours, err_ref = (a.double() - exact).abs().max(), (b.double() - exact).abs().max()
        scale = exact.abs().max()
        assert err_ours <= 2 * err_ref + 1e-6 * scale, f"{name}: {err_ours} vs reference {err_ref}"


def test_masked_tokens_are_zero_and_get_no_gradient():
    h, w, t = _inputs(10, seed=3)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.bool)
    t = torch.where(mask, t, -100)  # masked ids may be anything, e.g. an ignore index
    hh = h.clone().requires_grad_()
    lp, ent = token_log_probs(hh, w, t, 0.8, True, 3, vocab_chunk_size=5, mask=mask)
    assert (lp[~mask] == 0).all() and (ent[~mask] == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (hh.grad[~mask] == 0).all() and (hh.grad[mask].abs().sum(-1) > 0).all()
    _assert_matches_reference(h, w, torch.where(mask, t, 0), 0.8, True, mask, chunk_size=3)


def test_gradient_of_one_output_only():
    # upstream gradient None for one output: backward skips that term, result still exact
    h, w, t = _inputs(9, seed=4)
    for pick in (0, 1):
        grads = []
        for fn in (token_log_probs, token_log_probs_reference):
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            out = fn(hh, ww, t, 1.3, True, 4, vocab_chunk_size=10)
            out[pick].sum().backward()
            grads.append((hh.grad, ww.grad))
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=2e-5)


def test_frozen_weight_gets_no_gradient():
    h, w, t = _inputs(6)
    hh = h.clone().requires_grad_()
    lp, _ = token_log_probs(hh, w, t, 1.0, False, 4, vocab_chunk_size=10)
    lp.sum().backward()
    assert w.grad is None and hh.grad is not None


def test_entropy_is_skipped_when_not_asked():
    h, w, t = _inputs(5)
    _, ent = token_log_probs(h, w, t, with_entropy=False)
    assert ent is None


def test_bfloat16_matches_reference_within_bf16_tolerance():
    h, w, t = _inputs(33, hidden=24, vocab=301, seed=5)
    h, w = h.bfloat16(), w.bfloat16()
    got = _values_and_grads(token_log_probs, h, w, t, 0.9, True, chunk_size=8, vocab_chunk_size=64)
    want = _values_and_grads(token_log_probs_reference, h, w, t, 0.9, True)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    # logits are rounded to bf16 identically on both sides, so values agree to fp32 accuracy
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)
    # gradients: one bf16 rounding of G before the matmuls, bf16 outputs
    for a, b in zip(got[2:], want[2:], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_tied_embeddings():
    """weight is also the input embedding: both uses contribute to its gradient."""
    vocab, dim, num_tokens = 53, 12, 17
    gen = torch.Generator().manual_seed(7)
    embedding = torch.randn(vocab, dim, generator=gen)
    mix = torch.randn(dim, dim, generator=gen) / dim**0.5
    ids = torch.randint(0, vocab, (num_tokens,), generator=gen)
    targets = torch.roll(ids, -1)
    grads = []
    for fn in (token_log_probs, token_log_probs_reference):
        emb = embedding.clone().requires_grad_()
        hidden = torch.tanh(emb[ids] @ mix)
        lp, ent = fn(hidden, emb, targets, 0.8, True, 5, vocab_chunk_size=16)
        (lp.sum() - 0.1 * ent.sum()).backward()
        grads.append(emb.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=2e-5)
    # the input path matters: with the lm_head use alone the gradient differs
    emb = embedding.clone().requires_grad_()
    lp, ent = token_log_probs(torch.tanh(embedding[ids] @ mix), emb, targets, 0.8, True, 5)
    (lp.sum() - 0.1 * ent.sum()).backward()
    assert not torch.allclose(emb.grad, grads[0])


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns (forward and backward ops alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("fn", [token_log_probs, token_log_probs_reference])
def test_no_tensor_of_full_logits_size_exists(fn):
    num_tokens, dim, vocab, chunk, vchunk = 64, 8, 1000, 16, 128
    h, w, t = _inputs(num_tokens, dim, vocab)
    h.requires_grad_()
    w.requires_grad_()
    with _LargestTensor() as seen:
        lp, ent = fn(h, w, t, 0.9, True, chunk, vocab_chunk_size=vchunk)
        (lp.sum() + ent.sum()).backward()
    bound = max(chunk * vchunk, vocab * dim, num_tokens * dim)  # a block, grad of weight, of hidden
    if fn is token_log_probs:
        assert seen.numel <= bound, f"{seen.op} made a tensor of {seen.numel} elements"
    else:  # the check can fail: the reference does build [T, V] logits
        assert seen.numel >= num_tokens * vocab


def test_zero_tokens():
    h, w, t = _inputs(0)
    lp, ent = token_log_probs(h, w, t, with_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)


def test_rejects_bad_arguments():
    h, w, t = _inputs(4)
    with pytest.raises(ValueError, match="temperature"):
        token_log_probs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        token_log_probs(h, w, t[:3])
    with pytest.raises(ValueError, match="dtype|bfloat16"):
        token_log_probs(h.bfloat16(), w, t)
    with pytest.raises(ValueError, match="token ids"):
        token_log_probs(h, w, torch.full_like(t, 37))
    with pytest.raises(ValueError, match="mask"):
        token_log_probs(h, w, t, mask=torch.ones(4))
    with pytest.raises(ValueError, match="chunk_size"):
        token_log_probs(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="backend"):
        token_log_probs(h, w, t, backend="cuda")


def test_backend_choice_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET|pip install triton"):
        resolve_backend("triton", cpu)
