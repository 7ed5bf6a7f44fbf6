"""Weight sync between two roles in the same process: hand the tensors over, no copy in transit.

When the actor and the rollout engine share a worker process (colocated on one pool), the trainer
exports full, Hugging Face-named tensors and the engine loads them directly: no file, no socket,
no pickling. The engine copies into its own parameters; the tensors handed over may be views of
the trainer's memory and are not kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

import torch

NamedTensors = Iterable[tuple[str, torch.Tensor]]
LoadWeights = Callable[[NamedTensors, int], None]


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


def sync_weights(weights: NamedTensors, load_weights: LoadWeights, version: int) -> dict[str, float]:
    """Stream `weights` into `load_weights(weights, version)`; return size and time of the copy.

    Exporting full tensors from sharded training state is a collective (every rank gathers each
    tensor in the same order). If the loader stops early, the rest of the export is still drained
    here, so every rank runs the same sequence of collectives and none is left waiting.
    """
    start = time.perf_counter()
    counted = _Counted(weights)
    load_weights(counted, version)
    for _ in counted:
        pass
    return {
        "weight_sync/num_tensors": float(counted.num_tensors),
        "weight_sync/bytes": float(counted.num_bytes),
        "weight_sync/seconds": time.perf_counter() - start,
    }
