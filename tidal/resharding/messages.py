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


Views = tuple[list[torch.Tensor], list[torch.Tensor]]  # (destinations, sources) of one batch of copies


def pack_views(moves: tuple[Move, ...], sources: TensorsByRank, buf: torch.Tensor) -> Views:
    """Packing: the source rectangles of `moves`, back to back in `buf` (cast to buf's dtype)."""
    dsts, srcs, offset = [], [], 0
    for m in moves:
        n = box_numel(m.src_box)
        srcs.append(sources[m.src_rank][m.src_tensor][box_slices(m.src_box)])
        dsts.append(buf[offset : offset + n].view(extents(m.src_box)))
        offset += n
    return dsts, srcs


def unpack_views(moves: tuple[Move, ...], buf: torch.Tensor, targets: TensorsByRank) -> Views:
    """The reverse of `pack_views`, on the receiving end: `buf` into the target rectangles."""
    dsts, srcs, offset = [], [], 0
    for m in moves:
        n = box_numel(m.dst_box)
        dsts.append(targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)])
        srcs.append(buf[offset : offset + n].view(extents(m.dst_box)))
        offset += n
    return dsts, srcs


def local_views(moves: tuple[Move, ...], sources: TensorsByRank, targets: TensorsByRank) -> Views:
    """Rectangles a source rank on this device already holds, straight into the targets."""
    dsts = [targets[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)] for m in moves]
    srcs = [
        _as_shape(sources[m.src_rank][m.src_tensor][box_slices(m.src_box)], d.shape)
        for m, d in zip(moves, dsts, strict=True)
    ]
    return dsts, srcs


def _as_shape(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`t` viewed as `shape`; left as it is where no view can (a strided rectangle whose shape
    differs): `copy_all` reshapes it at copy time, so a view list never holds a stale copy."""
    try:
        return t.view(shape)
    except RuntimeError:
        return t


class Copies:
    """A batch of copies `dsts[i].copy_(srcs[i])`, sorted once into how they run, to run many times.

    On a GPU (or `fused=True`) the pairs that are contiguous, of one shape and of one dtype go in
    one fused launch per dtype (`torch._foreach_copy_`): a sync copies hundreds of rectangles, and
    a kernel launch each costs more than the copy itself for most of them. The rest, and everything
    on a CPU (where a launch costs nothing), is the plain loop: the reference the fused path is
    tested against. A source whose shape differs from its destination's is reshaped as it is
    copied (strided rectangles that no view can reshape).
    """

    def __init__(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor], fused: bool | None = None):
        if len(dsts) != len(srcs):
            raise ValueError(f"Copies: {len(dsts)} destinations but {len(srcs)} sources")
        if fused is None:
            fused = bool(dsts) and dsts[0].device.type == "cuda"
        by_dtype: defaultdict[torch.dtype, Views] = defaultdict(lambda: ([], []))
        self.loop: list[tuple[torch.Tensor, torch.Tensor]] = []
        for d, s in zip(dsts, srcs, strict=True):
            if (
                fused
                and d.dtype == s.dtype
                and d.shape == s.shape
                and d.is_contiguous()
                and s.is_contiguous()
            ):
                by_dtype[d.dtype][0].append(d)
                by_dtype[d.dtype][1].append(s)
            else:
                self.loop.append((d, s))
        self.fused: list[Views] = list(by_dtype.values())

    def run(self) -> None:
        for dsts, srcs in self.fused:
            torch._foreach_copy_(dsts, srcs)
        for d, s in self.loop:
            d.copy_(s if s.shape == d.shape else s.reshape(d.shape))


def copy_all(dsts: list[torch.Tensor], srcs: list[torch.Tensor], fused: bool | None = None) -> None:
    """`dsts[i].copy_(srcs[i])` for every i, as `Copies` runs them."""
    Copies(dsts, srcs, fused).run()
