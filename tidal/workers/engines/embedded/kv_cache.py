"""A preallocated key/value cache for batched decoding of left-padded prompts.

Layout: slot j of row b holds column j of that row's (prompt + response) sequence. Prompts are
left-padded to a common width, so every row writes its next token to the same slot and one integer
`length` describes the whole batch. Pad slots stay in the cache and are excluded by `key_mask`.

All layers live in one tensor so dropping finished rows (`keep`) is a single index_select.

Continuous batching (continuous.py) joins caches of different lengths with `joined`: each is
right-aligned at its last filled slot, the shorter ones get masked (zero) slots on the left, and
slots that are padding in every row are dropped, so the length stays bounded by the longest live
sequence.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        # [layer, key/value, row, kv head, slot, head dim]
        self.data = torch.empty(
            num_layers, 2, batch_size, num_kv_heads, max_len, head_dim, dtype=dtype, device=device
        )
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.max_len = max_len

    def append_mask(self, mask: torch.Tensor) -> None:
        """Mark which of the next T slots hold real tokens (mask [B,T]); call once per forward, before writes."""
        end = self.length + mask.shape[1]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} slots needed, {self.max_len} allocated")
        self.key_mask[:, self.length : end] = mask

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values [B,kvh,T,hd] after the filled slots; return all filled keys/values so far."""
        end = self.length + keys.shape[2]
        self.data[layer, 0, :, :, self.length : end] = keys
        self.data[layer, 1, :, :, self.length : end] = values
        return self.data[layer, 0, :, :, :end], self.data[layer, 1, :, :, :end]

    def advance(self, num_slots: int) -> None:
        """Commit the slots written by this forward (after every layer has written)."""
        self.length += num_slots

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row not in `rows` (indices into the current batch), e.g. finished sequences."""
        self.data = self.data.index_select(2, rows)
        self.key_mask = self.key_mask.index_select(0, rows)

    def first_real_slot(self) -> int:
        """The first slot that holds a real token in some row (`length` when there is none)."""
        real = self.key_mask[:, : self.length].any(dim=0)
        return int(real.long().argmax()) if bool(real.any()) else self.length

    @classmethod
    def joined(cls, caches: list[StaticKVCache], room: int) -> StaticKVCache:
        """One cache holding the rows of `caches` in order, with `room` free slots after the filled ones.

        Every cache is right-aligned at its last filled slot (positions are per row, so shifting a
        row's slots changes nothing) and loses the leading slots that are padding in all its rows.
        The left padding this adds is zero-filled: masked keys must still be finite numbers, since
        the decode attention multiplies their zero probabilities by the values.
        """
        assert caches, "nothing to join"
        spans = [(c, c.first_real_slot()) for c in caches]
        width = max(c.length - first for c, first in spans)
        first_cache = caches[0]
        num_layers, _, _, num_kv_heads, _, head_dim = first_cache.data.shape
        rows = sum(c.data.shape[2] for c in caches)
        out = cls.__new__(cls)
        out.data = first_cache.data.new_zeros(num_layers, 2, rows, num_kv_heads, width + room, head_dim)
        out.key_mask = torch.zeros(rows, width + room, dtype=torch.bool, device=first_cache.key_mask.device)
        out.length, out.max_len = width, width + room
        row = 0
        for c, first in spans:
            num_rows, span = c.data.shape[2], c.length - first
            out.data[:, :, row : row + num_rows, :, width - span : width] = c.data[
                :, :, :, :, first : c.length
            ]
            out.key_mask[row : row + num_rows, width - span : width] = c.key_mask[:, first : c.length]
            row += num_rows
        return out
