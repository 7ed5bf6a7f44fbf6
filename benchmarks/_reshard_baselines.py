"""The two baselines of benchmarks/reshard.py: how other RL systems move weights today.

- `GatherFull` (verl): per Megatron parameter, broadcast over the pipeline group, all-gather over
  the tensor-parallel group, so every process holds full Hugging Face tensors, then re-slice them
  into its engine's shard.
- `broadcast_from_rank0` (slime, OpenRLHF, NeMo-RL): one process holds the full model and
  broadcasts it in buckets; every process re-slices.
Both write the same target tensors as Tidal's executor, so the benchmark checks them alike.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist

from tidal.resharding.layout import ParallelLayout, box_slices
from tidal.resharding.spec import Spec


def dst_index(spec: Spec, dst: ParallelLayout, dst_ranks) -> dict[str, list]:
    """canonical name -> every (target rank, tensor, piece) of this process that needs it."""
    index = defaultdict(list)
    for r in dst_ranks:
        for t in dst.rank_tensors(spec, r):
            for p in t.pieces:
                index[p.canonical].append((r, t.name, p))
    return index


def reslice(full: dict[str, torch.Tensor], index, targets) -> None:
    """Cut this process's target pieces out of full canonical tensors."""
    for name, tensor in full.items():
        for r, tname, p in index[name]:
            region = tensor[box_slices(p.canon_box)]
            targets[r][tname][box_slices(p.local_box)].copy_(region.reshape([b - a for a, b in p.local_box]))


class GatherFull:
    """verl today: per Megatron parameter, PP broadcast + TP all-gather, full HF tensors, reslice."""

    def __init__(self, spec: Spec, src: ParallelLayout, rank: int, index):
        self.spec, self.src, self.rank, self.index = spec, src, rank, index
        tp, dp, pp = src.tp, src.dp, src.pp
        self.at = lambda t, d, p: t + tp * (d + dp * p)  # Megatron's rank numbering (tp fastest)
        c = src.coords(rank)
        self.c = c
        # Every process creates every group, in the same order, and keeps its own.
        tp_groups = {
            (d, p): dist.new_group([self.at(t, d, p) for t in range(tp)])
            for d in range(dp)
            for p in range(pp)
        }
        pp_groups = {
            (t, d): dist.new_group([self.at(t, d, p) for p in range(pp)])
            for d in range(dp)
            for t in range(tp)
        }
        self.tp_group, self.pp_group = tp_groups[(c["dp"], c["pp"])], pp_groups[(c["tp"], c["dp"])]
        self.bytes_received = 0

    def __call__(self, sources, targets) -> None:
        spec, src, c, dtype = self.spec, self.src, self.c, self.spec.torch_dtype
        done: set[str] = set()
        received = 0
        for stage in range(src.pp):
            owner = self.at(c["tp"], c["dp"], stage)
            tensors = src.rank_tensors(spec, owner)
            for i, t in enumerate(tensors):
                if all(p.canonical in done for p in t.pieces):
                    continue  # the last stage's copy of tied embeddings: sent once, as verl does
                shard = sources[t.name] if c["pp"] == stage else torch.empty(t.shape, dtype=dtype)
                if src.pp > 1:
                    dist.broadcast(shard.view(torch.uint8), src=owner, group=self.pp_group)
                    received += 0 if c["pp"] == stage else shard.numel() * shard.element_size()
                parts = [torch.empty_like(shard) for _ in range(src.tp)]
                dist.all_gather(
                    [p.view(torch.uint8) for p in parts], shard.view(torch.uint8), group=self.tp_group
                )
                received += (src.tp - 1) * shard.numel() * shard.element_size()
                full: dict[str, torch.Tensor] = {}
                for j, part in enumerate(parts):
                    lt = src.rank_tensors(spec, self.at(j, c["dp"], stage))[i]
                    for p in lt.pieces:
                        if p.canonical not in full:
                            full[p.canonical] = torch.empty(spec.canonical_shapes()[p.canonical], dtype=dtype)
                        full[p.canonical][box_slices(p.canon_box)] = part[box_slices(p.local_box)].reshape(
                            [b - a for a, b in p.canon_box]
                        )
                reslice(full, self.index, targets)
                done.update(full)
        self.bytes_received = received


def broadcast_from_rank0(spec: Spec, full, index, targets, bucket_bytes: int) -> None:
    """Rank 0 broadcasts the full HF tensors, packed in buckets; every process reslices."""
    shapes = spec.canonical_shapes()
    names = list(shapes)
    elem = spec.element_size
    while names:
        batch, size = [], 0
        while names and (not batch or size + math.prod(shapes[names[0]]) * elem <= bucket_bytes):
            size += math.prod(shapes[names[0]]) * elem
            batch.append(names.pop(0))
        buf = torch.empty(size // elem, dtype=spec.torch_dtype)
        if dist.get_rank() == 0:
            torch.cat([full[n].reshape(-1) for n in batch], out=buf)
        dist.broadcast(buf.view(torch.uint8), src=0)
        offset, views = 0, {}
        for n in batch:
            numel = math.prod(shapes[n])
            views[n] = buf[offset : offset + numel].view(shapes[n])
            offset += numel
        reslice(views, index, targets)
