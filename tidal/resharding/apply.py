"""A plain, in-memory executor of resharding plans: the reference the real transports are tested against.

All ranks live in one process as dicts of local tensors. `apply_plan` runs a plan the way a
distributed executor does (local copies first; then, bucket by bucket, each sender packs its
rectangles for one receiver into one flat buffer in plan order and the receiver unpacks them), so
the packing order is exercised too, only the "wire" is a Python variable.

`materialize` builds a rank's local tensors from full canonical tensors and `assemble` does the
reverse; together they are the conversions (Hugging Face <-> Megatron <-> vLLM) without a plan.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch

from tidal.resharding.layout import Box, LocalTensor, ParallelLayout, box_numel, box_slices
from tidal.resharding.planner import Move, Plan
from tidal.resharding.spec import Spec

RankTensors = dict[str, torch.Tensor]


def _extents(box: Box) -> tuple[int, ...]:
    return tuple(stop - start for start, stop in box)


def _empty(tensors: tuple[LocalTensor, ...], dtype: torch.dtype) -> RankTensors:
    # Zeros, not empty: rows no piece covers are padding and must read as 0 (as vLLM leaves them).
    return {t.name: torch.zeros(t.shape, dtype=dtype) for t in tensors}


def materialize(
    spec: Spec, layout: ParallelLayout, rank: int, full: Mapping[str, torch.Tensor]
) -> RankTensors:
    """The local tensors of `rank` cut from the full canonical tensors `full` (padding zero)."""
    tensors = layout.rank_tensors(spec, rank)
    out = _empty(tensors, spec.torch_dtype)
    for t in tensors:
        for piece in t.pieces:
            src = full[piece.canonical][box_slices(piece.canon_box)]
            out[t.name][box_slices(piece.local_box)].copy_(src.reshape(_extents(piece.local_box)))
    return out


def assemble(
    spec: Spec, layout: ParallelLayout, locals_by_rank: Mapping[int, Mapping[str, torch.Tensor]]
) -> RankTensors:
    """Rebuild every full canonical tensor from the local tensors of all ranks of `layout`."""
    shapes = spec.canonical_shapes()
    full = {name: torch.zeros(shape, dtype=spec.torch_dtype) for name, shape in shapes.items()}
    covered = {name: torch.zeros(shape, dtype=torch.bool) for name, shape in shapes.items()}
    for rank in range(layout.world_size):
        for t in layout.rank_tensors(spec, rank):
            local = locals_by_rank[rank][t.name]
            for piece in t.pieces:
                region = box_slices(piece.canon_box)
                full[piece.canonical][region] = local[box_slices(piece.local_box)].reshape(
                    _extents(piece.canon_box)
                )
                covered[piece.canonical][region] = True
    missing = [name for name, mask in covered.items() if not bool(mask.all())]
    if missing:
        raise ValueError(f"{layout} does not hold every element of {missing[:3]} (and {len(missing)} in all)")
    return full


def _check_sources(plan: Plan, src_locals: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
    for rank in range(plan.src.world_size):
        for t in plan.src.rank_tensors(plan.spec, rank):
            got = src_locals[rank][t.name]
            if tuple(got.shape) != t.shape or got.dtype != plan.spec.torch_dtype:
                raise ValueError(
                    f"source rank {rank} tensor {t.name} is {tuple(got.shape)} {got.dtype}; the layout "
                    f"{plan.src} expects {t.shape} {plan.spec.torch_dtype}"
                )


def apply_plan(plan: Plan, src_locals: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[int, RankTensors]:
    """Run `plan` on every source rank's local tensors; return every target rank's local tensors."""
    _check_sources(plan, src_locals)
    spec = plan.spec
    out = {r: _empty(plan.dst.rank_tensors(spec, r), spec.torch_dtype) for r in range(plan.dst.world_size)}
    for m in plan.local_copies:
        src = src_locals[m.src_rank][m.src_tensor][box_slices(m.src_box)]
        out[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)].copy_(src.reshape(_extents(m.dst_box)))
    src_dev, dst_dev = plan.placement.src_devices, plan.placement.dst_devices
    for bucket in plan.buckets:
        pairs: dict[tuple[int, int], list[Move]] = defaultdict(list)
        for m in bucket:
            pairs[(src_dev[m.src_rank], dst_dev[m.dst_rank])].append(m)
        for moves in pairs.values():
            # Sender side: one flat buffer per receiver, rectangles in plan order.
            wire = torch.cat(
                [src_locals[m.src_rank][m.src_tensor][box_slices(m.src_box)].reshape(-1) for m in moves]
            )
            # Receiver side: walk the same order to find each rectangle's offset.
            offset = 0
            for m in moves:
                n = box_numel(m.dst_box)
                out[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)].copy_(
                    wire[offset : offset + n].view(_extents(m.dst_box))
                )
                offset += n
            assert offset == wire.numel()
    return out


def coverage(plan: Plan) -> dict[int, dict[str, torch.Tensor]]:
    """How many plan operations write each element of each target tensor (1 = covered once, 0 = padding)."""
    spec = plan.spec
    counts = {
        r: {t.name: torch.zeros(t.shape, dtype=torch.int32) for t in plan.dst.rank_tensors(spec, r)}
        for r in range(plan.dst.world_size)
    }
    for m in (*plan.local_copies, *(m for bucket in plan.buckets for m in bucket)):
        counts[m.dst_rank][m.dst_tensor][box_slices(m.dst_box)] += 1
    return counts


def padding_mask(tensor: LocalTensor) -> torch.Tensor:
    """True where no piece covers the local tensor (padding rows)."""
    mask = torch.ones(tensor.shape, dtype=torch.bool)
    for piece in tensor.pieces:
        mask[box_slices(piece.local_box)] = False
    return mask
