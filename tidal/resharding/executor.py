"""Runs one device's share of a resharding plan over a transport.

Every device builds the same plan (it is pure and cached) and an executor for itself. A sync then
goes bucket by bucket (the buffers of a bucket: messages.py), keeping two buckets on the wire
where the transport allows it (`Transport.max_in_flight`):
1. buckets k and k+1 are posted; meanwhile this device copies bucket k's share of the local
   rectangles (those a source rank on this device already holds);
2. wait for bucket k, unpack its staged rectangles, pack and post bucket k+2 (k+1 still moving).
With one bucket in flight (CUDA IPC), bucket k+1 is packed while k moves and posted right after.
Local copies are spread over the buckets by bytes, not done up front: a device whose target is
mostly local would otherwise hold back its sends while it copies, and its peers would wait.

The staging buffer has two halves, one per bucket on the wire, each the most this device stages
in one bucket; with contiguous rectangles going direct, that is well under one bucket
(`bucket_bytes`) for TP reshards. On a CPU it lives only during a sync unless `keep_staging` asks to
reuse it; on a GPU it is kept. The views a sync copies through (hundreds of rectangles of the
caller's tensors and of the staging buffer) are built once and reused while the caller passes the
same tensors: on a GPU, building them cost more host time than the copies take on the device.

Target tensors are the caller's (an engine's parameters, or `allocate_targets()`): they are written
in place, and padding elements (vocabulary rows no piece covers) are left as the caller has them.
Sources may be held in another floating dtype than the plan's (fp32 master weights feeding a bf16
engine: `src_dtype`); they are cast on the sender's side, so the wire carries the plan's dtype.

`verify` (or `sync(..., verify=True)`) checks every target rectangle against its source
(verify.py). `SyncStats` splits the time into local copies, packing, unpacking and waiting on the
transport, so where a sync loses time against the wire can be read off.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tidal.resharding.layout import ParallelLayout, box_slices
from tidal.resharding.messages import (
    DEFAULT_MIN_DIRECT_BYTES,
    Bucket,
    Copies,
    PeerMessages,
    TensorsByRank,
    Views,
    device_buckets,
    local_views,
    pack_views,
    unpack_views,
)
from tidal.resharding.planner import Move, Plan
from tidal.resharding.transports.base import Pending, Transport
from tidal.resharding.verify import VerifyReport, verify_sync

__all__ = ["ReshardExecutor", "SyncStats"]


@dataclass(frozen=True)
class SyncStats:
    seconds: float
    bytes_sent: int
    bytes_received: int
    local_copy_bytes: int
    num_buckets: int  # buckets this device took part in
    staging_bytes: int  # the extra memory of the sync: one staging buffer
    # Where the time went on this device (the rest is the executor's own bookkeeping):
    local_copy_s: float = 0.0  # copying rectangles already on this device
    pack_s: float = 0.0  # staging outgoing rectangles (strided, small, or cast)
    unpack_s: float = 0.0  # staged incoming rectangles into the targets
    post_s: float = 0.0  # handing buffers to the transport
    wait_s: float = 0.0  # blocked until the transport finished a bucket


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
        keep_staging: bool | None = None,
        min_direct_bytes: int = DEFAULT_MIN_DIRECT_BYTES,
        src_dtype: torch.dtype | None = None,
        fused_copies: bool | None = None,
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
        # Kept between syncs on a GPU (the caching allocator would hold the memory anyway), so the
        # views of the staging buffer, built once, stay valid: see `_views`.
        self.keep_staging = transport.device.type == "cuda" if keep_staging is None else keep_staging
        self.fused_copies = fused_copies  # None: fused on a GPU (messages.copy_all); False: the loop
        self.dtype = plan.spec.torch_dtype
        self.src_dtype = self.dtype if src_dtype is None else src_dtype
        if not (self.src_dtype.is_floating_point or self.src_dtype == self.dtype):
            raise ValueError(
                f"src_dtype={self.src_dtype} can only differ from the plan's dtype {self.dtype} when "
                "both are floating point (the sender casts)"
            )
        src_dev, dst_dev = plan.placement.src_devices, plan.placement.dst_devices
        self.src_ranks = tuple(r for r, d in enumerate(src_dev) if d == self.device)
        self.dst_ranks = tuple(r for r, d in enumerate(dst_dev) if d == self.device)
        self.local_copies: tuple[Move, ...] = plan.device_ops(self.device).local_copies
        self.buckets: tuple[Bucket, ...] = device_buckets(
            plan, self.device, min_direct_bytes, send_direct=self.src_dtype == self.dtype
        )
        self._copy_shares = _spread(self.local_copies, max(1, len(self.buckets)))
        self._elem = plan.spec.element_size
        self._staging_elements = max((b.staged_elements for b in self.buckets), default=0)
        self._staging: torch.Tensor | None = None
        self._cached_views: tuple[tuple, _SyncViews] | None = None

    @property
    def received_moves(self) -> tuple[Move, ...]:
        """The rectangles this device receives, in the order they arrive."""
        return tuple(m for b in self.buckets for _, msgs in b.recvs for msg in msgs for m in msg.moves)

    @property
    def staging_bytes(self) -> int:
        """The staging buffer of a sync: twice the most this device packs in one bucket."""
        return 2 * self._staging_elements * self._elem

    def allocate_targets(self) -> dict[int, dict[str, torch.Tensor]]:
        """Zero-filled target tensors of every target rank on this device (padding reads 0)."""
        spec = self.plan.spec
        return {
            r: {
                t.name: torch.zeros(t.shape, dtype=self.dtype, device=self.transport.device)
                for t in self.plan.dst.rank_tensors(spec, r)
            }
            for r in self.dst_ranks
        }

    # ------------------------------------------------------------------------------------ sync

    def sync(self, sources: TensorsByRank, targets: TensorsByRank, verify: bool = False) -> SyncStats:
        """Move this device's share of the plan; every device of the placement must call it."""
        self._check(sources, self.plan.src, self.src_ranks, self.src_dtype, "source")
        self._check(targets, self.plan.dst, self.dst_ranks, self.dtype, "target")
        clock = _Clock()
        views = self._views(sources, targets, self._staging_buffer())
        n = len(self.buckets)
        # Two buckets on the wire at a time where the transport allows it: while one is waited
        # for, the next is already moving, so this device's copies never leave the link idle.
        depth = 2 if self.transport.max_in_flight >= 2 else 1
        packed: set[int] = set()  # buckets packed ahead (depth 1: k+1 is packed while k flies)
        flying: deque[Pending] = deque()

        def pack(j: int) -> None:
            with clock("pack_s"):
                views.buckets[j].pack.run()
            packed.add(j)

        def post(j: int) -> None:
            if j not in packed:
                pack(j)
            with clock("post_s"):
                flying.append(self.transport.start(views.buckets[j].sends, views.buckets[j].recvs))

        for j in range(min(depth, n)):
            post(j)
        for k in range(max(n, 1)):
            with clock("local_copy_s"):
                views.copies[k].run()
            if k >= n:
                break  # nothing to exchange: local copies only
            if depth == 1 and k + 1 < n:  # pack the next bucket into the other half while k flies
                pack(k + 1)
            with clock("wait_s"):
                flying.popleft().wait()
            if depth == 1 and k + 1 < n:
                post(k + 1)
            with clock("unpack_s"):
                views.buckets[k].unpack.run()
            if depth == 2 and k + 2 < n:
                post(k + 2)  # into bucket k's half, free now that k is unpacked
        if not self.keep_staging:
            self._staging = None
            self._cached_views = None  # they hold the staging buffer
        if self.transport.device.type == "cuda":
            torch.cuda.synchronize(self.transport.device)
        stats = SyncStats(
            seconds=clock.elapsed(),
            bytes_sent=self._elem
            * sum(msg.num_elements for b in self.buckets for _, ms in b.sends for msg in ms),
            bytes_received=self._elem
            * sum(msg.num_elements for b in self.buckets for _, ms in b.recvs for msg in ms),
            local_copy_bytes=sum(m.num_bytes for m in self.local_copies),
            num_buckets=len(self.buckets),
            staging_bytes=self.staging_bytes,
            **clock.totals,
        )
        if verify:
            report = self.verify(sources, targets)
            if not report.ok:
                raise RuntimeError(
                    f"resharding verify failed on device {self.device}: {len(report.mismatches)} of "
                    f"{report.num_checked} rectangles differ from their source, e.g. {report.mismatches[:3]}"
                )
        return stats

    def verify(self, sources: TensorsByRank, targets: TensorsByRank) -> VerifyReport:
        """Checksum every target rectangle against its source; every device of the plan must call it."""
        return verify_sync(self.transport, self.dtype, self.local_copies, self.buckets, sources, targets)

    def _staging_buffer(self) -> torch.Tensor:
        if self._staging is None:
            self._staging = torch.empty(
                2 * self._staging_elements, dtype=self.dtype, device=self.transport.device
            )
        return self._staging

    def _views(self, sources: TensorsByRank, targets: TensorsByRank, staging: torch.Tensor) -> _SyncViews:
        """Every view a sync copies from or into, built on the first sync and kept while the caller
        passes the same tensors (same addresses: the cached views keep the old ones alive, so an
        address cannot be reused by another tensor meanwhile). Building them costs a few
        microseconds per rectangle, which on a GPU is more than the copies themselves."""
        key = (
            staging.data_ptr(),
            *(t.data_ptr() for r in self.src_ranks for t in sources[r].values()),
            *(t.data_ptr() for r in self.dst_ranks for t in targets[r].values()),
        )
        if self._cached_views is None or self._cached_views[0] != key:
            self._cached_views = (key, self._build_views(sources, targets, staging))
        return self._cached_views[1]

    def _build_views(
        self, sources: TensorsByRank, targets: TensorsByRank, staging: torch.Tensor
    ) -> _SyncViews:
        fused = self.fused_copies
        halves = (staging[: self._staging_elements], staging[self._staging_elements :])
        buckets = []
        for k, bucket in enumerate(self.buckets):
            half = halves[k % 2]
            sends, packs = _side_views(
                bucket.sends,
                half,
                lambda m: sources[m.src_rank][m.src_tensor][box_slices(m.src_box)],
                lambda moves, buf: pack_views(moves, sources, buf),
            )
            recvs, unpacks = _side_views(
                bucket.recvs,
                half,
                lambda m: targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)],
                lambda moves, buf: unpack_views(moves, buf, targets),
            )
            buckets.append(_BucketViews(sends, recvs, Copies(*packs, fused), Copies(*unpacks, fused)))
        copies = [Copies(*local_views(share, sources, targets), fused) for share in self._copy_shares]
        return _SyncViews(copies, buckets)

    def _check(
        self,
        given: TensorsByRank,
        layout: ParallelLayout,
        ranks: tuple[int, ...],
        dtype: torch.dtype,
        what: str,
    ) -> None:
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
                if tuple(got.shape) != t.shape or got.dtype != dtype:
                    raise ValueError(
                        f"{what} rank {rank} tensor {t.name} is {tuple(got.shape)} {got.dtype}; "
                        f"{layout} expects {t.shape} {dtype}"
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


@dataclass(frozen=True)
class _BucketViews:
    sends: dict[int, list[torch.Tensor]]  # peer -> uint8 buffers (tensor memory or staging slices)
    recvs: dict[int, list[torch.Tensor]]
    pack: Copies  # source rectangles -> staging, before the send
    unpack: Copies  # staging -> target rectangles, after the receive


@dataclass(frozen=True)
class _SyncViews:
    copies: list[Copies]  # the local copies done while bucket k is on the wire
    buckets: list[_BucketViews]


def _side_views(
    side: PeerMessages,
    half: torch.Tensor,
    region: Callable[[Move], torch.Tensor],
    staged: Callable[[tuple[Move, ...], torch.Tensor], Views],
) -> tuple[dict[int, list[torch.Tensor]], Views]:
    """One side of a bucket: per peer its uint8 buffers (the tensor's own `region` of a direct
    message, else a slice of the staging `half`), and the `staged` copies between those slices and
    their rectangles (packing before a send, unpacking after a receive)."""
    buffers: dict[int, list[torch.Tensor]] = {}
    copies: Views = ([], [])
    for peer, messages in side:
        buffers[peer] = []
        for msg in messages:
            if msg.direct:
                buf = region(msg.moves[0]).view(-1)
            else:
                buf = half[msg.offset : msg.offset + msg.num_elements]
                dsts, srcs = staged(msg.moves, buf)
                copies[0].extend(dsts)
                copies[1].extend(srcs)
            buffers[peer].append(buf.view(torch.uint8))
    return buffers, copies


def _spread(moves: tuple[Move, ...], parts: int) -> tuple[tuple[Move, ...], ...]:
    """`moves` in order, cut into `parts` runs of about equal bytes (some may be empty)."""
    total = sum(m.num_bytes for m in moves)
    out: list[list[Move]] = [[] for _ in range(parts)]
    done = 0
    for m in moves:
        # The run a move falls in is where its middle byte lies: large moves are never split.
        index = min(parts - 1, (done + m.num_bytes // 2) * parts // max(total, 1))
        out[index].append(m)
        done += m.num_bytes
    return tuple(tuple(run) for run in out)


class _Clock:
    """Wall time of a sync and of its named parts (`with clock("pack_s"): ...`)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.totals = dict.fromkeys(("local_copy_s", "pack_s", "unpack_s", "post_s", "wait_s"), 0.0)
        self._part = ""
        self._t0 = 0.0

    def __call__(self, part: str) -> _Clock:
        self._part = part
        return self

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.totals[self._part] += time.perf_counter() - self._t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
