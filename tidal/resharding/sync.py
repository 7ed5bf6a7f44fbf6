"""One process's end of a weight sync between a trainer and an engine: plan, executor, transport.

A trainer exports a `WeightSource`: its rank of its training layout and its local tensors (an FSDP
rank's shards, a Megatron rank's TP/PP shards), no gather, no copy. An engine offers a
`WeightTarget`: the spec of the tensors it serves, its rank of its generation layout and its own
parameters, which the sync writes in place. Every process of the group calls
`Resharder.sync(source, target)` at the same time (colocated: each process holds both).

The first sync for a pair of layouts agrees, with one all-gather, on which process holds which
source and target rank (the placement), gets the plan (pure and cached: `get_plan`) and builds the
executor; later syncs reuse both and only move bytes. No tensor is cached: sources are read and
targets written at each sync, so a sync after the weights changed moves the new values.

Transport: a group of one process needs no exchange: every rectangle is a local copy
(`LocalTransport.single`), i.e. exactly one copy from the trainer's memory into the engine's.
Otherwise torch.distributed point-to-point on the group (gloo on CPU, NCCL on GPU); what a process
already holds is still copied locally, the rest crosses the wire once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tidal.resharding.executor import ReshardExecutor, SyncStats
from tidal.resharding.layout import ParallelLayout
from tidal.resharding.planner import Placement, get_plan
from tidal.resharding.spec import Spec
from tidal.resharding.transports import LocalTransport, TorchP2PTransport, Transport

NamedTensors = Iterator[tuple[str, torch.Tensor]]
# Smaller than the planner's default: with two buckets in flight the link stays busy anyway, and a
# cast (fp32 master weights into a bf16 engine) stages every outgoing byte.
DEFAULT_SYNC_BUCKET_BYTES = 64 << 20


@dataclass(frozen=True)
class WeightSource:
    """A trainer rank's weights as they lie: rank `rank` of `layout`, local tensors by layout name.

    `gather_full`, when the trainer offers it, yields (Hugging Face name, full tensor) pairs: a
    collective over the trainer's ranks. Iterating the source runs it, so code that reads a
    trainer's full weights (tests, Hugging Face exports) works on the same object.
    """

    layout: ParallelLayout
    rank: int
    tensors: Mapping[str, torch.Tensor]
    gather_full: Callable[[], NamedTensors] | None = None

    def __iter__(self) -> NamedTensors:
        if self.gather_full is None:
            raise TypeError(
                "this WeightSource offers no full tensors (gather_full=None); sync it with a Resharder"
            )
        return self.gather_full()

    @property
    def dtype(self) -> torch.dtype:
        dtypes = {t.dtype for t in self.tensors.values()}
        if len(dtypes) != 1:
            raise ValueError(
                f"WeightSource tensors have dtypes {sorted(map(str, dtypes))}; a sync moves one dtype "
                "(keep the trainer's parameters in one dtype)"
            )
        return dtypes.pop()

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device


@dataclass(frozen=True)
class WeightTarget:
    """An engine rank's parameters: rank `rank` of `layout` over `spec`, written in place by a sync."""

    spec: Spec
    layout: ParallelLayout
    rank: int
    tensors: Mapping[str, torch.Tensor]


class Resharder:
    """This process's resharder; keeps one executor per (spec, layouts, ranks, dtype, device).

    bucket_bytes caps what a device sends plus receives per bucket; a sync's extra memory is its
    staging buffer, at most two buckets' worth (two in flight) and far less where rectangles are
    contiguous (FSDP row shards into full tensors stage only the small ones). verify=True
    checksums every target rectangle against its source after each sync (verify.py) and raises
    on a mismatch.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        bucket_bytes: int = DEFAULT_SYNC_BUCKET_BYTES,
        verify: bool = False,
    ):
        if bucket_bytes < 1:
            raise ValueError(f"Resharder bucket_bytes={bucket_bytes} must be >= 1")
        self.group = group
        self.bucket_bytes = bucket_bytes
        self.verify = verify
        self._key: tuple | None = None
        self._executor: ReshardExecutor | None = None
        self._transport: Transport | None = None

    @property
    def executor(self) -> ReshardExecutor | None:
        """The executor of the last sync (its plan and report), None before the first."""
        return self._executor

    def sync(self, source: WeightSource, target: WeightTarget) -> SyncStats:
        """Write `source`'s weights, resharded, into `target`; every process of the group calls it."""
        src_dtype, device = source.dtype, source.device
        key = (target.spec, source.layout, target.layout, source.rank, target.rank, src_dtype, device)
        if key != self._key:
            transport = self._transport_on(device)
            placement = self._placement(source, target)
            plan = get_plan(target.spec, source.layout, target.layout, placement, self.bucket_bytes)
            self._executor = ReshardExecutor(plan, transport, src_dtype=src_dtype)
            self._key = key
        assert self._executor is not None
        with torch.no_grad():
            return self._executor.sync(
                {source.rank: source.tensors}, {target.rank: target.tensors}, verify=self.verify
            )

    def _world_size(self) -> int:
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    def _transport_on(self, device: torch.device) -> Transport:
        if self._transport is None or self._transport.device != device:
            if self._world_size() == 1:
                self._transport = LocalTransport.single(device)
            else:
                self._transport = TorchP2PTransport(self.group, device=device)
        return self._transport

    def _placement(self, source: WeightSource, target: WeightTarget) -> Placement:
        """Which process holds which source and target rank: every process says what it holds."""
        held = [(source.rank, target.rank)]
        if self._world_size() > 1:
            held = [None] * self._world_size()
            dist.all_gather_object(held, (source.rank, target.rank), group=self.group)
        src_devices = _devices([s for s, _ in held], source.layout, "source")
        dst_devices = _devices([d for _, d in held], target.layout, "target")
        return Placement(src_devices, dst_devices)


def _devices(ranks: list[int], layout: ParallelLayout, what: str) -> tuple[int, ...]:
    """The device of each rank of `layout`, from the rank each device holds."""
    if sorted(ranks) != list(range(layout.world_size)):
        raise ValueError(
            f"the processes hold {what} ranks {ranks} (one per process, by process), but {layout} has "
            f"ranks 0..{layout.world_size - 1}: each must be held by exactly one process"
        )
    devices = [0] * layout.world_size
    for device, rank in enumerate(ranks):
        devices[rank] = device
    return tuple(devices)
