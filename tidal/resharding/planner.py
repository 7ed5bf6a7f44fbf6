"""The resharding plan: pure, deterministic, computed identically on every rank.

Given a model spec, a source layout, a target layout and a placement (which physical device each
source and target rank lives on), the plan says, for every target rank, which rectangles of which
canonical tensors it needs and where each comes from:

1. A *local copy* when a source rank on the same device already holds the rectangle (nothing
   crosses a link).
2. Otherwise a *transfer* from one of the source ranks holding it, chosen to balance the bytes
   each sending device puts on the wire (largest rectangles first, least-loaded sender wins,
   ties to the lowest rank).
3. Transfers are split so none exceeds the bucket cap and packed into buckets: in one bucket no
   device stages more than `bucket_bytes` (what it sends plus what it receives), and every link
   carries about the same fraction of its bytes in every bucket (`_pack`). An executor runs
   buckets in order; within a bucket, the moves between one (sender, receiver) pair travel as
   one packed buffer of small rectangles plus one message per large one, in plan order.

Every rectangle a target rank lacks (held by no source rank on its device) crosses a link exactly
once, so the bytes moved equal the lower bound; the report shows both, plus the largest inbound
and outbound load of any device.

Rank identities. Source ranks and target ranks are numbered by their own layouts; a `Placement`
maps both to physical devices (global ranks of the process group that executes the plan):
- colocated (trainer and engine share the devices): source rank i and target rank i are the
  same device i. Bytes move between devices only where the layouts differ.
- disaggregated (separate pools): source ranks are devices 0..S-1, target ranks S..S+T-1, so
  every byte a target needs crosses a link.
Any other mapping can be given explicitly.

Plans are cached on (spec, source layout, target layout, placement, bucket cap): all hashable.
"""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

from tidal.resharding.layout import (
    Box,
    LocalTensor,
    ParallelLayout,
    Piece,
    box_contains,
    box_intersect,
    box_numel,
    to_local,
)
from tidal.resharding.spec import Spec

DEFAULT_BUCKET_BYTES = 256 << 20
# Transfers are cut to at most 1/8 of a bucket: small enough that buckets can be filled evenly
# from every link (see `_pack`), large enough that each message is still big on any transport.
_PIECES_PER_BUCKET = 8


@dataclass(frozen=True)
class Placement:
    """The physical device (global rank) of every source rank and every target rank."""

    src_devices: tuple[int, ...]
    dst_devices: tuple[int, ...]

    @classmethod
    def colocated(cls, num_src: int, num_dst: int) -> Placement:
        return cls(tuple(range(num_src)), tuple(range(num_dst)))

    @classmethod
    def disaggregated(cls, num_src: int, num_dst: int) -> Placement:
        return cls(tuple(range(num_src)), tuple(range(num_src, num_src + num_dst)))


class Move(NamedTuple):
    """One rectangle of one canonical tensor, from a source rank's local tensor to a target's."""

    src_rank: int
    dst_rank: int
    canonical: str
    canon_box: Box
    src_tensor: str
    src_box: Box
    dst_tensor: str
    dst_box: Box
    num_bytes: int


@dataclass(frozen=True)
class PlanReport:
    total_bytes: int  # bytes that cross a link
    lower_bound_bytes: int  # sum over target ranks of the bytes absent from their device
    local_copy_bytes: int
    max_inbound_bytes: int  # the most any one device receives
    max_outbound_bytes: int  # the most any one device sends
    num_transfers: int
    num_local_copies: int
    num_buckets: int
    num_sending_devices: int

    def summary(self) -> dict[str, float]:
        mib = float(1 << 20)
        ratio = self.total_bytes / self.lower_bound_bytes if self.lower_bound_bytes else 1.0
        return {
            "total_mib": self.total_bytes / mib,
            "lower_bound_mib": self.lower_bound_bytes / mib,
            "ratio_to_lower_bound": ratio,
            "local_copy_mib": self.local_copy_bytes / mib,
            "max_inbound_mib": self.max_inbound_bytes / mib,
            "max_outbound_mib": self.max_outbound_bytes / mib,
            "num_transfers": float(self.num_transfers),
            "num_buckets": float(self.num_buckets),
        }


@dataclass(frozen=True)
class DeviceOps:
    """What one device does: its local copies, then per bucket what it sends and receives."""

    device: int
    local_copies: tuple[Move, ...]
    sends: tuple[tuple[Move, ...], ...]
    recvs: tuple[tuple[Move, ...], ...]


@dataclass(frozen=True)
class Plan:
    spec: Spec
    src: ParallelLayout
    dst: ParallelLayout
    placement: Placement
    bucket_bytes: int
    local_copies: tuple[Move, ...]
    buckets: tuple[tuple[Move, ...], ...]
    report: PlanReport

    def device_ops(self, device: int) -> DeviceOps:
        """The operations of one device: every rank replays the plan and keeps only these."""
        src_dev, dst_dev = self.placement.src_devices, self.placement.dst_devices
        return DeviceOps(
            device,
            tuple(m for m in self.local_copies if dst_dev[m.dst_rank] == device),
            tuple(tuple(m for m in b if src_dev[m.src_rank] == device) for b in self.buckets),
            tuple(tuple(m for m in b if dst_dev[m.dst_rank] == device) for b in self.buckets),
        )


class _Holder(NamedTuple):
    rank: int
    tensor: str
    piece: Piece
    overlap: Box  # piece.canon_box within the needed piece


class _Need(NamedTuple):
    dst_rank: int
    dst_tensor: LocalTensor
    dst_piece: Piece
    cell: Box
    owners: tuple[_Holder, ...]


def make_plan(
    spec: Spec,
    src: ParallelLayout,
    dst: ParallelLayout,
    placement: Placement,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Plan:
    """Compute the plan from scratch (see `get_plan` for the cached version)."""
    if len(placement.src_devices) != src.world_size or len(placement.dst_devices) != dst.world_size:
        raise ValueError(
            f"placement has {len(placement.src_devices)} source / {len(placement.dst_devices)} target "
            f"devices but the layouts have {src.world_size} / {dst.world_size} ranks"
        )
    if bucket_bytes < spec.element_size:
        raise ValueError(f"bucket_bytes={bucket_bytes} is smaller than one {spec.dtype} element")
    elem = spec.element_size
    order = {name: i for i, name in enumerate(spec.canonical_shapes())}
    holders: dict[str, list[tuple[int, str, Piece]]] = defaultdict(list)
    for rank in range(src.world_size):
        for tensor in src.rank_tensors(spec, rank):
            for piece in tensor.pieces:
                holders[piece.canonical].append((rank, tensor.name, piece))

    local_copies: list[Move] = []
    needs: list[_Need] = []
    lacking: dict[int, int] = defaultdict(int)
    for dst_rank in range(dst.world_size):
        device = placement.dst_devices[dst_rank]
        for tensor in dst.rank_tensors(spec, dst_rank):
            for piece in tensor.pieces:
                overlapping = []
                for rank, name, held in holders[piece.canonical]:
                    overlap = box_intersect(held.canon_box, piece.canon_box)
                    if overlap is not None:
                        overlapping.append(_Holder(rank, name, held, overlap))
                for cell in _cells(piece.canon_box, [h.overlap for h in overlapping]):
                    owners = tuple(h for h in overlapping if box_contains(h.overlap, cell))
                    if not owners:
                        raise ValueError(
                            f"no source rank of {src} holds {piece.canonical}{list(cell)}, "
                            f"needed by target rank {dst_rank} of {dst}"
                        )
                    local = [h for h in owners if placement.src_devices[h.rank] == device]
                    if local:
                        local_copies.append(_move(local[0], dst_rank, tensor, piece, cell, elem))
                    else:
                        needs.append(_Need(dst_rank, tensor, piece, cell, owners))
                        lacking[dst_rank] += box_numel(cell) * elem

    # Balance senders: cut to 1/8 of the bucket cap first (so one huge tensor can neither pin one
    # sender nor fill a bucket alone), then largest rectangles first, each to the least-loaded
    # device holding it.
    max_part = max(elem, bucket_bytes // _PIECES_PER_BUCKET)
    parts = [need._replace(cell=part) for need in needs for part in _split(need.cell, elem, max_part)]
    parts.sort(key=lambda n: (-box_numel(n.cell), order[n.dst_piece.canonical], n.dst_rank, n.cell))
    outbound: dict[int, int] = defaultdict(int)
    transfers: list[Move] = []
    for need in parts:
        owner = min(need.owners, key=lambda h: (outbound[placement.src_devices[h.rank]], h.rank))
        outbound[placement.src_devices[owner.rank]] += box_numel(need.cell) * elem
        transfers.append(_move(owner, need.dst_rank, need.dst_tensor, need.dst_piece, need.cell, elem))
    transfers.sort(key=lambda m: (order[m.canonical], m.canon_box, m.dst_rank))
    buckets = _pack(transfers, placement, bucket_bytes)

    inbound: dict[int, int] = defaultdict(int)
    for m in transfers:
        inbound[placement.dst_devices[m.dst_rank]] += m.num_bytes
    local_copies.sort(key=lambda m: (m.dst_rank, order[m.canonical], m.canon_box))
    report = PlanReport(
        total_bytes=sum(m.num_bytes for m in transfers),
        lower_bound_bytes=sum(lacking.values()),
        local_copy_bytes=sum(m.num_bytes for m in local_copies),
        max_inbound_bytes=max(inbound.values(), default=0),
        max_outbound_bytes=max(outbound.values(), default=0),
        num_transfers=len(transfers),
        num_local_copies=len(local_copies),
        num_buckets=len(buckets),
        num_sending_devices=len(set(placement.src_devices)),
    )
    return Plan(spec, src, dst, placement, bucket_bytes, tuple(local_copies), buckets, report)


@functools.lru_cache(maxsize=32)
def get_plan(
    spec: Spec,
    src: ParallelLayout,
    dst: ParallelLayout,
    placement: Placement,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> Plan:
    """`make_plan`, cached: weight sync runs every step with the same layouts."""
    return make_plan(spec, src, dst, placement, bucket_bytes)


def _move(owner: _Holder, dst_rank: int, tensor: LocalTensor, piece: Piece, cell: Box, elem: int) -> Move:
    return Move(
        src_rank=owner.rank,
        dst_rank=dst_rank,
        canonical=piece.canonical,
        canon_box=cell,
        src_tensor=owner.tensor,
        src_box=to_local(owner.piece, cell),
        dst_tensor=tensor.name,
        dst_box=to_local(piece, cell),
        num_bytes=box_numel(cell) * elem,
    )


def _cells(box: Box, overlaps: list[Box]) -> list[Box]:
    """Cut `box` along every boundary of `overlaps`: each cell lies wholly inside or outside each."""
    per_dim = []
    for dim, (start, stop) in enumerate(box):
        cuts = {start, stop}
        for overlap in overlaps:
            cuts.update(overlap[dim])
        points = sorted(cuts)
        per_dim.append(list(itertools.pairwise(points)))
    return [tuple(cell) for cell in itertools.product(*per_dim)]


def _split(box: Box, elem: int, cap: int) -> list[Box]:
    """Cut `box` into rectangles of at most `cap` bytes, along its first dimension longer than 1."""
    if box_numel(box) * elem <= cap:
        return [box]
    dim = next(d for d, (start, stop) in enumerate(box) if stop - start > 1)
    start, stop = box[dim]
    step = max(1, cap // (box_numel(box) // (stop - start) * elem))
    out = []
    for lo in range(start, stop, step):
        sub = box[:dim] + ((lo, min(lo + step, stop)),) + box[dim + 1 :]
        out.extend(_split(sub, elem, cap))
    return out


def _pack(transfers: list[Move], placement: Placement, cap: int) -> tuple[tuple[Move, ...], ...]:
    """Buckets in which every link moves its share at the same pace, none staging over `cap` bytes.

    Each (sending device, receiving device) pair's transfers form a stream in plan order. They are
    interleaved by how far along its own stream each transfer lies, then packed first-fit (each to
    the first bucket where neither end exceeds `cap`). So every bucket carries about the same
    fraction of every pair's bytes: a device is never idle in one bucket and the bottleneck of the
    next, and the time of a sync is close to that of its busiest device (not the sum, over
    buckets, of whichever device is busiest in each).
    """
    src_dev, dst_dev = placement.src_devices, placement.dst_devices
    pair_bytes: defaultdict[tuple[int, int], int] = defaultdict(int)
    for m in transfers:
        pair_bytes[(src_dev[m.src_rank], dst_dev[m.dst_rank])] += m.num_bytes
    done: defaultdict[tuple[int, int], int] = defaultdict(int)
    paced = []
    for i, m in enumerate(transfers):
        pair = (src_dev[m.src_rank], dst_dev[m.dst_rank])
        # Exact rational position of the transfer's middle along its pair's stream (no floats:
        # every rank must compute the same order).
        paced.append((Fraction(2 * done[pair] + m.num_bytes, 2 * pair_bytes[pair]), i, m))
        done[pair] += m.num_bytes
    paced.sort(key=lambda x: x[:2])
    loads: list[defaultdict[int, int]] = []
    buckets: list[list[Move]] = []
    for _, _, m in paced:
        sd, dd = src_dev[m.src_rank], dst_dev[m.dst_rank]
        fits = (
            i
            for i, load in enumerate(loads)
            if load[sd] + m.num_bytes <= cap and load[dd] + m.num_bytes <= cap
        )
        i = next(fits, len(buckets))
        if i == len(buckets):
            loads.append(defaultdict(int))
            buckets.append([])
        loads[i][sd] += m.num_bytes
        loads[i][dd] += m.num_bytes
        buckets[i].append(m)
    return tuple(tuple(b) for b in buckets)
