"""Weight sync between two pools: one worker's end of a trainer pool -> engine pool bridge.

The controller (tidal/controller/weight_bridge.py) calls, at once, `send` on every trainer worker
and `receive` on every engine worker. Both sides first agree on the version (a stale call left
over from a timed-out sync fails loudly instead of pairing with the wrong one), then run the
resharder over the bridge group: the trainer's FSDP shards go straight from its memory onto the
wire, and each engine rank receives every byte of its full replica into its own parameters.

The engine side writes through `write_weights(write, version)`, the rollout role's hook that
pauses generation around the write (`write` gets the parameters by Hugging Face name and returns
the resharder's SyncStats).

`gather_full` and `load_full` are the reference beside it: the trainer gathers full tensors (a
collective over its ranks) and the engine copies them in by name, through the same hook.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from typing import Any

import torch

from tidal.resharding.bridge_group import BridgeGroup
from tidal.resharding.executor import SyncStats
from tidal.resharding.layout import ParallelLayout
from tidal.resharding.spec import TensorSpec
from tidal.resharding.sync import Resharder, WeightSource, WeightTarget

Params = dict[str, torch.Tensor]
Write = Callable[[Params], SyncStats]
# The rollout role's hook: `write_weights(write, version)` calls `write(params)` with generation
# paused and returns what it returns.
WriteWeights = Callable[[Callable[[Params], Any], int], Any]


class BridgeEnd:
    """This process's end of a bridge: the group (trainer ranks 0..num_sources-1, then engine
    ranks) and its resharder, kept across syncs (plans and executors are cached in it)."""

    def __init__(self, group: BridgeGroup, num_sources: int, bucket_bytes: int, verify: bool = False):
        if not 0 < num_sources < group.world_size:
            raise ValueError(
                f"a bridge of {group.world_size} ranks with num_sources={num_sources}: each side needs "
                "at least one rank"
            )
        self.group = group
        self.num_sources = num_sources
        self.resharder = Resharder(group, bucket_bytes=bucket_bytes, verify=verify)

    @property
    def is_source(self) -> bool:
        return self.group.rank < self.num_sources

    def send(self, source: WeightSource, version: int) -> dict[str, float]:
        """Send this trainer rank's shards of `version`; every rank of the bridge syncs at once."""
        if not self.is_source:
            raise RuntimeError(f"bridge rank {self.group.rank} is an engine rank; it receives, not sends")
        start = time.perf_counter()
        self._agree_version(version)
        stats = self.resharder.sync(source, None)
        return self._metrics(stats, start)

    def receive(
        self,
        write_weights: WriteWeights,
        version: int,
        rank: int,
        num_ranks: int,
        layout: ParallelLayout | None = None,
    ) -> dict[str, float]:
        """Receive `version` into engine rank `rank` of `num_ranks`, in the engine's `layout` (default:
        each rank a full replica, the `hf` layout)."""
        layout = ParallelLayout.hf(dp=num_ranks) if layout is None else layout
        if self.is_source:
            raise RuntimeError(f"bridge rank {self.group.rank} is a trainer rank; it sends, not receives")
        start = time.perf_counter()
        self._agree_version(version)

        def write(params: Params) -> SyncStats:
            target = WeightTarget(TensorSpec.of(params), layout, rank, params)
            return self.resharder.sync(None, target)

        stats = write_weights(write, version)
        if not isinstance(stats, SyncStats):
            raise TypeError(
                f"write_weights must return what `write` returns (SyncStats), not {type(stats).__name__}"
            )
        return self._metrics(stats, start)

    def close(self) -> None:
        self.group.close()

    def _agree_version(self, version: int) -> None:
        self.group.mark_begun(version)
        versions = self.group.all_gather_object(version)
        if len(set(versions)) > 1:
            sides = [
                f"{'trainer' if r < self.num_sources else 'engine'} bridge rank {r}: version {v}"
                for r, v in enumerate(versions)
            ]
            raise RuntimeError(
                f"the ranks of a weight bridge are syncing different versions ({'; '.join(sides)}); a "
                "sync that timed out leaves its calls behind: close the bridge and build a new one"
            )

    def _metrics(self, stats: SyncStats, start: float) -> dict[str, float]:
        """The executor's SyncStats (reshard_s: its time), the plan's bytes, and the call's time."""
        metrics = {key: float(value) for key, value in asdict(stats).items()}
        metrics["reshard_s"] = metrics.pop("seconds")
        executor = self.resharder.executor
        assert executor is not None
        report = executor.plan.report
        metrics["plan_bytes"] = float(report.total_bytes)
        metrics["lower_bound_bytes"] = float(report.lower_bound_bytes)
        metrics["seconds"] = time.perf_counter() - start
        return metrics


# ------------------------------------------------------------------------------- the reference


def gather_full(source: Iterable[tuple[str, torch.Tensor]], keep: bool) -> dict[str, torch.Tensor] | None:
    """Every full tensor of the trainer (iterating is a collective over its ranks: all of them
    call this); the kept copy is on the CPU, to ship through the object store (`keep`: one rank)."""
    out = {}
    for name, tensor in source:
        if keep:
            out[name] = tensor.detach().to("cpu", copy=True)
    return out if keep else None


def load_full(
    write_weights: WriteWeights, weights: Mapping[str, torch.Tensor], version: int
) -> dict[str, float]:
    """Copy full tensors into the engine's parameters by name, through its `write_weights`."""
    start = time.perf_counter()

    def write(params: Params) -> int:
        missing = sorted(set(params) - set(weights))
        if missing:
            raise ValueError(f"the trainer's full weights lack engine parameters {missing[:5]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(weights[name])
        return len(params)

    write_weights(write, version)
    return {
        "bytes_received": float(sum(t.numel() * t.element_size() for t in weights.values())),
        "seconds": time.perf_counter() - start,
    }
