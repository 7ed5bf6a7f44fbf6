"""Padded layout == packed layout == packed rows == a plain padded forward: log-probs, entropy, values, gradients.

Tiny Qwen2, sdpa, fp32. The samples are ragged (prompt lengths 1-6, response lengths 0-5), one
response is empty and one has a masked-out token inside it (kept as context by both layouts).
"""

import pytest
import torch

from tidal.config.schema import ModelConfig
from tidal.workers.engines.fsdp import (
    PackedBatch,
    PackedRowsBatch,
    PaddedBatch,
    PolicyModel,
    ValueModel,
    load_pretrained,
)
from tidal.workers.engines.fsdp.packed_rows import first_fit_decreasing
from tidal.workers.engines.fsdp.packing import response_lengths, sample_lengths
from tidal.workers.engines.fsdp.padding import micro_batch_indices

PROMPT_LENS = [6, 3, 1, 4, 2, 5, 2]
RESPONSE_LENS = [5, 2, 0, 3, 1, 4, 5]  # sample 2 has an empty response
INNER_ZERO = (5, 1)  # response slot 1 of sample 5 is masked out but stays as context
P, R, VOCAB = 6, 5, 32
LAYOUTS = [PackedBatch, PackedRowsBatch, PaddedBatch]


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_pretrained(ModelConfig(path=model_dir), torch.float32)


def _batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    n = len(PROMPT_LENS)
    prompt_mask = (torch.arange(P) >= P - torch.tensor(PROMPT_LENS)[:, None]).long()  # left padded
    response_mask = (torch.arange(R) < torch.tensor(RESPONSE_LENS)[:, None]).long()  # right padded
    response_mask[INNER_ZERO] = 0
    prompt_ids = torch.randint(1, VOCAB, (n, P), generator=gen) * prompt_mask
    response_ids = torch.randint(1, VOCAB, (n, R), generator=gen) * _response_keep(response_mask)
    return prompt_ids, prompt_mask, response_ids, response_mask


def _response_keep(response_mask: torch.Tensor) -> torch.Tensor:
    return torch.arange(R) < response_lengths(response_mask)[:, None]


def _reference(lm, prompt_ids, prompt_mask, response_ids, response_mask, temperature):
    """Left-padded [n, P + R] forward with an attention mask and full logits (what TRL does)."""
    keep = _response_keep(response_mask)
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, keep.long()], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    log_probs = torch.log_softmax(logits[:, P - 1 : -1] / temperature, -1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    chosen = log_probs.gather(-1, response_ids[..., None]).squeeze(-1)
    return chosen * keep, entropy * keep


def _layout_outputs(lm, layout, batch, temperature):
    built = layout.from_padded(*batch)
    log_probs, entropy = PolicyModel(lm)(built, temperature, with_entropy=True)
    return built.unpack(log_probs), built.unpack(entropy)


def _grads(lm, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    lm.zero_grad(set_to_none=True)
    loss.backward()
    return {name: param.grad.clone() for name, param in lm.named_parameters()}


def test_padded_layout():
    batch = _batch()
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    padded = PaddedBatch.from_padded(*batch)
    packed = PackedBatch.from_padded(*batch)
    lengths = [p + r for p, r in zip(PROMPT_LENS, RESPONSE_LENS) if r > 0]
    # one row per sample with a response, as wide as the longest, real tokens first
    assert padded.input_ids.shape == (len(lengths), max(lengths))
    assert padded.attention_mask.sum(1).tolist() == lengths
    assert torch.equal(padded.attention_mask, torch.arange(max(lengths)) < torch.tensor(lengths)[:, None])
    assert (padded.input_ids[~padded.attention_mask] == 0).all()
    # the same tokens as the packed row, sample by sample
    assert torch.equal(padded.input_ids[padded.attention_mask], packed.input_ids[0])
    assert torch.equal(padded.position_ids[padded.attention_mask], packed.position_ids[0])
    # each target is the token right after its predicting slot, in the same order as packed
    assert torch.equal(padded.input_ids.flatten()[padded.predict_index + 1], padded.targets)
    assert torch.equal(padded.targets, packed.targets)
    assert torch.equal(padded.response_keep, _response_keep(response_mask))
    assert sample_lengths(prompt_mask, response_mask).tolist() == [
        p + r if r else 0 for p, r in zip(PROMPT_LENS, RESPONSE_LENS)
    ]


def test_packed_rows_layout():
    batch = _batch()
    rows = PackedRowsBatch.from_padded(*batch)
    packed = PackedBatch.from_padded(*batch)
    lengths = [p + r if r else 0 for p, r in zip(PROMPT_LENS, RESPONSE_LENS)]
    width = max(lengths)
    # bin-packed: rows as wide as the longest sample, fewer rows than samples, nothing lost
    assert rows.input_ids.shape[1] == width and rows.input_ids.shape[0] < sum(1 for n in lengths if n)
    assert rows.num_tokens < PaddedBatch.from_padded(*batch).num_tokens
    sample_row, offset, fill = first_fit_decreasing(lengths, width)
    for i, n in enumerate(lengths):  # each sample's tokens contiguous, positions from 0
        if n:
            r, o = sample_row[i], offset[i]
            assert rows.position_ids[r, o : o + n].tolist() == list(range(n))
    assert sum(fill) == packed.num_tokens
    # the same predictions and targets as the single packed row, in the same order
    assert torch.equal(rows.input_ids.flatten()[rows.predict_index + 1], rows.targets)
    assert torch.equal(rows.targets, packed.targets)
    assert torch.equal(rows.response_keep, packed.response_keep)


def test_first_fit_decreasing():
    # longest first, each into the first row with room: 9 | 6 | 5 then 4 | 3 joins the 6 | 1 opens a row
    row, offset, fill = first_fit_decreasing([3, 9, 0, 6, 5, 1, 4], 9)
    assert row == [1, 0, -1, 1, 2, 3, 2]
    assert offset == [6, 0, 0, 0, 0, 0, 5]
    assert fill == [9, 9, 9, 1]
    with pytest.raises(ValueError, match="longer than the row width"):
        first_fit_decreasing([10], 9)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_log_probs_entropy_and_grads_match(lm, temperature):
    batch = _batch()
    keep = _response_keep(batch[3])
    gen = torch.Generator().manual_seed(3)
    coef_lp, coef_ent = torch.randn(keep.shape, generator=gen), torch.randn(keep.shape, generator=gen)

    ref_lp, ref_ent = _reference(lm, *batch, temperature)
    ref_grads = _grads(lm, (ref_lp * coef_lp).sum() + (ref_ent * coef_ent).sum())
    for layout in LAYOUTS:
        log_probs, entropy = _layout_outputs(lm, layout, batch, temperature)
        torch.testing.assert_close(log_probs, ref_lp.detach(), rtol=0, atol=1e-5, msg=layout.__name__)
        torch.testing.assert_close(entropy, ref_ent.detach(), rtol=0, atol=1e-5, msg=layout.__name__)
        assert (log_probs[~keep] == 0).all() and (entropy[keep] > 0).all()
        grads = _grads(lm, (log_probs * coef_lp).sum() + (entropy * coef_ent).sum())
        for name, grad in ref_grads.items():
            torch.testing.assert_close(
                grads[name], grad, rtol=1e-4, atol=1e-5, msg=f"{layout.__name__} {name}"
            )


def test_padded_mask_is_not_needed(lm):
    """Right padding + causal attention: passing the attention mask changes no real output."""
    padded = PaddedBatch.from_padded(*_batch())
    with torch.no_grad():
        plain = lm.base_model(**padded.model_inputs()).last_hidden_state
        inputs = padded.model_inputs() | {"attention_mask": padded.attention_mask.long()}
        masked = lm.base_model(**inputs).last_hidden_state
    real = padded.attention_mask
    torch.testing.assert_close(plain[real], masked[real], rtol=0, atol=1e-5)


def test_values_match_per_sample_forward(model_dir):
    backbone = load_pretrained(ModelConfig(path=model_dir), torch.float32, causal_lm=False)
    critic = ValueModel(backbone, seed=7)
    batch = _batch()
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    with torch.no_grad():
        per_layout = [layout.from_padded(*batch) for layout in LAYOUTS]
        values = [built.unpack(critic(built)[0]) for built in per_layout]
        for other in values[1:]:
            torch.testing.assert_close(values[0], other, rtol=0, atol=1e-5)
        for i, (p, r) in enumerate(zip(PROMPT_LENS, RESPONSE_LENS)):
            ids = torch.cat([prompt_ids[i, P - p :], response_ids[i, :r]])[None]
            hidden = backbone(input_ids=ids).last_hidden_state[0]  # one sample, no padding at all
            expected = critic.value_head(hidden[p - 1 : p - 1 + r]).squeeze(-1)
            for value in values:
                torch.testing.assert_close(value[i, :r], expected, rtol=0, atol=1e-5)
                assert (value[i, r:] == 0).all()


def test_micro_batch_indices():
    lengths = torch.tensor([3, 9, 0, 9, 5, 1, 7])
    plan = micro_batch_indices(lengths, 3, sort_by_length=True)
    assert [idx.tolist() for idx in plan] == [[1, 3, 6], [4, 0, 5], [2]]  # longest first, stable
    assert [idx.tolist() for idx in micro_batch_indices(lengths, 3, sort_by_length=False)] == [
        [0, 1, 2],
        [3, 4, 5],
        [6],
    ]
    # one micro-batch: nothing to gain from sorting, the order stays
    assert micro_batch_indices(lengths, 7, sort_by_length=True)[0].tolist() == list(range(7))
    assert micro_batch_indices(lengths[:0], 2, sort_by_length=True) == []
    with pytest.raises(ValueError, match="micro-batch size"):
        micro_batch_indices(lengths, 0, sort_by_length=True)


def test_sorted_padded_micro_batches_match_one_packed_batch(lm):
    """Sorted padded micro-batches, results put back in order == one packed batch; so do gradients."""
    batch = _batch(seed=1)
    keep = _response_keep(batch[3])
    coef = torch.randn(keep.shape, generator=torch.Generator().manual_seed(4))
    packed_lp, _ = _layout_outputs(lm, PackedBatch, batch, 1.0)
    packed_grads = _grads(lm, (packed_lp * coef).sum())

    plan = micro_batch_indices(sample_lengths(batch[1], batch[3]), 2, sort_by_length=True)
    assert [idx.tolist() for idx in plan] != [[0, 1], [2, 3], [4, 5], [6]]  # the order really changes
    widths, log_probs = [], torch.zeros(keep.shape)
    lm.zero_grad(set_to_none=True)
    for index in plan:
        micro = [column[index] for column in batch]
        built = PaddedBatch.from_padded(*micro)
        widths.append(0 if built.is_placeholder else built.input_ids.shape[1])
        lp = built.unpack(PolicyModel(lm)(built, 1.0, with_entropy=False)[0])
        if not built.is_placeholder:  # the last micro-batch holds only the empty response
            (lp * coef[index]).sum().backward()  # gradients accumulate over micro-batches
        log_probs[index] = lp.detach()
    assert widths == sorted(widths, reverse=True)  # longest first
    torch.testing.assert_close(log_probs, packed_lp.detach(), rtol=0, atol=1e-5)
    for name, param in lm.named_parameters():
        torch.testing.assert_close(param.grad, packed_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nothing_to_predict_gives_a_placeholder(lm, layout):
    prompt_ids, prompt_mask, response_ids, response_mask = _batch()
    built = layout.from_padded(prompt_ids, prompt_mask, response_ids, torch.zeros_like(response_mask))
    assert isinstance(built, layout) and built.is_placeholder and built.num_tokens == 1
    log_probs, _ = PolicyModel(lm)(built, 1.0, with_entropy=False)  # runs (for the collectives)
    assert torch.equal(built.unpack(log_probs), torch.zeros(len(PROMPT_LENS), R))
    empty = layout.placeholder(R)
    assert isinstance(empty, layout) and empty.unpack(torch.ones(1)).shape == (0, R)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_response_without_prompt_is_rejected(layout):
    prompt_ids, prompt_mask, response_ids, response_mask = _batch()
    prompt_mask = prompt_mask.clone()
    prompt_mask[0] = 0
    with pytest.raises(ValueError, match="prompt token"):
        layout.from_padded(prompt_ids, prompt_mask, response_ids, response_mask)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sum_pi_squared_output_matches_full_logits(lm, layout):
    """The actor's log-prob pass for the optimal token baselines: a third output sum_v pi(v)^2 per
    response token, from the kernel (no [T x V] logits), in every layout."""
    batch = _batch(seed=3)
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    built = layout.from_padded(*batch)
    with torch.no_grad():
        log_probs, _, squares = PolicyModel(lm)(built, 0.8, with_entropy=False, with_sum_pi_squared=True)
        keep = _response_keep(response_mask)
        ids = torch.cat([prompt_ids, response_ids], 1)
        mask = torch.cat([prompt_mask, keep.long()], 1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    want = torch.softmax(logits[:, P - 1 : -1] / 0.8, -1).square().sum(-1) * keep
    torch.testing.assert_close(built.unpack(squares), want, rtol=1e-5, atol=1e-6)
    assert built.unpack(log_probs).shape == want.shape
