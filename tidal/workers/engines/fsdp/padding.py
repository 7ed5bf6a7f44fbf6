"""The padded layout ("dynamic padding"): one row per sample, as long as the micro-batch needs.

Each sample's real tokens (packing.real_tokens: real prompt tokens, then the response up to its
last real token) are shifted to the start of its row and the row is padded on the RIGHT up to L,
the longest such sample of the micro-batch, not the rollout's P + R. Position ids count real
tokens from 0, so a sample's tokens, positions and attention are the same as in the packed row.

Attention: `attention_mask` marks the real tokens, but the model is given none (plain causal
attention). With padding on the right only, the tokens a real token may attend to (itself and
those before it) are all real, so a mask would change only the outputs AT pad slots, which are
never read: the log-probs, entropies, values and their gradients are the same (the tests check
this against a masked forward). Leaving the mask out keeps sdpa on its `is_causal` kernel instead
of building a dense [b, 1, L, L] mask.

Cost: attention of b x L^2 instead of the packed row's T^2 = (b x mean length)^2 under sdpa, but
b x L - T pad slots through the projections and MLPs. `micro_batch_indices` keeps L close to each
sample's own length by sorting samples by length before cutting micro-batches, when there is more
than one. Within one micro-batch a long tail of lengths still costs: on the grpo_step benchmark's
shape (64 samples, 22 tokens on average, 39 at most; hidden 256) the padded batch has 2,496 slots
for the packed row's 1,422 tokens, so most of the attention saved goes into the MLPs (measured:
padded ~1.15x faster than packed on one CPU thread, as a FLOP count predicts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tidal.workers.engines.fsdp.packing import SequenceBatch, real_tokens


@dataclass(frozen=True)
class PaddedBatch(SequenceBatch):
    """[b, L] rows, one per sample with a response; real tokens first, padding on the right."""

    attention_mask: torch.Tensor | None = None  # [b, L] bool, real tokens (None for a placeholder)

    @classmethod
    def from_padded(
        cls,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> PaddedBatch:
        """Re-pad n samples (prompt LEFT-padded [n, P], response RIGHT-padded [n, R]) to [b, L]."""
        tokens = real_tokens(prompt_ids, prompt_mask, response_ids, response_mask)
        if not bool(tokens.has_response.any()):
            return cls._placeholder(tokens.response_keep)
        keep = tokens.keep[tokens.has_response]  # [b, P + R]: samples without a response get no row
        lengths = keep.sum(1)
        width = int(lengths.max())
        device = keep.device
        rows = torch.arange(keep.shape[0], device=device).unsqueeze(1).expand_as(keep)
        cols = keep.long().cumsum(1) - 1  # each kept token's slot in its row
        input_ids = torch.zeros(keep.shape[0], width, dtype=tokens.full_ids.dtype, device=device)
        input_ids[rows[keep], cols[keep]] = tokens.full_ids[tokens.has_response][keep]
        slots = torch.arange(width, device=device)
        # the slot of response token j of row r, flattened, minus one: the token predicting it
        flat_slot = rows * width + cols
        predict_index = flat_slot[:, tokens.prompt_length :][tokens.response_keep[tokens.has_response]] - 1
        return cls(
            input_ids=input_ids,
            position_ids=slots.expand(keep.shape[0], width).contiguous(),
            predict_index=predict_index,
            targets=response_ids[tokens.response_keep],
            response_keep=tokens.response_keep,
            is_placeholder=False,
            attention_mask=slots < lengths.unsqueeze(1),
        )


def micro_batch_indices(lengths: torch.Tensor, size: int, *, sort_by_length: bool) -> list[torch.Tensor]:
    """Sample indices of each micro-batch of at most `size` samples, from [n] sample lengths.

    With `sort_by_length` and more than one micro-batch, samples are taken longest first (a
    stable sort, so equal lengths keep their order and the plan is deterministic), so that each
    micro-batch pads to a length close to its samples' own. Callers put results back in the
    original order. The longest micro-batch comes first, so a memory peak shows at once.
    """
    if size < 1:
        raise ValueError(f"micro-batch size must be >= 1, got {size}")
    num_samples = int(lengths.shape[0])
    if sort_by_length and num_samples > size:
        order = torch.sort(lengths.cpu(), descending=True, stable=True).indices
    else:
        order = torch.arange(num_samples)
    return [order[start : start + size] for start in range(0, num_samples, size)]
