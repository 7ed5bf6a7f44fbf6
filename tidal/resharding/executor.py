"""Runs one device's share of a resharding plan over a transport.

Every device builds the same plan (it is pure and cached) and an executor for itself. A sync then:
1. copies the rectangles a source rank on this device already holds into the target tensors;
2. for each bucket, exchanges this device's messages with its peers through the transport: per
   peer, the small rectangles packed into one buffer (plan order), then each large rectangle as a
   message of its own. A large rectangle that is contiguous in memory (a TP shard of rows, say)
   is sent from the source tensor and received into the target tensor as it is: no copy at all.
   Only packed and strided rectangles (column blocks of row-parallel weights) are staged, and
   unpacked into the target tensors after the exchange.

One exchange is in flight at a time; meanwhile the next bucket is packed and the previous one
unpacked, so the staging buffer has two halves, each the most this device stages in one bucket.
With contiguous rectangles going direct, that is well under one bucket (`bucket_bytes`) for TP
reshards. The staging buffer lives only during a sync unless `keep_staging` asks to reuse it.

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

DEFAULT_MIN_DIRECT_BYTES = 64 << 10  # smaller rectangles are packed: one message each would cost more
_CHECKSUM_CHUNK = 1 << 22  # elements converted to int64 at a time while checksumming
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class _Message:
    """One buffer between this device and a peer: packed small rectangles, or one large rectangle.

    Both ends cut a pair's moves into messages the same way (from the plan alone). Each end then
    decides for itself whether its side of a one-rectangle message is the tensor's own memory
    (`direct`: the rectangle is contiguous, so nothing is copied) or a slice of the staging buffer.
    """

    moves: tuple[Move, ...]
    num_elements: int
    direct: bool
    offset: int  # into the staging buffer, when not direct


@dataclass(frozen=True)
class _Bucket:
    sends: tuple[tuple[int, tuple[_Message, ...]], ...]  # (peer, its messages in order)
    recvs: tuple[tuple[int, tuple[_Message, ...]], ...]
    staged_elements: int


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


def is_contiguous(box: Box, shape: tuple[int, ...]) -> bool:
    """Whether `box` of a row-major tensor of `shape` is one contiguous run of memory: after its
    first dimension of extent > 1, every dimension is whole."""
    spread = False
    for (start, stop), n in zip(box, shape, strict=True):
        if spread and (start, stop) != (0, n):
            return False
        spread = spread or stop - start > 1
    return True


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
    """The device `transport.rank` of `plan.placement`: its local copies, sends and receives.

    Rectangles of at least `min_direct_bytes` travel as messages of their own, straight from and
    into tensor memory where they are contiguous (most TP shards are row blocks); smaller ones and
    strided ones (column blocks of row-parallel weights) go through the staging buffer.
    """

    def __init__(
        self,
        plan: Plan,
        transport: Transport,
        keep_staging: bool = False,
        min_direct_bytes: int = DEFAULT_MIN_DIRECT_BYTES,
    ):
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
        spec = plan.spec
        src_shapes = {(r, t.name): t.shape for r in self.src_ranks for t in plan.src.rank_tensors(spec, r)}
        dst_shapes = {(r, t.name): t.shape for r in self.dst_ranks for t in plan.dst.rank_tensors(spec, r)}
        buckets = []
        for sends, recvs in zip(ops.sends, ops.recvs, strict=True):
            if not sends and not recvs:
                continue
            staged = 0
            sides = []
            for moves, peer_of, direct in (
                (
                    sends,
                    lambda m: dst_dev[m.dst_rank],
                    lambda m: is_contiguous(m.src_box, src_shapes[(m.src_rank, m.src_tensor)]),
                ),
                (
                    recvs,
                    lambda m: src_dev[m.src_rank],
                    lambda m: is_contiguous(m.dst_box, dst_shapes[(m.dst_rank, m.dst_tensor)]),
                ),
            ):
                by_peer: defaultdict[int, list[Move]] = defaultdict(list)
                for m in moves:
                    by_peer[peer_of(m)].append(m)
                side = []
                for peer, ms in sorted(by_peer.items()):
                    messages = []
                    for group, is_direct in _cut(ms, min_direct_bytes, direct):
                        n = sum(box_numel(m.src_box) for m in group)
                        messages.append(_Message(group, n, is_direct, staged))
                        staged += 0 if is_direct else n
                    side.append((peer, tuple(messages)))
                sides.append(tuple(side))
            buckets.append(_Bucket(sides[0], sides[1], staged))
        self._buckets = tuple(buckets)
        self._elem = spec.element_size
        self._staging_elements = max((b.staged_elements for b in self._buckets), default=0)
        self._staging: torch.Tensor | None = None

    @property
    def received_moves(self) -> tuple[Move, ...]:
        """The rectangles this device receives, in the order they arrive."""
        return tuple(m for b in self._buckets for _, msgs in b.recvs for msg in msgs for m in msg.moves)

    @property
    def staging_bytes(self) -> int:
        """The staging buffer of a sync: twice the most this device packs in one bucket."""
        return 2 * self._staging_elements * self._elem

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
        # Two halves of the staging buffer: bucket k+1 is packed, and bucket k-1 unpacked, while
        # bucket k is on the wire (one exchange in flight at a time, so messages cannot mix).
        staging = self._staging_buffer()
        halves = (staging[: self._staging_elements], staging[self._staging_elements :])
        pending, unpack = None, []
        nxt = self._prepare(0, sources, targets, halves[0]) if self._buckets else None
        if not self._buckets:
            self._copy_local(sources, targets)
        for k in range(len(self._buckets)):
            sends, recvs, to_unpack = nxt
            pending = self.transport.start(sends, recvs)
            if k == 0:  # while the first bucket is on the wire
                self._copy_local(sources, targets)
            for moves, buf in unpack:  # the previous bucket's staged rectangles
                _unpack(moves, buf, targets)
            if k + 1 < len(self._buckets):
                nxt = self._prepare(k + 1, sources, targets, halves[(k + 1) % 2])
            pending.wait()
            unpack = to_unpack
        for moves, buf in unpack:
            _unpack(moves, buf, targets)
        sent = sum(msg.num_elements for b in self._buckets for _, ms in b.sends for msg in ms) * self._elem
        received = (
            sum(msg.num_elements for b in self._buckets for _, ms in b.recvs for msg in ms) * self._elem
        )
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

    def _copy_local(self, sources: TensorsByRank, targets: TensorsByRank) -> None:
        for m in self._local_copies:
            src = sources[m.src_rank][m.src_tensor][box_slices(m.src_box)]
            targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)].copy_(src.reshape(_extents(m.dst_box)))

    def _staging_buffer(self) -> torch.Tensor:
        if self._staging is None:
            self._staging = torch.empty(
                2 * self._staging_elements, dtype=self.plan.spec.torch_dtype, device=self.transport.device
            )
        return self._staging

    def _prepare(self, k: int, sources: TensorsByRank, targets: TensorsByRank, staging: torch.Tensor):
        """Bucket k's send and receive buffers (packing what is staged) and what to unpack after."""
        bucket = self._buckets[k]
        sends: dict[int, list[torch.Tensor]] = {}
        for peer, messages in bucket.sends:
            sends[peer] = []
            for msg in messages:
                if msg.direct:
                    m = msg.moves[0]
                    buf = sources[m.src_rank][m.src_tensor][box_slices(m.src_box)].view(-1)
                else:
                    buf = staging[msg.offset : msg.offset + msg.num_elements]
                    _pack(msg.moves, sources, buf)
                sends[peer].append(buf.view(torch.uint8))
        recvs: dict[int, list[torch.Tensor]] = {}
        unpack = []
        for peer, messages in bucket.recvs:
            recvs[peer] = []
            for msg in messages:
                if msg.direct:
                    m = msg.moves[0]
                    buf = targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)].view(-1)
                else:
                    buf = staging[msg.offset : msg.offset + msg.num_elements]
                    unpack.append((msg.moves, buf))
                recvs[peer].append(buf.view(torch.uint8))
        return sends, recvs, unpack

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
                if not got.is_contiguous():
                    raise ValueError(
                        f"{what} rank {rank} tensor {t.name} is not contiguous; pass the parameter "
                        "itself (the executor reads and writes rectangles of its memory in place)"
                    )

    # ---------------------------------------------------------------------------------- verify

    def verify(self, sources: TensorsByRank, targets: TensorsByRank) -> VerifyReport:
        """Checksum every target rectangle against its source; every device of the plan must call it."""
        mismatches: list[str] = []
        checked = 0
        for m in self._local_copies:
            src = sources[m.src_rank][m.src_tensor][box_slices(m.src_box)]
            dst = targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)]
            checked += 1
            if int(checksum(src)) != int(checksum(dst)):
                mismatches.append(_describe(m, "local copy"))
        # The sender checksums what it holds; the receiver compares with what it got.
        send_moves: defaultdict[int, list[Move]] = defaultdict(list)
        recv_moves: defaultdict[int, list[Move]] = defaultdict(list)
        for bucket in self._buckets:
            for side, by_peer in ((bucket.sends, send_moves), (bucket.recvs, recv_moves)):
                for peer, messages in side:
                    by_peer[peer].extend(m for msg in messages for m in msg.moves)
        sends = {
            peer: [
                torch.stack(
                    [checksum(sources[m.src_rank][m.src_tensor][box_slices(m.src_box)]) for m in moves]
                ).view(torch.uint8)
            ]
            for peer, moves in send_moves.items()
        }
        expected = {
            peer: torch.empty(len(moves), dtype=torch.int64, device=self.transport.device)
            for peer, moves in recv_moves.items()
        }
        self.transport.exchange(sends, {peer: [buf.view(torch.uint8)] for peer, buf in expected.items()})
        for peer, moves in recv_moves.items():
            for m, value in zip(moves, expected[peer].tolist(), strict=True):
                checked += 1
                got = checksum(targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)])
                if int(got) != value:
                    mismatches.append(_describe(m, f"from device {peer}"))
        return VerifyReport(checked, tuple(mismatches))


def _cut(moves: list[Move], min_direct_bytes: int, contiguous) -> list[tuple[tuple[Move, ...], bool]]:
    """A pair's moves as messages: the small ones packed together first, then one per large move
    (from the plan alone, so both ends agree), each with whether this end's side needs no copy."""
    small = tuple(m for m in moves if m.num_bytes < min_direct_bytes)
    out = [(small, False)] if small else []
    out += [((m,), contiguous(m)) for m in moves if m.num_bytes >= min_direct_bytes]
    return out


def _pack(moves: tuple[Move, ...], sources: TensorsByRank, buf: torch.Tensor) -> None:
    offset = 0
    for m in moves:
        n = box_numel(m.src_box)
        src = sources[m.src_rank][m.src_tensor][box_slices(m.src_box)]
        buf[offset : offset + n].view(_extents(m.src_box)).copy_(src)
        offset += n


def _unpack(moves: tuple[Move, ...], buf: torch.Tensor, targets: TensorsByRank) -> None:
    offset = 0
    for m in moves:
        n = box_numel(m.dst_box)
        targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)].copy_(
            buf[offset : offset + n].view(_extents(m.dst_box))
        )
        offset += n


def _describe(m: Move, how: str) -> str:
    return f"target rank {m.dst_rank} {m.dst_tensor}{list(m.dst_box)} <- {m.canonical}{list(m.canon_box)} ({how})"
