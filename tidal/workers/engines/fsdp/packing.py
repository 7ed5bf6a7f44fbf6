"""Sequence layouts a micro-batch is fed to the model in, and the packed one: one row, no padding.

Rollouts arrive padded: prompts LEFT-padded to P, responses RIGHT-padded to R. Both layouts keep
the same tokens of each sample (`real_tokens`): its real prompt tokens, then its response up to
the last real token (a zero inside a response stays as context). Samples without a response
token cost nothing: they have nothing to predict. They differ in how those tokens are arranged:

- packed (this file): every sample's tokens back to back in a single row of T tokens; position
  ids restart at 0 for every sample, which is how the model tells samples apart. transformers
  (>= 4.50, checked on 5.19) calls `find_packed_sequence_indices(position_ids)` when no
  attention mask and no KV cache are given, and ANDs the causal mask with a same-sequence mask,
  i.e. a block-diagonal causal mask, for sdpa and eager attention; flash-attention-2 turns the
  same position ids into varlen boundaries and never builds a mask. No slot is wasted, but with
  sdpa the attention of the row costs T^2 plus a dense [T, T] mask: cheap only with varlen kernels.
- padded (padding.py): one row per sample, as long as the micro-batch's longest sample.

The output at token t predicts token t + 1 of the same sample. For response token j of a sample
the predicting token is the one just before it (the last prompt token for j = 0), so each sample
must have at least one real prompt token. Only those positions go through the lm_head / value
head (`predict_index`), and `unpack` scatters the results back to the [n, R] layout with zeros
at padding.

A micro-batch with nothing to predict (no samples, or only empty responses) still has to run a
forward and backward: FSDP ranks must issue the same collectives. Such a batch becomes a one-token
placeholder (`is_placeholder`); callers multiply its outputs by zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RealTokens:
    """Which slots of the padded [n, P + R] sequences a forward needs (`real_tokens`)."""

    full_ids: torch.Tensor  # [n, P + R] prompt ids then response ids, as they arrived
    keep: torch.Tensor  # [n, P + R] bool, the tokens a sample's forward needs (none without a response)
    response_keep: torch.Tensor  # [n, R] bool, response slots that get an output
    has_response: torch.Tensor  # [n] bool

    @property
    def prompt_length(self) -> int:
        return int(self.full_ids.shape[1] - self.response_keep.shape[1])


def response_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """[n] slots up to and including each response's last real token (0 for an empty response)."""
    n, response_len = response_mask.shape
    if response_len == 0:
        return response_mask.new_zeros(n, dtype=torch.long)
    slots = torch.arange(1, response_len + 1, device=response_mask.device)
    return (response_mask.ne(0) * slots).amax(dim=1)


def sample_lengths(prompt_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[n] tokens each sample puts into a forward (0 for a sample without a response)."""
    responses = response_lengths(response_mask)
    return torch.where(responses > 0, prompt_mask.ne(0).sum(1) + responses, 0)


def real_tokens(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> RealTokens:
    """The tokens each layout keeps, checked: every sample with a response has a prompt token."""
    if prompt_mask.shape != prompt_ids.shape or response_mask.shape != response_ids.shape:
        raise ValueError(
            f"masks must match ids: prompt {tuple(prompt_ids.shape)} vs {tuple(prompt_mask.shape)}, "
            f"response {tuple(response_ids.shape)} vs {tuple(response_mask.shape)}"
        )
    response_len = response_ids.shape[1]
    lengths = response_lengths(response_mask)
    response_keep = torch.arange(response_len, device=response_ids.device) < lengths.unsqueeze(1)
    has_response = lengths > 0
    prompt_keep = prompt_mask.ne(0) & has_response.unsqueeze(1)  # samples without output cost nothing
    if bool((prompt_keep.sum(1) == 0)[has_response].any()):
        raise ValueError(
            "a sample has response tokens but no real prompt token; its first response token has "
            "nothing to be predicted from. Every sample needs at least one prompt token (e.g. BOS)."
        )
    return RealTokens(
        full_ids=torch.cat([prompt_ids, response_ids], dim=1),
        keep=torch.cat([prompt_keep, response_keep], dim=1),
        response_keep=response_keep,
        has_response=has_response,
    )


@dataclass(frozen=True)
class SequenceBatch:
    """A micro-batch as the model consumes it, whatever the layout: [rows, cols] token slots.

    `predict_index` indexes the flattened [rows * cols] outputs, so `at_predictions` reads the
    hidden states that predict each kept response token the same way for every layout.
    """

    input_ids: torch.Tensor  # [rows, cols] int64
    position_ids: torch.Tensor  # [rows, cols] int64, counting each sample's tokens from 0
    predict_index: torch.Tensor  # [K] flat slot whose output predicts each kept response token
    targets: torch.Tensor  # [K] the response token predicted there
    response_keep: torch.Tensor  # [n, R] bool, response slots that get an output
    is_placeholder: bool  # nothing real to predict; outputs are a zero-weight stand-in

    @property
    def num_tokens(self) -> int:
        """Token slots the forward runs on, padding included."""
        return int(self.input_ids.numel())

    @property
    def num_samples(self) -> int:
        return int(self.response_keep.shape[0])

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments of the Hugging Face base model's forward.

        No attention mask for either layout: packed rows get their block-diagonal mask from the
        restarting position ids; padded rows are padded on the right only, so causal attention
        alone keeps every real token from seeing a pad (see padding.py).
        """
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": None,
            "use_cache": False,
        }

    def at_predictions(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, cols, H] model outputs -> [K, H] at the predicting slots."""
        return hidden.flatten(0, 1)[self.predict_index]

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """Per-kept-token values [K] -> [n, R] with zeros at padding (differentiable)."""
        n, response_len = self.response_keep.shape
        out = values.new_zeros(n, response_len)
        if self.is_placeholder:
            return out
        return out.index_put((self.response_keep,), values)

    @classmethod
    def _placeholder(cls, response_keep: torch.Tensor) -> SequenceBatch:
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
    def placeholder(cls, response_length: int, device: torch.device | str = "cpu") -> SequenceBatch:
        """A zero-sample stand-in, for ranks that run a micro-batch only to match the others' collectives."""
        return cls._placeholder(torch.zeros(0, response_length, dtype=torch.bool, device=device))


class PackedBatch(SequenceBatch):
    """One row [1, T] holding every sample's real tokens back to back."""

    @classmethod
    def from_padded(
        cls,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> PackedBatch:
        """Pack n samples (prompt LEFT-padded [n, P], response RIGHT-padded [n, R]) into one row."""
        tokens = real_tokens(prompt_ids, prompt_mask, response_ids, response_mask)
        if not bool(tokens.has_response.any()):
            return cls._placeholder(tokens.response_keep)
        keep = tokens.keep
        positions = keep.long().cumsum(1) - 1
        flat_index = (keep.flatten().long().cumsum(0) - 1).view(keep.shape)
        predict_index = flat_index[:, tokens.prompt_length :][tokens.response_keep] - 1
        return cls(
            input_ids=tokens.full_ids[keep].unsqueeze(0),
            position_ids=positions[keep].unsqueeze(0),
            predict_index=predict_index,
            targets=response_ids[tokens.response_keep],
            response_keep=tokens.response_keep,
            is_placeholder=False,
        )
