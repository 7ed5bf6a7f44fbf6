"""Parallel layouts: which rectangle of which canonical tensor every rank holds, and where.

A rank's local tensor is not always one rectangle of one canonical tensor: Megatron's fused
`linear_qkv` interleaves q, k and v rows per query group, vLLM's `qkv_proj` stacks a rank's own q,
k and v heads. So a local tensor is described as an ordered list of *pieces*, each saying "this
rectangle of canonical tensor X sits at that rectangle of my local tensor". The planner only sees
canonical rectangles; converting between Megatron, Hugging Face and vLLM is then nothing more than
choosing a source layout and a target layout. Local elements covered by no piece are padding
(Megatron's and vLLM's padded vocabulary rows) and are zero-filled by the receiver.

A local box may have more dimensions than its canonical box: leading local dimensions of extent 1
stand for a stacking index (vLLM's `w13_weight[expert]`, transformers' fused experts). Trailing
dimensions line up one to one.

Rank numbering: rank r of a layout is decomposed along `rank_order` (innermost axis first), the
way Megatron numbers ranks ("tp-cp-ep-dp-pp": tp fastest, pp slowest) and vLLM numbers an engine's
workers (tp fastest, then pp; `dp` counts engine replicas). How ranks map to devices is not a
property of a layout but of a placement (see `planner.Placement`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

from tidal.resharding.spec import ModelSpec, Shape, Spec

Box = tuple[tuple[int, int], ...]  # per dimension: (start, stop), half open

FORMATS = ("hf", "fsdp", "megatron", "vllm")
_AXES = ("tp", "dp", "pp")
_DEFAULT_ORDER = {
    "hf": ("tp", "dp", "pp"),
    "fsdp": ("tp", "dp", "pp"),
    "megatron": ("tp", "dp", "pp"),
    "vllm": ("tp", "pp", "dp"),
}


class Piece(NamedTuple):
    canonical: str  # Hugging Face checkpoint name
    canon_box: Box  # rectangle of the canonical tensor
    local_box: Box  # where that rectangle sits in the local tensor (same extents)


class LocalTensor(NamedTuple):
    name: str  # the framework's own parameter name on this rank
    shape: Shape
    pieces: tuple[Piece, ...]


# ------------------------------------------------------------------------------------- boxes


def full_box(shape: Shape) -> Box:
    return tuple((0, n) for n in shape)


def box_numel(box: Box) -> int:
    n = 1
    for start, stop in box:
        n *= stop - start
    return n


def box_intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b, strict=True))
    return out if all(start < stop for start, stop in out) else None


def box_contains(outer: Box, inner: Box) -> bool:
    return all(o0 <= i0 and i1 <= o1 for (o0, o1), (i0, i1) in zip(outer, inner, strict=True))


def box_slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


def to_local(piece: Piece, canon_sub: Box) -> Box:
    """Where the canonical sub-rectangle `canon_sub` (inside `piece.canon_box`) sits locally."""
    lead = len(piece.local_box) - len(piece.canon_box)
    trailing = tuple(
        (l0 + s0 - c0, l0 + s1 - c0)
        for (l0, _), (c0, _), (s0, s1) in zip(piece.local_box[lead:], piece.canon_box, canon_sub, strict=True)
    )
    return piece.local_box[:lead] + trailing


def to_canonical(piece: Piece, local_sub: Box) -> Box:
    """The canonical rectangle behind the local sub-rectangle `local_sub` of `piece.local_box`."""
    lead = len(piece.local_box) - len(piece.canon_box)
    return tuple(
        (c0 + s0 - l0, c0 + s1 - l0)
        for (l0, _), (c0, _), (s0, s1) in zip(
            piece.local_box[lead:], piece.canon_box, local_sub[lead:], strict=True
        )
    )


# ---------------------------------------------------------------------------- piece builders


def whole(canonical: str, shape: Shape) -> Piece:
    """The full canonical tensor as the full local tensor (replicated parameters)."""
    return Piece(canonical, full_box(shape), full_box(shape))


def rows(canonical: str, shape: Shape, start: int, stop: int, at: int = 0) -> Piece:
    """Canonical rows [start, stop) placed at local rows [at, at + stop - start)."""
    rest = full_box(shape[1:])
    return Piece(canonical, ((start, stop), *rest), ((at, at + stop - start), *rest))


def cols(canonical: str, shape: Shape, start: int, stop: int) -> Piece:
    """Canonical columns [start, stop) of a 2-D tensor as a local [rows, stop - start] tensor."""
    return Piece(canonical, ((0, shape[0]), (start, stop)), ((0, shape[0]), (0, stop - start)))


def stacked(canonical: str, shape: Shape, index: int, start: int, stop: int, at: int, dim: int) -> Piece:
    """Canonical [start, stop) along `dim` of a 2-D tensor, placed in slot `index` of a 3-D local tensor."""
    canon = list(full_box(shape))
    canon[dim] = (start, stop)
    local = list(full_box(shape))
    local[dim] = (at, at + stop - start)
    return Piece(canonical, tuple(canon), ((index, index + 1), *local))


def restrict_rows(tensor: LocalTensor, start: int, stop: int) -> LocalTensor:
    """Local rows [start, stop) of `tensor` as a tensor of their own (dim-0 sharding)."""
    pieces = []
    for piece in tensor.pieces:
        (l0, l1), *rest = piece.local_box
        lo, hi = max(l0, start), min(l1, stop)
        if lo < hi:
            sub = ((lo, hi), *rest)
            shifted = ((lo - start, hi - start), *rest)
            pieces.append(Piece(piece.canonical, to_canonical(piece, sub), shifted))
    return LocalTensor(tensor.name, (stop - start, *tensor.shape[1:]), tuple(pieces))


def even_split(total: int, parts: int, index: int, what: str) -> tuple[int, int]:
    """[start, stop) of part `index` when `total` splits evenly into `parts` (else ValueError)."""
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by {parts}; choose a size that divides it")
    size = total // parts
    return index * size, (index + 1) * size


# ----------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ParallelLayout:
    """A mesh (tp x dp x pp, optional expert parallelism) plus the framework whose tensors ranks hold.

    format:
      hf        every rank holds the full Hugging Face tensors (`dp` replicas).
      fsdp      Hugging Face tensors sharded along dim 0 over `dp` ranks (FSDP2 `Shard(0)`).
      megatron  megatron-core GPTModel names and fused layouts over tp x dp x pp.
      vllm      vLLM worker parameters: `tp` x `pp` workers per engine, `dp` engines.
    """

    format: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1  # megatron: expert-parallel size; vllm: 1 or tp * dp (vLLM's enable_expert_parallel)
    etp: int = 0  # megatron: expert tensor-parallel size; 0 means "same as tp" (Megatron's default)
    rank_order: tuple[str, ...] = ()  # innermost axis first; () = the format's default
    fused_experts: bool = False  # hf/fsdp: transformers>=5 in-memory experts (gate_up_proj [E, 2F, H])
    fused_norms: bool = False  # megatron: TE layer-spec names (norms fused into linear_qkv / linear_fc1)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"ParallelLayout.format={self.format!r} is not one of {FORMATS}")
        for axis in ("tp", "pp", "dp", "ep"):
            if getattr(self, axis) < 1:
                raise ValueError(f"ParallelLayout.{axis}={getattr(self, axis)} must be >= 1")
        if self.format in ("hf", "fsdp") and (self.tp, self.pp, self.ep) != (1, 1, 1):
            raise ValueError(
                f"ParallelLayout(format={self.format!r}) has tp={self.tp}, pp={self.pp}, ep={self.ep}; "
                "only dp is meaningful for it (replicas for hf, shards for fsdp)"
            )
        if self.format == "vllm" and self.ep not in (1, self.tp * self.dp):
            raise ValueError(
                f"ParallelLayout(format='vllm').ep={self.ep}: vLLM's expert parallelism spans all "
                f"tp x dp = {self.tp * self.dp} workers; use ep=1 or ep={self.tp * self.dp}"
            )
        if self.etp and self.format != "megatron":
            raise ValueError(f"ParallelLayout.etp={self.etp} applies to format='megatron' only")
        if self.fused_experts and self.format not in ("hf", "fsdp"):
            raise ValueError("ParallelLayout.fused_experts applies to format 'hf' or 'fsdp' only")
        if self.fused_norms and self.format != "megatron":
            raise ValueError("ParallelLayout.fused_norms applies to format='megatron' only")
        if not self.rank_order:
            object.__setattr__(self, "rank_order", _DEFAULT_ORDER[self.format])
        if sorted(self.rank_order) != sorted(_AXES):
            raise ValueError(f"ParallelLayout.rank_order={self.rank_order} must be a permutation of {_AXES}")

    @classmethod
    def hf(cls, dp: int = 1, fused_experts: bool = False) -> ParallelLayout:
        return cls("hf", dp=dp, fused_experts=fused_experts)

    @classmethod
    def fsdp(cls, dp: int, fused_experts: bool = False) -> ParallelLayout:
        return cls("fsdp", dp=dp, fused_experts=fused_experts)

    @classmethod
    def megatron(
        cls, tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1, etp: int = 0, fused_norms: bool = False
    ) -> ParallelLayout:
        return cls("megatron", tp=tp, pp=pp, dp=dp, ep=ep, etp=etp, fused_norms=fused_norms)

    @classmethod
    def vllm(cls, tp: int = 1, pp: int = 1, dp: int = 1, expert_parallel: bool = False) -> ParallelLayout:
        return cls("vllm", tp=tp, pp=pp, dp=dp, ep=tp * dp if expert_parallel else 1)

    @property
    def world_size(self) -> int:
        return self.tp * self.dp * self.pp

    def coords(self, rank: int) -> dict[str, int]:
        """{axis: index} of `rank`, innermost axis of `rank_order` varying fastest."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside a layout of world size {self.world_size}")
        out = {}
        for axis in self.rank_order:
            size = getattr(self, axis)
            out[axis] = rank % size
            rank //= size
        return out

    def rank_tensors(self, spec: Spec, rank: int) -> tuple[LocalTensor, ...]:
        """The local tensors of `rank`, each with the canonical pieces it holds (cached)."""
        if (self.format in ("megatron", "vllm") or self.fused_experts) and not isinstance(spec, ModelSpec):
            raise ValueError(
                f"{self} cuts or fuses tensors by heads, groups or experts and needs a ModelSpec "
                f"(e.g. ModelSpec.from_hf_config), not a {type(spec).__name__}"
            )
        return _rank_tensors(spec, self, rank)


@functools.lru_cache(maxsize=4096)
def _rank_tensors(spec: Spec, layout: ParallelLayout, rank: int) -> tuple[LocalTensor, ...]:
    coords = layout.coords(rank)
    if layout.format == "hf":
        return hf_tensors(spec, layout.fused_experts)
    if layout.format == "fsdp":
        out = []
        for tensor in hf_tensors(spec, layout.fused_experts):
            n = tensor.shape[0]
            size = -(
                -n // layout.dp
            )  # torch.chunk sizes, as FSDP2 Shard(0) uses; trailing ranks may be empty
            start = min(coords["dp"] * size, n)
            stop = min(start + size, n)
            out.append(restrict_rows(tensor, start, stop))
        return tuple(out)
    # Deferred imports: the framework modules build on this module's pieces and boxes.
    if layout.format == "megatron":
        from tidal.resharding.megatron_names import megatron_tensors

        return megatron_tensors(spec, layout, coords)
    from tidal.resharding.vllm_names import vllm_tensors

    return vllm_tensors(spec, layout, coords)


@functools.cache
def hf_tensors(spec: Spec, fused_experts: bool = False) -> tuple[LocalTensor, ...]:
    """The full Hugging Face tensors; with `fused_experts`, experts as transformers>=5 keeps them."""
    out = []
    shapes = spec.canonical_shapes()
    fused_done: set[str] = set()
    for name, shape in shapes.items():
        if fused_experts and ".mlp.experts." in name:
            prefix = name.split(".mlp.experts.")[0] + ".mlp.experts."
            if prefix not in fused_done:
                fused_done.add(prefix)
                out.extend(_fused_experts(spec, prefix))
            continue
        out.append(LocalTensor(name, shape, (whole(name, shape),)))
    return tuple(out)


def _fused_experts(spec: ModelSpec, prefix: str) -> list[LocalTensor]:
    """transformers>=5: gate_up_proj [E, 2F, H] (gate rows, then up rows), down_proj [E, H, F]."""
    e_num, f, h = spec.num_experts, spec.moe_ffn_size, spec.hidden_size
    gate_up, down = [], []
    for e in range(e_num):
        gate_up.append(stacked(f"{prefix}{e}.gate_proj.weight", (f, h), e, 0, f, 0, dim=0))
        gate_up.append(stacked(f"{prefix}{e}.up_proj.weight", (f, h), e, 0, f, f, dim=0))
        down.append(stacked(f"{prefix}{e}.down_proj.weight", (h, f), e, 0, h, 0, dim=0))
    return [
        LocalTensor(f"{prefix}gate_up_proj", (e_num, 2 * f, h), tuple(gate_up)),
        LocalTensor(f"{prefix}down_proj", (e_num, h, f), tuple(down)),
    ]
