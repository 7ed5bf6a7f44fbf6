"""Preference pairs through the FSDP engine: a pair's chosen and rejected responses in ONE forward.

A pair batch holds one row per pair (prompt_ids / prompt_mask, chosen_ids / chosen_mask,
rejected_ids / rejected_mask). `pair_sequences` turns its n pairs into 2n ordinary sequences
(rows [0, n) the chosen responses, [n, 2n) the rejected ones, responses padded to one width), so
the engine's layouts, kernel and log-prob path run unchanged. What differs from `FSDPEngine.train`
is the micro-batching: a pairwise loss needs both responses of a pair in the same micro-batch, so
micro-batches are cut over PAIRS (sorted by the longer response, like the engine sorts samples)
and each builds the 2m sequences of its m pairs. `pairs_per_micro_batch(size)` keeps a forward at
`size` sequences, as actor.micro_batch_size_per_rank means for RL.

Losses follow the engine's rule: normalised by the number of pairs in the whole mini-batch (all
ranks), so micro-batch losses add up to the mini-batch loss and `backward` undoes FSDP's average.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tidal.workers.engines.fsdp.engine import FSDPEngine, even_bounds
from tidal.workers.engines.fsdp.packing import sample_lengths
from tidal.workers.engines.fsdp.padding import micro_batch_indices

# (chosen log-probs [m, R_c], rejected log-probs [m, R_r], micro-batch columns, pairs in the
# mini-batch) -> (loss, loss terms that add up over micro-batches and ranks, per-pair means)
PairLossFn = Callable[
    [torch.Tensor, torch.Tensor, dict[str, torch.Tensor], float],
    tuple[torch.Tensor, dict[str, float], dict[str, float]],
]


def pairs_per_micro_batch(micro_batch_size: int) -> int:
    """Pairs per forward for a budget of `micro_batch_size` sequences (two per pair, at least one pair)."""
    return max(1, micro_batch_size // 2)


def pair_sequences(columns: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """n pairs -> 2n sequences in the engine's columns: chosen rows first, then rejected rows."""
    chosen, rejected = columns["chosen_ids"], columns["rejected_ids"]
    width = max(chosen.shape[1], rejected.shape[1])

    def widen(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]))

    return {
        "prompt_ids": torch.cat([columns["prompt_ids"]] * 2),
        "prompt_mask": torch.cat([columns["prompt_mask"]] * 2),
        "response_ids": torch.cat([widen(chosen), widen(rejected)]),
        "response_mask": torch.cat([widen(columns["chosen_mask"]), widen(columns["rejected_mask"])]),
    }


def split_pair_outputs(
    values: torch.Tensor, columns: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """[2m, R] per-sequence outputs -> (chosen [m, R_c], rejected [m, R_r]) in the pairs' own widths."""
    m = values.shape[0] // 2
    return values[:m, : columns["chosen_ids"].shape[1]], values[m:, : columns["rejected_ids"].shape[1]]


def plan_pair_micro_batches(
    engine: FSDPEngine, sequences: dict[str, torch.Tensor], pairs_per_micro: int
) -> list[torch.Tensor | None]:
    """Pair indices of this rank's micro-batches, padded with None so every rank runs as many."""
    lengths = sample_lengths(sequences["prompt_mask"], sequences["response_mask"])
    num_pairs = lengths.shape[0] // 2
    pair_lengths = torch.maximum(lengths[:num_pairs], lengths[num_pairs:])
    local = micro_batch_indices(pair_lengths, pairs_per_micro, sort_by_length=engine.layout != "packed")
    (most,) = engine.all_reduce([len(local)], op=dist.ReduceOp.MAX)
    return local + [None] * (max(int(most), 1) - len(local))


def pair_log_probs(
    engine: FSDPEngine, sequences: dict[str, torch.Tensor], index: torch.Tensor | None
) -> torch.Tensor | None:
    """Log-probs [2m, R] of pairs `index` (chosen rows, then rejected); None for a placeholder
    micro-batch, after running its forward (and, when training, a zero backward) for the collectives."""
    num_pairs = sequences["prompt_ids"].shape[0] // 2
    rows = None if index is None else torch.cat([index, index + num_pairs])
    batch = engine.build(sequences, rows)
    log_probs, _ = engine.module(batch, temperature=1.0, with_entropy=False)
    if batch.is_placeholder:
        if torch.is_grad_enabled():
            engine.backward(log_probs.sum() * 0.0)
        return None
    return batch.unpack(log_probs)


@torch.no_grad()
def infer_pair_log_probs(
    engine: FSDPEngine, columns: dict[str, torch.Tensor], micro_batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [n, R_c], rejected [n, R_r]) token log-probs of this rank's pairs (the engine's `infer`)."""
    sequences = pair_sequences(columns)
    log_probs, _ = engine.infer(sequences, micro_batch_size, temperature=1.0, with_entropy=False)
    return split_pair_outputs(log_probs, columns)


def run_pairs(
    engine: FSDPEngine,
    columns: dict[str, torch.Tensor],
    *,
    micro_batch_size: int,
    loss_fn: PairLossFn,
    num_mini_batches: int = 1,
    epochs: int = 1,
    train: bool = True,
) -> dict[str, float]:
    """`epochs` passes over this rank's pairs, one optimizer step per mini-batch (train), or one
    gradient-free pass (train=False, for evaluation).

    Returns the mini-batch loss terms (averaged over steps), per-pair means of `loss_fn`'s metrics,
    and with `train` grad_norm, lr and skipped_steps, identical on every rank.
    """
    engine.module.train(train)
    pairs_per_micro = pairs_per_micro_batch(micro_batch_size)
    step_sums: list[dict[str, float]] = []
    step_stats: list[dict[str, float]] = []
    pair_sums: dict[str, float] = {}
    pair_weights: dict[str, float] = {}
    with torch.set_grad_enabled(train):
        for _ in range(epochs if train else 1):
            for start, stop in even_bounds(columns["chosen_ids"].shape[0], num_mini_batches if train else 1):
                mini = {key: value[start:stop] for key, value in columns.items()}
                (num_pairs,) = engine.all_reduce([float(stop - start)])
                sequences = pair_sequences(mini)
                sums: dict[str, float] = {}
                for index in plan_pair_micro_batches(engine, sequences, pairs_per_micro):
                    log_probs = pair_log_probs(engine, sequences, index)
                    if log_probs is None:  # nothing to learn from, but the collectives ran
                        continue
                    micro = {key: value[index].to(engine.device) for key, value in mini.items()}
                    chosen, rejected = split_pair_outputs(log_probs, micro)
                    loss, loss_sums, means = loss_fn(chosen, rejected, micro, num_pairs)
                    if train:
                        engine.backward(loss)
                    for key, value in loss_sums.items():
                        sums[key] = sums.get(key, 0.0) + value
                    for key, value in means.items():
                        pair_sums[key] = pair_sums.get(key, 0.0) + value * len(index)
                        pair_weights[key] = pair_weights.get(key, 0.0) + len(index)
                step_sums.append(sums)
                if train:
                    step_stats.append(engine.step())
    engine.module.eval()
    return engine.reduce_metrics(step_sums, step_stats, pair_sums, pair_weights)
