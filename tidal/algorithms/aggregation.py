"""Reduce a per-token loss matrix [N, R] to the scalar that is back-propagated.

The same mini-batch is split over data-parallel ranks and, on each rank, over micro-batches whose
gradients are accumulated. For the optimizer step to see the loss of the WHOLE mini-batch, each
micro-batch must divide by the mini-batch's global count, not its own. So every reduction here is
"sum over this piece / denominator", and the caller passes the global denominator:

    sum over ranks and micro-batches of aggregate_loss(piece, denominator=global) == aggregate_loss(whole)

`denominator` may be a number (interpreted for `mode`, see `aggregate_loss`) or a `GlobalCounts`,
which carries both counts so that a loss forcing its own mode (GSPO, SAPO, GMPO use sequence means)
still gets the right one. Note the convention is a SUM across ranks: frameworks that average
gradients over ranks (FSDP, DDP) need the loss multiplied by the data-parallel size, as verl does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from tidal.algorithms.masked import masked_sum
from tidal.registry import LOSS_AGG_ALIASES, LOSS_AGG_MODES  # names in the torch-free catalog


@dataclass(frozen=True)
class GlobalCounts:
    """Valid tokens and non-empty sequences of a whole mini-batch (summed over micro-batches and ranks).

    `masks` holds the same counts for other masks of the mini-batch, by column name (e.g. "pg_mask",
    when the policy gradient is restricted to some tokens, so its loss divides by their counts).
    """

    num_tokens: float
    num_sequences: float
    masks: Mapping[str, GlobalCounts] = field(default_factory=dict)

    def __add__(self, other: GlobalCounts) -> GlobalCounts:
        masks = {k: self.masks[k] + other.masks[k] for k in self.masks.keys() & other.masks.keys()}
        return GlobalCounts(
            self.num_tokens + other.num_tokens, self.num_sequences + other.num_sequences, masks
        )

    def of(self, mask: str) -> GlobalCounts:
        """The counts of column `mask` (the engine counts the masks its caller names)."""
        if mask not in self.masks:
            raise KeyError(
                f"no global counts for {mask!r} (have {sorted(self.masks)}); the engine counts a mask "
                f"when its train() gets count_masks=({mask!r},)"
            )
        return self.masks[mask]


Denominator = float | int | torch.Tensor | GlobalCounts | None


def count_valid(mask: torch.Tensor) -> GlobalCounts:
    """Local counts of `mask` [N, R]; sum them over micro-batches and all-reduce over ranks."""
    return GlobalCounts(
        num_tokens=float(mask.sum().item()),
        num_sequences=float((mask.sum(dim=-1) > 0).sum().item()),
    )


def resolve_loss_agg_mode(mode: str) -> str:
    """The canonical name of `mode` (an alias maps to its mode); ValueError for unknown names."""
    if mode in LOSS_AGG_MODES:
        return mode
    if mode in LOSS_AGG_ALIASES:
        return LOSS_AGG_ALIASES[mode]
    raise ValueError(
        f"unknown loss_agg_mode {mode!r}; use one of {', '.join(LOSS_AGG_MODES)} "
        f"(or a TRL alias: {', '.join(sorted(LOSS_AGG_ALIASES))})"
    )


def _pick(denominator: Denominator, use_tokens: bool, local: torch.Tensor) -> torch.Tensor | float:
    """The divisor: local count when None, else the global one; a zero count becomes 1 (no NaN)."""
    if denominator is None:
        return local.clamp(min=1)
    if isinstance(denominator, GlobalCounts):
        denominator = denominator.num_tokens if use_tokens else denominator.num_sequences
    if isinstance(denominator, torch.Tensor):
        return denominator.clamp(min=1)
    return max(float(denominator), 1.0)


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    denominator: Denominator = None,
    *,
    norm_length: int | None = None,
) -> torch.Tensor:
    """Scalar loss from `loss_mat` [N, R] over `mask` [N, R] (1 = counts).

    Modes (fully padded rows never count as sequences):
    - token-mean: sum of token losses / number of valid tokens.
    - token-sum: sum of token losses over the whole mini-batch, no normalisation (verl's token-sum;
      its gradient grows with the number of tokens, so scale the learning rate accordingly).
    - seq-mean-token-sum: mean over sequences of each sequence's token sum.
    - seq-mean-token-mean: mean over sequences of each sequence's token mean.
    - seq-mean-token-sum-norm (Dr. GRPO): sum of token losses / (number of sequences * norm_length),
      i.e. each sequence's token sum divided by a CONSTANT length, then averaged over sequences.
      `norm_length` defaults to R = loss_mat.shape[-1]; pass a fixed value (e.g. the generation
      limit) if micro-batches are padded to different R. verl's `agg_loss` returns only the
      numerator / norm_length (no mean over sequences) and relies on its trainer scaling by
      1 / #micro-batches; dividing by the sequence count here makes the value batch-size free.

    `denominator` (not used by token-sum): None normalises by this piece's own counts. Otherwise the global count of the
    whole mini-batch: the number of valid tokens for token-mean, the number of non-empty sequences
    for the three seq-mean modes (for seq-mean-token-sum-norm the divisor is that count times
    `norm_length`). A `GlobalCounts` gives both. Zero counts are treated as 1, so an empty piece
    (or a fully masked one) yields 0 instead of NaN.
    """
    mode = resolve_loss_agg_mode(mode)
    if loss_mat.shape != mask.shape or loss_mat.dim() != 2:
        raise ValueError(f"loss_mat {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} must both be [N, R]")
    mask = mask.to(loss_mat.dtype)
    if mode == "token-mean":
        return masked_sum(loss_mat, mask) / _pick(denominator, True, mask.sum())
    if mode == "token-sum":  # pieces add up to the whole: nothing to divide by
        return masked_sum(loss_mat, mask)

    token_counts = mask.sum(dim=-1)
    seq_mask = (token_counts > 0).to(loss_mat.dtype)
    seq_sums = masked_sum(loss_mat, mask, dim=-1)
    num_seqs = _pick(denominator, False, seq_mask.sum())
    if mode == "seq-mean-token-sum":
        return masked_sum(seq_sums, seq_mask) / num_seqs
    if mode == "seq-mean-token-mean":
        seq_means = seq_sums / (token_counts + 1e-8)
        return masked_sum(seq_means, seq_mask) / num_seqs
    length = loss_mat.shape[-1] if norm_length is None else norm_length
    if length <= 0:
        raise ValueError(f"norm_length={length} must be positive (the constant length normaliser)")
    return masked_sum(seq_sums, seq_mask) / (num_seqs * length)
