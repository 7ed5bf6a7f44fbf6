"""Runs one device's share of a resharding plan over a transport.

Every device builds the same plan (it is pure and cached) and an executor for itself. A sync then:
1. copies the rectangles a source rank on this device already holds into the target tensors;
2. for each bucket, packs the rectangles for each receiving peer into one flat buffer (plan order),
   exchanges all of this bucket's buffers through the transport, and unpacks what arrived straight
   into the target tensors.

All buffers of a bucket are views of one staging buffer, sized to the largest bucket this device
takes part in (the plan caps that at `bucket_bytes`), so the extra memory of a sync is one bucket.
The staging buffer lives only during a sync unless `keep_staging` asks to reuse it.

Target tensors are the caller's (an engine's parameters, or `allocate_targets()`): they are written
in place, and padding elements (vocabulary rows no piece covers) are left as the caller has them.

`verify` (or `sync(..., verify=True)`) compares a positional checksum of every rectangle each target
tensor received with the checksum of the source rectangle it came from, on the sender's side, so a
wrong offset, a swapped pair of elements or a stale rectangle is found, not only a missing one.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tidal.resharding.layout import Box, ParallelLayout, box_numel, box_slices
from tidal.resharding.planner import Move, Plan
from tidal.resharding.transports.base import Transport

RankTensors = Mapping[str, torch.Tensor]
TensorsByRank = Mapping[int, RankTensors]

_CHECKSUM_CHUNK = 1 << 22  # elements converted to int64 at a time while checksumming
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class _Transfer:
    """The rectangles one bucket moves between this device and one peer, packed in this order."""

    peer: int
    moves: tuple[Move, ...]
    num_elements: int


@dataclass(frozen=True)
class _Bucket:
    sends: tuple[_Transfer, ...]
    recvs: tuple[_Transfer, ...]

    @property
    def num_elements(self) -> int:
        return sum(t.num_elements for t in (*self.sends, *self.recvs))


@dataclass(frozen=True)
class SyncStats:
    seconds: float
    bytes_sent: int
    bytes_received: int
    local_copy_bytes: int
    num_buckets: int  # buckets this device took part in
    staging_bytes: int  # the extra memory of the sync: one staging buffer


@dataclass(frozen=True)
class VerifyReport:
    num_checked: int  # rectangles compared (local copies and received ones)
    mismatches: tuple[str, ...]  # one line per rectangle whose checksum differs from its source

    @property
    def ok(self) -> bool:
        return not self.mismatches


def _extents(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def _group(moves: tuple[Move, ...], peer_of) -> tuple[_Transfer, ...]:
    by_peer: defaultdict[int, list[Move]] = defaultdict(list)
    for m in moves:
        by_peer[peer_of(m)].append(m)
    return tuple(
        _Transfer(peer, tuple(ms), sum(box_numel(m.src_box) for m in ms)) for peer, ms in sorted(by_peer.items())
    )


def checksum(rect: torch.Tensor) -> torch.Tensor:
    """A position-weighted sum of the raw bits of `rect` (int64, wrapping): equal contents in
    row-major order give equal sums on any device, and moving an element changes the sum."""
    bits = rect.view(_INT_OF_SIZE[rect.element_size()])
    while bits.dim() > 1 and bits.shape[0] == 1:  # a stacking index: chunk along the real rows
        bits = bits[0]
    if bits.dim() == 0:
        bits = bits.reshape(1)
    num_rows = bits.shape[0]
    per_row = bits.numel() // max(num_rows, 1)
    step = max(1, _CHECKSUM_CHUNK // max(per_row, 1))
    total = torch.zeros((), dtype=torch.int64, device=rect.device)
    for r0 in range(0, num_rows, step):
        x = bits[r0 : r0 + step].reshape(-1).to(torch.int64)
        pos = torch.arange(r0 * per_row, r0 * per_row + x.numel(), device=rect.device)
        total += (x * (pos % 65521 + 1)).sum()
    return total


class ReshardExecutor:
    """The device `transport.rank` of `plan.placement`: its local copies, sends and receives."""

    def __init__(self, plan: Plan, transport: Transport, keep_staging: bool = False):
        devices = (*plan.placement.src_devices, *plan.placement.dst_devices)
        if max(devices) >= transport.world_size:
            raise ValueError(
                f"the plan's placement uses devices up to {max(devices)}, but the transport's group has "
                f"{transport.world_size} ranks; build the transport on the group that holds every device"
            )
        self.plan = plan
        self.transport = transport
        self.device = transport.rank
        self.keep_staging = keep_staging
        src_dev, dst_dev = plan.placement.src_devices, plan.placement.dst_devices
        self.src_ranks = tuple(r for r, d in enumerate(src_dev) if d == self.device)
        self.dst_ranks = tuple(r for r, d in enumerate(dst_dev) if d == self.device)
        ops = plan.device_ops(self.device)
        self._local_copies = ops.local_copies
        buckets = (
            _Bucket(_group(s, lambda m: dst_dev[m.dst_rank]), _group(r, lambda m: src_dev[m.src_rank]))
            for s, r in zip(ops.sends, ops.recvs, strict=True)
        )
        self._buckets = tuple(b for b in buckets if b.sends or b.recvs)
        self._elem = plan.spec.element_size
        self._staging_elements = max((b.num_elements for b in self._buckets), default=0)
        self._staging: torch.Tensor | None = None

    @property
    def received_moves(self) -> tuple[Move, ...]:
        """The rectangles this device receives, in the order they arrive."""
        return tuple(m for b in self._buckets for t in b.recvs for m in t.moves)

    @property
    def staging_bytes(self) -> int:
        return self._staging_elements * self._elem

    def allocate_targets(self) -> dict[int, dict[str, torch.Tensor]]:
        """Zero-filled target tensors of every target rank on this device (padding reads 0)."""
        spec, dtype = self.plan.spec, self.plan.spec.torch_dtype
        return {
            r: {
                t.name: torch.zeros(t.shape, dtype=dtype, device=self.transport.device)
                for t in self.plan.dst.rank_tensors(spec, r)
            }
            for r in self.dst_ranks
        }

    # ------------------------------------------------------------------------------------ sync

    def sync(self, sources: TensorsByRank, targets: TensorsByRank, verify: bool = False) -> SyncStats:
        """Move this device's share of the plan; every device of the placement must call it."""
        self._check(sources, self.plan.src, self.src_ranks, "source")
        self._check(targets, self.plan.dst, self.dst_ranks, "target")
        start = time.perf_counter()
        for m in self._local_copies:
            src = sources[m.src_rank][m.src_tensor][box_slices(m.src_box)]
            targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)].copy_(src.reshape(_extents(m.dst_box)))
        staging = self._staging_buffer()
        sent = received = 0
        for bucket in self._buckets:
            offset = 0
            sends, recvs = {}, {}
            for t in bucket.sends:
                buf = staging[offset : offset + t.num_elements]
                offset += t.num_elements
                self._pack(t, sources, buf)
                sends[t.peer] = buf.view(torch.uint8)
                sent += buf.numel() * self._elem
            views = []
            for t in bucket.recvs:
                buf = staging[offset : offset + t.num_elements]
                offset += t.num_elements
                recvs[t.peer] = buf.view(torch.uint8)
                views.append((t, buf))
                received += buf.numel() * self._elem
            self.transport.exchange(sends, recvs)
            for t, buf in views:
                self._unpack(t, buf, targets)
        if not self.keep_staging:
            self._staging = None
        if self.transport.device.type == "cuda":
            torch.cuda.synchronize(self.transport.device)
        stats = SyncStats(
            seconds=time.perf_counter() - start,
            bytes_sent=sent,
            bytes_received=received,
            local_copy_bytes=sum(m.num_bytes for m in self._local_copies),
            num_buckets=len(self._buckets),
            staging_bytes=self.staging_bytes,
        )
        if verify:
            report = self.verify(sources, targets)
            if not report.ok:
                raise RuntimeError(
                    f"resharding verify failed on device {self.device}: {len(report.mismatches)} of "
                    f"{report.num_checked} rectangles differ from their source, e.g. {report.mismatches[:3]}"
                )
        return stats

    def _staging_buffer(self) -> torch.Tensor:
        if self._staging is None:
            self._staging = torch.empty(
                self._staging_elements, dtype=self.plan.spec.torch_dtype, device=self.transport.device
            )
        return self._staging

    @staticmethod
    def _pack(transfer: _Transfer, sources: TensorsByRank, buf: torch.Tensor) -> None:
        offset = 0
        for m in transfer.moves:
            n = box_numel(m.src_box)
            src = sources[m.src_rank][m.src_tensor][box_slices(m.src_box)]
            buf[offset : offset + n].view(_extents(m.src_box)).copy_(src)
            offset += n

    @staticmethod
    def _unpack(transfer: _Transfer, buf: torch.Tensor, targets: TensorsByRank) -> None:
        offset = 0
        for m in transfer.moves:
            n = box_numel(m.dst_box)
            dst = targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)]
            dst.copy_(buf[offset : offset + n].view(_extents(m.dst_box)))
            offset += n

    def _check(self, given: TensorsByRank, layout: ParallelLayout, ranks: tuple[int, ...], what: str) -> None:
        spec = self.plan.spec
        for rank in ranks:
            if rank not in given:
                raise ValueError(
                    f"device {self.device} holds {what} rank {rank} of {layout} but no tensors were "
                    f"given for it; pass {{{rank}: {{name: tensor}}}}"
                )
            for t in layout.rank_tensors(spec, rank):
                if t.name not in given[rank]:
                    raise ValueError(f"{what} rank {rank} lacks tensor {t.name!r} of {layout}")
                got = given[rank][t.name]
                if tuple(got.shape) != t.shape or got.dtype != spec.torch_dtype:
                    raise ValueError(
                        f"{what} rank {rank} tensor {t.name} is {tuple(got.shape)} {got.dtype}; "
                        f"{layout} expects {t.shape} {spec.torch_dtype}"
                    )
                if got.device != self.transport.device:
                    raise ValueError(
                        f"{what} rank {rank} tensor {t.name} is on {got.device}; the transport "
                        f"{type(self.transport).__name__} works on {self.transport.device}"
                    )

    # ---------------------------------------------------------------------------------- verify

    def verify(self, sources: TensorsByRank, targets: TensorsByRank) -> VerifyReport:
        """Checksum every target rectangle against its source; every device of the plan must call it."""
        mismatches: list[str] = []
        checked = 0
        for m in self._local_copies:
            src = sources[m.src_rank][m.src_tensor][box_slices(m.src_box)].reshape(_extents(m.canon_box))
            dst = targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)].reshape(_extents(m.canon_box))
            checked += 1
            if int(checksum(src)) != int(checksum(dst)):
                mismatches.append(_describe(m, "local copy"))
        # The sender checksums what it holds; the receiver compares with what it got.
        send_moves: defaultdict[int, list[Move]] = defaultdict(list)
        recv_moves: defaultdict[int, list[Move]] = defaultdict(list)
        for bucket in self._buckets:
            for t in bucket.sends:
                send_moves[t.peer].extend(t.moves)
            for t in bucket.recvs:
                recv_moves[t.peer].extend(t.moves)
        sends = {
            peer: torch.stack(
                [checksum(sources[m.src_rank][m.src_tensor][box_slices(m.src_box)]) for m in moves]
            ).view(torch.uint8)
            for peer, moves in send_moves.items()
        }
        expected = {
            peer: torch.empty(len(moves), dtype=torch.int64, device=self.transport.device)
            for peer, moves in recv_moves.items()
        }
        self.transport.exchange(sends, {peer: buf.view(torch.uint8) for peer, buf in expected.items()})
        for peer, moves in recv_moves.items():
            want = expected[peer].tolist()
            for m, value in zip(moves, want, strict=True):
                checked += 1
                got = checksum(targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)])
                if int(got) != value:
                    mismatches.append(_describe(m, f"from device {peer}"))
        return VerifyReport(checked, tuple(mismatches))


def _describe(m: Move, how: str) -> str:
    return f"target rank {m.dst_rank} {m.dst_tensor}{list(m.dst_box)} <- {m.canonical}{list(m.canon_box)} ({how})"
