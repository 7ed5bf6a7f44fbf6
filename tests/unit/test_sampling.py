"""Next-token sampling: truncation masks, greedy, behaviour log-probs, seeded draws."""

from __future__ import annotations

import pytest
import torch

from tidal.workers.engines.embedded.sampling import apply_top_k, apply_top_p, sample_next


def _logits(rows: int = 16, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("k", [1, 3, 17])
def test_top_k_keeps_exactly_the_k_largest(k: int) -> None:
    logits = _logits()
    kept = torch.isfinite(apply_top_k(logits, k))
    expected = torch.zeros_like(kept).scatter(-1, logits.topk(k, dim=-1).indices, True)
    assert torch.equal(kept, expected)
    assert torch.equal(apply_top_k(logits, k)[kept], logits[kept])  # survivors untouched


@pytest.mark.parametrize("k", [-1, 0, 50, 80])
def test_top_k_disabled_or_wider_than_vocab_is_identity(k: int) -> None:
    logits = _logits()
    assert torch.equal(apply_top_k(logits, k), logits)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.95])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p: float) -> None:
    logits = _logits()
    kept = torch.isfinite(apply_top_p(logits, p))
    probs = torch.softmax(logits, dim=-1)
    for row in range(logits.shape[0]):
        order = probs[row].argsort(descending=True)
        cumulative = probs[row][order].cumsum(0)
        # Number of top tokens needed for their mass to reach p.
        size = int((cumulative < p).sum()) + 1
        expected = torch.zeros(logits.shape[1], dtype=torch.bool)
        expected[order[:size]] = True
        assert torch.equal(kept[row], expected), f"row {row}"


def test_top_p_always_keeps_the_most_likely_token() -> None:
    logits = _logits()
    kept = torch.isfinite(apply_top_p(logits, 1e-6))
    assert torch.equal(kept.sum(-1), torch.ones(logits.shape[0], dtype=torch.long))
    assert torch.equal(kept.float().argmax(-1), logits.argmax(-1))


def test_greedy_is_argmax_with_temperature_one_log_probs() -> None:
    logits = _logits()
    tokens, log_probs = sample_next(logits, temperature=0.0, top_k=3, top_p=0.5, generator=None)
    assert torch.equal(tokens, logits.argmax(-1))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(log_probs, expected)
    assert log_probs.dtype == torch.float32


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, -1, 1.0), (0.7, 5, 1.0), (1.3, -1, 0.8)])
def test_log_probs_are_untruncated_log_softmax_at_temperature(
    temperature: float, top_k: int, top_p: float
) -> None:
    logits = _logits().to(torch.bfloat16)  # the model's dtype; sampling works in fp32
    tokens, log_probs = sample_next(logits, temperature, top_k, top_p, torch.Generator().manual_seed(1))
    expected = torch.log_softmax(logits.float() / temperature, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(log_probs, expected)


def test_samples_stay_inside_the_truncated_set() -> None:
    logits = (_logits(rows=4) / 3).repeat(500, 1)
    allowed = torch.isfinite(apply_top_p(apply_top_k(logits / 0.8, 6), 0.7))
    assert (allowed[:4].sum(-1) > 1).all() and (allowed[:4].sum(-1) < 6).all()  # both filters bite
    tokens, _ = sample_next(logits, 0.8, 6, 0.7, torch.Generator().manual_seed(2))
    assert allowed.gather(-1, tokens[:, None]).all()
    # ...and the draw is not degenerate: several allowed tokens do get sampled.
    assert len(set(tokens[0::4].tolist())) == int(allowed[0].sum())


def test_sample_frequencies_follow_the_tempered_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(40000, 1)
    tokens, _ = sample_next(logits, 0.5, -1, 1.0, torch.Generator().manual_seed(3))
    frequencies = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    torch.testing.assert_close(frequencies, torch.softmax(logits[0] / 0.5, -1), atol=0.01, rtol=0)


def test_seeded_generator_reproduces_and_different_seeds_differ() -> None:
    logits = _logits(rows=64)

    def draw(seed: int) -> torch.Tensor:
        return sample_next(logits, 1.0, -1, 0.9, torch.Generator().manual_seed(seed))[0]

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
