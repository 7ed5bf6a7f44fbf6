"""Weight sync between two roles of the same worker process (colocated on one pool).

The worker calls `hand_over(src.export_weights(), dst.load_weights, version)` on every rank of
the pool at once. What the trainer exports decides how the weights move:

- a `WeightSource` (its shards and layout: the FSDP actor): the engine role runs it through its
  `Resharder` (sync.py): a cached plan moves only what each rank lacks, in-process copies for what
  it holds, point-to-point for the rest, straight into the engine's parameters. `load_weights`
  returns the executor's `SyncStats`.
- (name, full tensor) pairs: handed to the engine as they are, no copy in transit (roles whose
  weights are whole on every rank; the engine copies them into its own parameters).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict

import torch

from tidal.resharding.executor import SyncStats
from tidal.resharding.sync import WeightSource

NamedTensors = Iterable[tuple[str, torch.Tensor]]
LoadWeights = Callable[[WeightSource | NamedTensors, int], SyncStats | None]


class _Counted:
    """Pass tensors through unchanged while counting them, so the sync can report its size."""

    def __init__(self, weights: NamedTensors):
        self._it = iter(weights)
        self.num_tensors = 0
        self.num_bytes = 0

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[str, torch.Tensor]:
        name, tensor = next(self._it)
        self.num_tensors += 1
        self.num_bytes += tensor.numel() * tensor.element_size()
        return name, tensor


def hand_over(
    weights: WeightSource | NamedTensors, load_weights: LoadWeights, version: int
) -> dict[str, float]:
    """Move `weights` into the engine through `load_weights(weights, version)`; return metrics.

    Full tensors exported from sharded state come from a collective (every rank gathers each
    tensor in the same order). If the loader stops early, the rest of the export is still drained
    here, so every rank runs the same sequence of collectives and none is left waiting.
    """
    start = time.perf_counter()
    if isinstance(weights, WeightSource):
        stats = load_weights(weights, version)
        if not isinstance(stats, SyncStats):
            raise TypeError(
                f"load_weights got a WeightSource and must return the Resharder's SyncStats, not "
                f"{type(stats).__name__}"
            )
        metrics = {f"weight_sync/{key}": float(value) for key, value in asdict(stats).items()}
        metrics["weight_sync/reshard_s"] = metrics.pop("weight_sync/seconds")
    else:
        counted = _Counted(weights)
        load_weights(counted, version)
        for _ in counted:
            pass
        metrics = {
            "weight_sync/num_tensors": float(counted.num_tensors),
            "weight_sync/bytes": float(counted.num_bytes),
        }
    metrics["weight_sync/seconds"] = time.perf_counter() - start
    return metrics
