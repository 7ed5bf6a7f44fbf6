"""An FSDP2 module's weights as a resharding source: each rank's own rows, as they lie in memory.

`fully_shard` keeps every parameter as a DTensor sharded along dim 0 over a 1-D mesh (torch.chunk
sizes: trailing ranks may hold fewer rows, or none). That is the `fsdp` layout of this package,
so a rank's local tensors feed the executor directly: no all-gather, no copy. The root module
keeps its parameters unsharded after an inference-only forward (FSDP2 skips the root's reshard,
expecting a backward), so every FSDP module is resharded first; that frees the gathered copy and
is a no-op where the parameters are already sharded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from tidal.resharding.layout import ParallelLayout
from tidal.resharding.sync import WeightSource


def fsdp_source(
    module: nn.Module,
    strip_prefix: str = "",
    gather_full: Callable[[], Iterator[tuple[str, torch.Tensor]]] | None = None,
) -> WeightSource:
    """This rank's shards of `module` (parameter names without `strip_prefix`; tied ones once)."""
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
    tensors: dict[str, torch.Tensor] = {}
    mesh = None
    for name, param in module.named_parameters():
        if not isinstance(param, DTensor):
            raise ValueError(
                f"parameter {name!r} is not sharded by FSDP (a {type(param).__name__}); call "
                "fully_shard on the module (and its blocks) before exporting its weights"
            )
        if param.device_mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            raise ValueError(
                f"parameter {name!r} is placed as {param.placements} on a {param.device_mesh.ndim}-D mesh; "
                "the fsdp layout is Shard(0) over a 1-D mesh (HSDP is not supported yet)"
            )
        mesh = mesh or param.device_mesh
        tensors[name.removeprefix(strip_prefix)] = param.to_local().detach()
    if mesh is None:
        raise ValueError(f"{type(module).__name__} has no parameters to export")
    layout = ParallelLayout.fsdp(dp=mesh.size())
    return WeightSource(layout, mesh.get_local_rank(), tensors, gather_full)
