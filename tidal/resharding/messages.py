"""How one device's share of a plan becomes the buffers it exchanges with its peers.

Within a bucket, the moves between one pair of devices travel as messages: the small rectangles
packed together into one message (plan order), then each large rectangle as a message of its
own. Both ends cut a pair's moves into messages the same way, from the plan alone, so the i-th
message one end sends is the i-th the other receives, with the same size.

Each end then decides for itself whether its side of a one-rectangle message is the tensor's own
memory (`direct`: the rectangle is one contiguous run, e.g. a TP shard of rows, and needs no cast)
or a slice of the staging buffer, packed before the send or unpacked after the receive. Column
blocks of row-parallel weights are strided and always staged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from tidal.resharding.layout import Box, box_numel, box_slices
from tidal.resharding.planner import Move, Plan

RankTensors = Mapping[str, torch.Tensor]
TensorsByRank = Mapping[int, RankTensors]
PeerMessages = tuple[tuple[int, tuple["Message", ...]], ...]  # (peer, its messages in order)

DEFAULT_MIN_DIRECT_BYTES = 64 << 10  # smaller rectangles are packed: one message each would cost more


@dataclass(frozen=True)
class Message:
    """One buffer between this device and a peer: packed small rectangles, or one large rectangle."""

    moves: tuple[Move, ...]
    num_elements: int
    direct: bool  # this end reads/writes the tensor's own memory (one contiguous rectangle)
    offset: int  # into the staging buffer, when not direct


@dataclass(frozen=True)
class Bucket:
    sends: PeerMessages
    recvs: PeerMessages
    staged_elements: int  # the part of the staging buffer this bucket uses


def extents(box: Box) -> tuple[int, ...]:
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


def device_buckets(
    plan: Plan, device: int, min_direct_bytes: int, send_direct: bool = True
) -> tuple[Bucket, ...]:
    """The buckets `device` takes part in, as messages per peer (buckets without it are skipped).

    send_direct=False stages every outgoing rectangle (the sources are cast to the plan's dtype
    on the way into the staging buffer, so none can be sent from its own memory).
    """
    src_dev, dst_dev = plan.placement.src_devices, plan.placement.dst_devices
    spec = plan.spec
    ops = plan.device_ops(device)
    src_shapes = {
        (r, t.name): t.shape
        for r, d in enumerate(src_dev)
        if d == device
        for t in plan.src.rank_tensors(spec, r)
    }
    dst_shapes = {
        (r, t.name): t.shape
        for r, d in enumerate(dst_dev)
        if d == device
        for t in plan.dst.rank_tensors(spec, r)
    }

    def send_contiguous(m: Move) -> bool:
        return send_direct and is_contiguous(m.src_box, src_shapes[(m.src_rank, m.src_tensor)])

    def recv_contiguous(m: Move) -> bool:
        return is_contiguous(m.dst_box, dst_shapes[(m.dst_rank, m.dst_tensor)])

    buckets = []
    for sends, recvs in zip(ops.sends, ops.recvs, strict=True):
        if not sends and not recvs:
            continue
        staged = 0
        sides = []
        for moves, peer_of, direct in (
            (sends, lambda m: dst_dev[m.dst_rank], send_contiguous),
            (recvs, lambda m: src_dev[m.src_rank], recv_contiguous),
        ):
            by_peer: defaultdict[int, list[Move]] = defaultdict(list)
            for m in moves:
                by_peer[peer_of(m)].append(m)
            side = []
            for peer, pair_moves in sorted(by_peer.items()):
                messages = []
                for group, is_direct in _cut(pair_moves, min_direct_bytes, direct):
                    n = sum(box_numel(m.src_box) for m in group)
                    messages.append(Message(group, n, is_direct, staged))
                    staged += 0 if is_direct else n
                side.append((peer, tuple(messages)))
            sides.append(tuple(side))
        buckets.append(Bucket(sides[0], sides[1], staged))
    return tuple(buckets)


def _cut(
    moves: list[Move], min_direct_bytes: int, contiguous: Callable[[Move], bool]
) -> list[tuple[tuple[Move, ...], bool]]:
    """A pair's moves as messages: the small ones packed together first, then one per large move
    (from the plan alone, so both ends agree), each with whether this end's side needs no copy."""
    small = tuple(m for m in moves if m.num_bytes < min_direct_bytes)
    out = [(small, False)] if small else []
    out += [((m,), contiguous(m)) for m in moves if m.num_bytes >= min_direct_bytes]
    return out


def pack(moves: tuple[Move, ...], sources: TensorsByRank, buf: torch.Tensor) -> None:
    """Copy the source rectangles of `moves` into `buf` back to back (casting to buf's dtype)."""
    offset = 0
    for m in moves:
        n = box_numel(m.src_box)
        src = sources[m.src_rank][m.src_tensor][box_slices(m.src_box)]
        buf[offset : offset + n].view(extents(m.src_box)).copy_(src)
        offset += n


def unpack(moves: tuple[Move, ...], buf: torch.Tensor, targets: TensorsByRank) -> None:
    """The reverse of `pack`, on the receiving end: `buf` into the target rectangles."""
    offset = 0
    for m in moves:
        n = box_numel(m.dst_box)
        targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)].copy_(
            buf[offset : offset + n].view(extents(m.dst_box))
        )
        offset += n


def copy_local(moves: tuple[Move, ...], sources: TensorsByRank, targets: TensorsByRank) -> None:
    """Rectangles a source rank on this device already holds, straight into the targets."""
    for m in moves:
        src = sources[m.src_rank][m.src_tensor][box_slices(m.src_box)]
        targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)].copy_(src.reshape(extents(m.dst_box)))
