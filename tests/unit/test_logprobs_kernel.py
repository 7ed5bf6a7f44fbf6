"""The chunked log-prob kernel against the full-logits reference: values, entropy and gradients."""

import pytest
import torch

from tidal.kernels import token_log_probs, token_log_probs_reference


def _inputs(num_tokens: int, hidden: int = 16, vocab: int = 37, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(num_tokens, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.5
    t = torch.randint(0, vocab, (num_tokens,), generator=gen)
    return h, w, t


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_entropy_match_reference(chunk_size, temperature):
    h, w, t = _inputs(23)
    lp, ent = token_log_probs(h, w, t, temperature, with_entropy=True, chunk_size=chunk_size)
    lp_ref, ent_ref = token_log_probs_reference(h, w, t, temperature, with_entropy=True)
    assert lp.dtype == torch.float32 and lp.shape == (23,)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-5, atol=1e-5)
    # the reference itself against an independent formula: log-probs normalise, entropy >= 0
    full = torch.log_softmax(h @ w.t() / temperature, -1)
    torch.testing.assert_close(lp_ref, full[torch.arange(23), t])
    assert (ent_ref >= 0).all()


def test_entropy_is_skipped_when_not_asked():
    h, w, t = _inputs(5)
    _, ent = token_log_probs(h, w, t, with_entropy=False)
    assert ent is None


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_gradients_match_reference(chunk_size):
    h, w, t = _inputs(11, seed=1)
    coef = torch.randn(11, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (token_log_probs, token_log_probs_reference):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        lp, ent = fn(hh, ww, t, 0.9, with_entropy=True, chunk_size=chunk_size)
        ((lp * coef).sum() + 0.3 * ent.sum()).backward()
        grads.append((hh.grad, ww.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6)


def test_bfloat16_inputs_give_float32_outputs():
    h, w, t = _inputs(9)
    lp, ent = token_log_probs(h.bfloat16(), w.bfloat16(), t, with_entropy=True, chunk_size=4)
    lp_ref, ent_ref = token_log_probs_reference(h.bfloat16(), w.bfloat16(), t, with_entropy=True)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_ref, rtol=1e-4, atol=1e-4)


def test_zero_tokens():
    h, w, t = _inputs(0)
    lp, ent = token_log_probs(h, w, t, with_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)


def test_rejects_bad_temperature_and_shapes():
    h, w, t = _inputs(4)
    with pytest.raises(ValueError, match="temperature"):
        token_log_probs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        token_log_probs(h, w, t[:3])
