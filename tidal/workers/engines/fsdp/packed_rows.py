"""The packed-rows layout: several samples per row, rows as wide as the longest sample.

Between the two other layouts. The padded layout (padding.py) gives every sample a row as wide as
the micro-batch's longest, so with ragged RL responses a large share of the slots are padding
that still runs through every projection and MLP. The packed layout (packing.py) wastes no slot
but, without varlen attention kernels, attends over one row of T tokens: T^2 work and a dense
[T, T] mask. Here samples are bin-packed, longest first (first-fit decreasing), into rows of width
W = the longest sample: almost no padding (rarely more than a few percent) and attention of
rows x W^2, close to what the samples need on their own.

Samples are told apart the way the packed row does it: position ids restart at 0 for each sample,
and transformers (>= 4.50, checked on 5.19) ANDs the causal mask with a same-sequence mask it
derives from them when no attention mask is given. The padding at a row's end gets positions
that restart at 0 too, so it is a block of its own that no real token attends to.

Measured on the grpo_step benchmark's shape (64 samples, 1,422 real tokens, longest 39; Qwen2
4 layers / hidden 256; forward + backward, 1 CPU thread): padded 2,496 slots, 0.75 s; packed
rows 38 x 39 = 1,482 slots, 0.42 s; one packed row 1,422 slots, 0.79 s.
"""

from __future__ import annotations

import numpy as np
import torch

from tidal.workers.engines.fsdp.packing import SequenceBatch, real_tokens


def first_fit_decreasing(lengths: list[int], width: int) -> tuple[list[int], list[int], list[int]]:
    """Bin-pack samples of `lengths` into rows of `width`: (row of each, offset of each, fill of each row).

    Longest first, each into the first row with room (a stable sort, so the plan is deterministic).
    Samples of length 0 take no slot: row -1, offset 0.
    """
    if any(length > width for length in lengths):
        raise ValueError(f"a sample is longer than the row width {width}: {max(lengths)}")
    row = [-1] * len(lengths)
    offset = [0] * len(lengths)
    fill = np.zeros(0, dtype=np.int64)
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        length = lengths[i]
        if length == 0:
            continue
        fits = np.flatnonzero(fill + length <= width)
        if fits.size:
            r = int(fits[0])
        else:
            r = fill.size
            fill = np.append(fill, 0)
        row[i], offset[i] = r, int(fill[r])
        fill[r] += length
    return row, offset, fill.tolist()


class PackedRowsBatch(SequenceBatch):
    """[rows, W] token slots: each sample's real tokens contiguous in one row, positions from 0."""

    @classmethod
    def from_padded(
        cls,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> PackedRowsBatch:
        """Bin-pack n samples (prompt LEFT-padded [n, P], response RIGHT-padded [n, R]) into rows."""
        tokens = real_tokens(prompt_ids, prompt_mask, response_ids, response_mask)
        if not bool(tokens.has_response.any()):
            return cls._placeholder(tokens.response_keep)
        keep = tokens.keep  # samples without a response keep no token and get no slot
        lengths = keep.sum(1)
        width = int(lengths.max())
        rows, offsets, fill = first_fit_decreasing(lengths.tolist(), width)
        device = keep.device
        start = torch.tensor(rows, device=device).clamp(min=0) * width + torch.tensor(offsets, device=device)
        within = keep.long().cumsum(1) - 1  # each kept token's index within its sample
        flat_slot = start.unsqueeze(1) + within  # [n, P + R]; meaningful where `keep`
        input_ids = torch.zeros(len(fill) * width, dtype=tokens.full_ids.dtype, device=device)
        input_ids[flat_slot[keep]] = tokens.full_ids[keep]
        # padding after a row's last sample counts from 0 again: a block of its own
        slots = torch.arange(width, device=device)
        position_ids = (slots - torch.tensor(fill, device=device).unsqueeze(1)).flatten()
        position_ids[flat_slot[keep]] = within[keep]
        predict_index = flat_slot[:, tokens.prompt_length :][tokens.response_keep] - 1
        return cls(
            input_ids=input_ids.view(len(fill), width),
            position_ids=position_ids.view(len(fill), width),
            predict_index=predict_index,
            targets=response_ids[tokens.response_keep],
            response_keep=tokens.response_keep,
            is_placeholder=False,
        )
