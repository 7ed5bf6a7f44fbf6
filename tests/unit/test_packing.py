"""The packed layout: one row without padding, samples kept apart by restarting position ids.

Outputs and gradients of both layouts against a plain padded forward, placeholders and input
checks are in test_sequence_layouts.py.
"""

import torch
from transformers.masking_utils import create_causal_mask

from tidal.config.schema import ModelConfig
from tidal.workers.engines.fsdp import PackedBatch, PolicyModel, load_pretrained

PROMPT_LENS = [6, 3, 1, 4, 2]
RESPONSE_LENS = [5, 2, 0, 3, 1]  # sample 2 has an empty response
P, R, VOCAB = 6, 5, 32


def _padded_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = len(PROMPT_LENS)
    prompt_mask = (torch.arange(P) >= P - torch.tensor(PROMPT_LENS)[:, None]).long()  # left padded
    response_mask = (torch.arange(R) < torch.tensor(RESPONSE_LENS)[:, None]).long()  # right padded
    prompt_ids = torch.randint(1, VOCAB, (n, P), generator=gen) * prompt_mask
    response_ids = torch.randint(1, VOCAB, (n, R), generator=gen) * response_mask
    return prompt_ids, prompt_mask, response_ids, response_mask


def test_layout():
    prompt_ids, prompt_mask, response_ids, response_mask = _padded_batch()
    packed = PackedBatch.from_padded(prompt_ids, prompt_mask, response_ids, response_mask)
    # sample 2 (empty response) costs nothing; the others keep exactly their real tokens
    kept = [p + r for p, r in zip(PROMPT_LENS, RESPONSE_LENS) if r > 0]
    assert packed.num_tokens == sum(kept)
    expected_positions = torch.cat([torch.arange(k) for k in kept])
    assert torch.equal(packed.position_ids[0], expected_positions)
    # each target is the packed token right after its predicting position
    assert torch.equal(packed.input_ids[0, packed.predict_index + 1], packed.targets)
    assert torch.equal(packed.targets, response_ids[response_mask.bool()])
    values = torch.arange(1, packed.predict_index.numel() + 1, dtype=torch.float32)
    unpacked = packed.unpack(values)
    assert unpacked.shape == (len(PROMPT_LENS), R)
    assert torch.equal(unpacked[response_mask.bool()], values)
    assert (unpacked[~response_mask.bool()] == 0).all()


def test_transformers_builds_a_block_diagonal_causal_mask(model_dir):
    """The assumption packing rests on: no attention mask + restarting positions -> block diagonal."""
    lm = load_pretrained(ModelConfig(path=model_dir), torch.float32)
    assert lm.config._attn_implementation == "sdpa"
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    embeds = torch.zeros(1, positions.shape[1], 64)
    mask = create_causal_mask(
        config=lm.config,
        inputs_embeds=embeds,
        attention_mask=None,
        past_key_values=None,
        position_ids=positions,
    )
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    expected = (seq[:, None] == seq[None, :]) & torch.ones(9, 9, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0].bool(), expected)


def test_samples_do_not_see_each_other(model_dir):
    """Changing one sample's tokens leaves every other sample's log-probs bit-identical."""
    lm = load_pretrained(ModelConfig(path=model_dir), torch.float32)
    prompt_ids, prompt_mask, response_ids, response_mask = _padded_batch()
    with torch.no_grad():
        before = PackedBatch.from_padded(prompt_ids, prompt_mask, response_ids, response_mask)
        lp_before = before.unpack(PolicyModel(lm)(before, 1.0, False)[0])
        changed = prompt_ids.clone()
        changed[0] = (changed[0] % (VOCAB - 1)) + 1  # sample 0 is the first block of the row
        after = PackedBatch.from_padded(changed, prompt_mask, response_ids, response_mask)
        lp_after = after.unpack(PolicyModel(lm)(after, 1.0, False)[0])
    assert not torch.equal(lp_before[0], lp_after[0])
    assert torch.equal(lp_before[1:], lp_after[1:])
