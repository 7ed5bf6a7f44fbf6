"""One process's end of a weight sync between a trainer and an engine: plan, executor, transport.

A trainer exports a `WeightSource`: its rank of its training layout and its local tensors (an FSDP
rank's shards, a Megatron rank's TP/PP shards), no gather, no copy. An engine offers a
`WeightTarget`: the spec of the tensors it serves, its rank of its generation layout and its own
parameters, which the sync writes in place. Every process of the group calls
`Resharder.sync(source, target)` at the same time (colocated: each process holds both).

Disaggregated (a trainer pool and a separate engine pool, joined by a `BridgeGroup`): a trainer
process holds only its source (`sync(source, None)`), an engine process only its target
(`sync(None, target)`). Each side lacks half of what the plan needs (the trainer has no target
spec, the engine no source layout), so every sync starts with one small all-gather in which each
process says what it holds; the plan is then the same cached one on every process, and each runs
only its own sends or receives. Nothing is local in that layout: every target byte crosses the
wire exactly once (the plan's lower bound).

The first sync for a pair of layouts agrees, with one all-gather, on which process holds which
source and target rank (the placement), gets the plan (pure and cached: `get_plan`) and builds the
executor; later syncs reuse both and only move bytes. No tensor is cached: sources are read and
targets written at each sync, so a sync after the weights changed moves the new values.

Transport: a group of one process needs no exchange: every rectangle is a local copy
(`LocalTransport.single`), i.e. exactly one copy from the trainer's memory into the engine's.
Otherwise torch.distributed point-to-point on the group (gloo on CPU, NCCL on GPU), or the same on
a `BridgeGroup`'s own backends; what a process already holds is still copied locally, the rest
crosses the wire once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from tidal.resharding.bridge_group import BridgeGroup
from tidal.resharding.executor import ReshardExecutor, SyncStats
from tidal.resharding.layout import ParallelLayout
from tidal.resharding.planner import Placement, get_plan
from tidal.resharding.spec import Spec
from tidal.resharding.transports import BridgeP2PTransport, LocalTransport, TorchP2PTransport, Transport

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

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device


class _Held(NamedTuple):
    """What one process of a disaggregated sync holds, and what it knows of its side's layout."""

    src_rank: int | None
    dst_rank: int | None
    src: tuple[ParallelLayout, torch.dtype] | None  # the trainer's layout and the dtype it holds
    dst: tuple[Spec, ParallelLayout] | None  # the engine's tensors and layout
    device_type: str


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
        group: dist.ProcessGroup | BridgeGroup | None = None,
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

    def sync(self, source: WeightSource | None, target: WeightTarget | None) -> SyncStats:
        """Write `source`'s weights, resharded, into `target`; every process of the group calls it.

        A process that holds one side only (disaggregated pools) passes None for the other.
        """
        if source is None or target is None:
            return self._sync_one_side(source, target)
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

    def _sync_one_side(self, source: WeightSource | None, target: WeightTarget | None) -> SyncStats:
        """A trainer process's sends (target=None) or an engine process's receives (source=None)."""
        if source is None and target is None:
            raise ValueError("Resharder.sync needs a source, a target or both; both are None")
        device = source.device if source is not None else target.device
        spec, src_layout, dst_layout, placement, src_dtype = self._agree(source, target, device)
        key = (spec, src_layout, dst_layout, placement, src_dtype, device)
        if key != self._key:
            transport = self._transport_on(device)
            plan = get_plan(spec, src_layout, dst_layout, placement, self.bucket_bytes)
            self._executor = ReshardExecutor(plan, transport, src_dtype=src_dtype)
            self._key = key
        assert self._executor is not None
        sources = {} if source is None else {source.rank: source.tensors}
        targets = {} if target is None else {target.rank: target.tensors}
        with torch.no_grad():
            return self._executor.sync(sources, targets, verify=self.verify)

    def _agree(
        self, source: WeightSource | None, target: WeightTarget | None, device: torch.device
    ) -> tuple[Spec, ParallelLayout, ParallelLayout, Placement, torch.dtype]:
        """One all-gather: the spec, both layouts, the source dtype and the placement, as every process
        holding a side describes it; they must agree."""
        mine = _Held(
            None if source is None else source.rank,
            None if target is None else target.rank,
            None if source is None else (source.layout, source.dtype),
            None if target is None else (target.spec, target.layout),
            device.type,
        )
        held: list[_Held] = self._all_gather(mine)
        srcs = _one([h.src for h in held], "trainer (source) layout and dtype")
        dsts = _one([h.dst for h in held], "engine (target) spec and layout")
        _one([h.device_type for h in held], "device type")
        (src_layout, src_dtype), (spec, dst_layout) = srcs, dsts
        src_devices = _devices([h.src_rank for h in held], src_layout, "source")
        dst_devices = _devices([h.dst_rank for h in held], dst_layout, "target")
        return spec, src_layout, dst_layout, Placement(src_devices, dst_devices), src_dtype

    def _all_gather(self, obj: Any) -> list[Any]:
        if isinstance(self.group, BridgeGroup):
            return self.group.all_gather_object(obj)
        if self._world_size() == 1:
            return [obj]
        out = [None] * self._world_size()
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _world_size(self) -> int:
        if isinstance(self.group, BridgeGroup):
            return self.group.world_size
        return dist.get_world_size(self.group) if dist.is_initialized() else 1

    def _transport_on(self, device: torch.device) -> Transport:
        if self._transport is None or self._transport.device != device:
            if isinstance(self.group, BridgeGroup):
                if self.group.device != device:
                    raise ValueError(
                        f"the weights are on {device} but the bridge group moves buffers on "
                        f"{self.group.device}; build the BridgeGroup on the weights' device"
                    )
                self._transport = BridgeP2PTransport(self.group)
            elif self._world_size() == 1:
                self._transport = LocalTransport.single(device)
            else:
                self._transport = TorchP2PTransport(self.group, device=device)
        return self._transport

    def _placement(self, source: WeightSource, target: WeightTarget) -> Placement:
        """Which process holds which source and target rank: every process says what it holds."""
        held = self._all_gather((source.rank, target.rank))
        src_devices = _devices([s for s, _ in held], source.layout, "source")
        dst_devices = _devices([d for _, d in held], target.layout, "target")
        return Placement(src_devices, dst_devices)


def _devices(ranks: list[int | None], layout: ParallelLayout, what: str) -> tuple[int, ...]:
    """The device of each rank of `layout`, from the rank each device holds (None: none of them)."""
    held = [r for r in ranks if r is not None]
    if sorted(held) != list(range(layout.world_size)):
        raise ValueError(
            f"the processes hold {what} ranks {ranks} (by process; None: none), but {layout} has "
            f"ranks 0..{layout.world_size - 1}: each must be held by exactly one process"
        )
    devices = [0] * layout.world_size
    for device, rank in enumerate(ranks):
        if rank is not None:
            devices[rank] = device
    return tuple(devices)


def _one(values: list[Any], what: str) -> Any:
    """The one value the processes that hold a side give (None: a process without that side)."""
    given = [v for v in values if v is not None]
    if not given:
        raise ValueError(f"no process of the sync holds the {what}: one side of the sync is missing")
    if any(v != given[0] for v in given):
        raise ValueError(
            f"the processes of one sync disagree on the {what}: {sorted(set(map(str, given)))}; "
            "every rank of a side must describe the same model and layout"
        )
    return given[0]
