"""A preallocated key/value cache for batched decoding of left-padded prompts.

Layout: slot j of row b holds column j of that row's (prompt + response) sequence. Prompts are
left-padded to a common width, so every row writes its next token to the same slot and one integer
`length` describes the whole batch. Pad slots stay in the cache and are excluded by `key_mask`.

All layers live in one tensor so dropping finished rows (`keep`) is a single index_select.
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
