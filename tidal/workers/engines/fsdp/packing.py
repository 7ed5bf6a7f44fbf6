"""Remove padding: a micro-batch's real tokens in one row, so no compute goes to pad tokens.

Rollouts arrive padded: prompts LEFT-padded to P, responses RIGHT-padded to R. A padded forward
spends (P + R) x n token slots of which often half are padding. Packing concatenates each sample's
real tokens (prompt then response) into a single row of T tokens; position ids restart at 0 for
every sample, which is how the model tells samples apart:

- transformers (>= 4.50, checked on 5.19) calls `find_packed_sequence_indices(position_ids)` when
  no attention mask and no KV cache are given, and ANDs the causal mask with a same-sequence mask,
  i.e. a block-diagonal causal mask, for sdpa and eager attention (flash-attention-2 uses the
  same position ids to build its varlen boundaries). The forward must therefore pass
  `attention_mask=None, use_cache=False`. tests/unit/test_packing.py checks packed == padded.
- Position ids count real tokens only, so left padding never shifts a sample's positions; this
  matches the rollout engine.

The output at packed token t predicts token t + 1 of the same sample. For response token j of a
sample the predicting token is the one just before it (the last prompt token for j = 0), so each
sample must have at least one real prompt token. Only those positions go through the lm_head /
value head (`predict_index`), and `unpack` scatters the results back to the [n, R] layout with
zeros at padding.

A micro-batch with nothing to predict (no samples, or only empty responses) still has to run a
forward and backward: FSDP ranks must issue the same collectives. Such a batch becomes a one-token
placeholder (`is_placeholder`); callers multiply its outputs by zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # [1, T] int64, every sample's real tokens back to back
    position_ids: torch.Tensor  # [1, T] int64, restarting at 0 for each sample
    predict_index: torch.Tensor  # [K] packed index whose output predicts each kept response token
    targets: torch.Tensor  # [K] the response token predicted there
    response_keep: torch.Tensor  # [n, R] bool, response slots that get an output (up to the last real token)
    is_placeholder: bool  # nothing real to predict; outputs are a zero-weight stand-in

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_samples(self) -> int:
        return int(self.response_keep.shape[0])

    @classmethod
    def from_padded(
        cls,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> PackedBatch:
        """Pack n samples (prompt LEFT-padded [n, P], response RIGHT-padded [n, R]) into one row."""
        n, prompt_len = prompt_ids.shape
        response_len = response_ids.shape[1]
        if prompt_mask.shape != prompt_ids.shape or response_mask.shape != response_ids.shape:
            raise ValueError(
                f"masks must match ids: prompt {tuple(prompt_ids.shape)} vs {tuple(prompt_mask.shape)}, "
                f"response {tuple(response_ids.shape)} vs {tuple(response_mask.shape)}"
            )
        device = prompt_ids.device
        # A response is kept up to its last real token (any zero inside stays as context).
        slots = torch.arange(1, response_len + 1, device=device)
        response_lens = (response_mask.ne(0) * slots).amax(dim=1) if response_len else prompt_ids.new_zeros(n)
        response_keep = torch.arange(response_len, device=device) < response_lens.unsqueeze(1)
        has_response = response_lens > 0
        if not bool(has_response.any()):
            return cls._placeholder(response_keep)
        prompt_keep = prompt_mask.ne(0) & has_response.unsqueeze(1)  # samples without output cost nothing
        if bool((prompt_keep.sum(1) == 0)[has_response].any()):
            raise ValueError(
                "a sample has response tokens but no real prompt token; its first response token has "
                "nothing to be predicted from. Every sample needs at least one prompt token (e.g. BOS)."
            )
        keep = torch.cat([prompt_keep, response_keep], dim=1)
        full_ids = torch.cat([prompt_ids, response_ids], dim=1)
        positions = keep.long().cumsum(1) - 1
        flat_index = (keep.flatten().long().cumsum(0) - 1).view(n, prompt_len + response_len)
        predict_index = flat_index[:, prompt_len:][response_keep] - 1
        return cls(
            input_ids=full_ids[keep].unsqueeze(0),
            position_ids=positions[keep].unsqueeze(0),
            predict_index=predict_index,
            targets=response_ids[response_keep],
            response_keep=response_keep,
            is_placeholder=False,
        )

    @classmethod
    def _placeholder(cls, response_keep: torch.Tensor) -> PackedBatch:
        one = torch.zeros(1, 1, dtype=torch.long, device=response_keep.device)
        return cls(
            input_ids=one,
            position_ids=one.clone(),
            predict_index=one.new_zeros(1),
            targets=one.new_zeros(1),
            response_keep=response_keep,
            is_placeholder=True,
        )

    @classmethod
    def placeholder(cls, response_length: int, device: torch.device | str = "cpu") -> PackedBatch:
        """A zero-sample stand-in, for ranks that run a micro-batch only to match the others' collectives."""
        return cls._placeholder(torch.zeros(0, response_length, dtype=torch.bool, device=device))

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """Per-kept-token values [K] -> [n, R] with zeros at padding (differentiable)."""
        n, response_len = self.response_keep.shape
        out = values.new_zeros(n, response_len)
        if self.is_placeholder:
            return out
        return out.index_put((self.response_keep,), values)
