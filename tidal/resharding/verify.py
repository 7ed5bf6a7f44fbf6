"""The verify option: after a sync, every target rectangle against the source rectangle it came from.

Each device checksums, per rectangle, what it received or copied locally; the sender of each
received rectangle checksums its source rectangle and sends the sums along the same transport.
The checksum weights each element's raw bits by its position, so a wrong offset, a swapped pair
of elements or a stale rectangle is found, not only a missing one. A source held in another dtype
than the plan's (fp32 master weights for a bf16 engine) is cast first, as the sync cast it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from tidal.resharding.layout import box_slices
from tidal.resharding.messages import Bucket, TensorsByRank
from tidal.resharding.planner import Move
from tidal.resharding.transports.base import Transport

_CHECKSUM_CHUNK = 1 << 22  # elements converted to int64 at a time while checksumming
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class VerifyReport:
    num_checked: int  # rectangles compared (local copies and received ones)
    mismatches: tuple[str, ...]  # one line per rectangle whose checksum differs from its source

    @property
    def ok(self) -> bool:
        return not self.mismatches


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


def verify_sync(
    transport: Transport,
    dtype: torch.dtype,
    local_copies: tuple[Move, ...],
    buckets: tuple[Bucket, ...],
    sources: TensorsByRank,
    targets: TensorsByRank,
) -> VerifyReport:
    """Checksum every target rectangle of this device against its source; every device of the plan
    must call it (the senders ship their sums to the receivers)."""

    def source_sum(m: Move) -> int:
        return int(checksum(sources[m.src_rank][m.src_tensor][box_slices(m.src_box)].to(dtype)))

    def target_sum(m: Move) -> int:
        return int(checksum(targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)]))

    mismatches = [_describe(m, "local copy") for m in local_copies if source_sum(m) != target_sum(m)]
    checked = len(local_copies)
    send_moves: defaultdict[int, list[Move]] = defaultdict(list)
    recv_moves: defaultdict[int, list[Move]] = defaultdict(list)
    for bucket in buckets:
        for side, by_peer in ((bucket.sends, send_moves), (bucket.recvs, recv_moves)):
            for peer, messages in side:
                by_peer[peer].extend(m for msg in messages for m in msg.moves)
    sends = {
        peer: [torch.tensor([source_sum(m) for m in moves], dtype=torch.int64, device=transport.device)]
        for peer, moves in send_moves.items()
    }
    expected: Mapping[int, torch.Tensor] = {
        peer: torch.empty(len(moves), dtype=torch.int64, device=transport.device)
        for peer, moves in recv_moves.items()
    }
    transport.exchange(
        {peer: [bufs[0].view(torch.uint8)] for peer, bufs in sends.items()},
        {peer: [buf.view(torch.uint8)] for peer, buf in expected.items()},
    )
    for peer, moves in recv_moves.items():
        for m, value in zip(moves, expected[peer].tolist(), strict=True):
            checked += 1
            if target_sum(m) != value:
                mismatches.append(_describe(m, f"from device {peer}"))
    return VerifyReport(checked, tuple(mismatches))


def _describe(m: Move, how: str) -> str:
    return f"target rank {m.dst_rank} {m.dst_tensor}{list(m.dst_box)} <- {m.canonical}{list(m.canon_box)} ({how})"
