"""megatron-core GPTModel parameters as pieces of Hugging Face tensors.

What each Megatron rank (tp_rank, dp_rank, pp_rank) holds, written as the canonical rectangles of
`spec.canonical_shapes()` (checked against an independent torch reference in the tests):

- `embedding.word_embeddings.weight` (first stage) and `output_layer.weight` (last stage; with tied
  embeddings only when pp > 1, where the last stage keeps its own copy of the embedding): the
  vocabulary is padded to a multiple of `make_vocab_size_divisible_by` x TP and split by rows;
  rows past the real vocabulary are padding.
- `decoder.layers.{l}.self_attention.linear_qkv`: grouped per query group, `[q heads of the group;
  k; v]` for each group, and TP splits whole groups (so num_query_groups % TP == 0, as Megatron
  requires). Biases follow the same grouping.
- `mlp.linear_fc1` = `[gate rows of this TP slice; up rows of this TP slice]`; `linear_proj` and
  `linear_fc2` are row-parallel (split along the input dimension); their biases are replicated.
- Layer indices are local to the pipeline stage: local l = global i - stage offset.
- Norms: `input_layernorm` -> input_layernorm, `pre_mlp_layernorm` -> post_attention_layernorm,
  `decoder.final_layernorm` -> model.norm; with the Transformer Engine layer spec
  (`fused_norms=True`) the first two live in `linear_qkv.layer_norm_weight` and
  `linear_fc1.layer_norm_weight` instead (MoE layers keep `pre_mlp_layernorm`).
- MoE (SequentialMLP names): `mlp.router.weight` is replicated; rank's experts are
  `mlp.experts.local_experts.{j}` for global expert ep_rank * (E / ep) + j, each split over the
  expert-TP group like a dense MLP. Within a pipeline stage, the dense index tp_rank + tp * dp_rank
  is re-read as (etp_rank, ep_rank, edp_rank), etp fastest, as Megatron's expert mesh does.
"""

from __future__ import annotations

from tidal.resharding.layout import (
    LocalTensor,
    ParallelLayout,
    Piece,
    cols,
    even_split,
    rows,
    whole,
)
from tidal.resharding.spec import ModelSpec, Shape


def stage_layers(spec: ModelSpec, pp: int, pp_rank: int) -> tuple[int, int]:
    """[first, stop) global layers of a Megatron pipeline stage (even split, as Megatron requires)."""
    return even_split(spec.num_layers, pp, pp_rank, "ModelSpec.num_layers (Megatron pipeline stages)")


def expert_coords(layout: ParallelLayout, tp_rank: int, dp_rank: int) -> tuple[int, int, int]:
    """(expert TP size, etp_rank, ep_rank) of a rank."""
    etp = layout.etp or layout.tp
    if (layout.tp * layout.dp) % (etp * layout.ep):
        raise ValueError(
            f"Megatron layout tp x dp = {layout.tp * layout.dp} is not a multiple of etp x ep = "
            f"{etp} x {layout.ep}; the expert mesh must fold into each pipeline stage"
        )
    inner = tp_rank + layout.tp * dp_rank
    return etp, inner % etp, (inner // etp) % layout.ep


def megatron_tensors(
    spec: ModelSpec, layout: ParallelLayout, coords: dict[str, int]
) -> tuple[LocalTensor, ...]:
    tp, pp = layout.tp, layout.pp
    tp_rank, pp_rank = coords["tp"], coords["pp"]
    for field, value in (("num_heads", spec.num_heads), ("num_kv_heads", spec.num_kv_heads)):
        if value % tp:
            raise ValueError(
                f"ModelSpec.{field}={value} is not divisible by Megatron tp={tp}; "
                "Megatron splits whole attention heads and query groups"
            )
    if spec.is_moe and layout.ep > 1 and spec.num_experts % layout.ep:
        raise ValueError(f"ModelSpec.num_experts={spec.num_experts} is not divisible by ep={layout.ep}")
    out: list[LocalTensor] = []
    if pp_rank == 0:
        out.append(_vocab(spec, tp, tp_rank, "embedding.word_embeddings.weight", "model.embed_tokens.weight"))
    first, stop = stage_layers(spec, pp, pp_rank)
    for i in range(first, stop):
        out.extend(_layer(spec, layout, coords, i, f"decoder.layers.{i - first}."))
    if pp_rank == pp - 1:
        norm = (spec.hidden_size,)
        out.append(LocalTensor("decoder.final_layernorm.weight", norm, (whole("model.norm.weight", norm),)))
        if not spec.tie_embeddings:
            out.append(_vocab(spec, tp, tp_rank, "output_layer.weight", "lm_head.weight"))
        elif pp > 1:
            out.append(_vocab(spec, tp, tp_rank, "output_layer.weight", "model.embed_tokens.weight"))
    return tuple(out)


def _vocab(spec: ModelSpec, tp: int, tp_rank: int, name: str, canonical: str) -> LocalTensor:
    per_rank = spec.megatron_padded_vocab(tp) // tp
    start = tp_rank * per_rank
    stop = min(start + per_rank, spec.vocab_size)
    shape = (spec.vocab_size, spec.hidden_size)
    pieces = (rows(canonical, shape, start, stop),) if start < stop else ()
    return LocalTensor(name, (per_rank, spec.hidden_size), pieces)


def _replicated(name: str, canonical: str, shape: Shape) -> LocalTensor:
    return LocalTensor(name, shape, (whole(canonical, shape),))


def qkv_pieces(
    spec: ModelSpec, tp: int, tp_rank: int, hf: str, suffix: str
) -> tuple[Shape, tuple[Piece, ...]]:
    """linear_qkv.{suffix}: for each local query group, [its q heads; its k head; its v head]."""
    d, per_group = spec.head_dim, spec.heads_per_group
    groups = spec.num_kv_heads // tp
    tail = (spec.hidden_size,) if suffix == "weight" else ()
    q_shape, kv_shape = (spec.num_heads * d, *tail), (spec.num_kv_heads * d, *tail)
    pieces = []
    for local_group in range(groups):
        g = tp_rank * groups + local_group
        at = local_group * (per_group + 2) * d
        pieces.append(rows(f"{hf}q_proj.{suffix}", q_shape, g * per_group * d, (g + 1) * per_group * d, at))
        pieces.append(rows(f"{hf}k_proj.{suffix}", kv_shape, g * d, (g + 1) * d, at + per_group * d))
        pieces.append(rows(f"{hf}v_proj.{suffix}", kv_shape, g * d, (g + 1) * d, at + (per_group + 1) * d))
    return (groups * (per_group + 2) * d, *tail), tuple(pieces)


def _mlp(
    spec: ModelSpec, tp: int, tp_rank: int, ffn: int, hf: str, name: str, bias: bool
) -> list[LocalTensor]:
    """A Megatron MLP over a TP group: fc1 = [gate slice; up slice], fc2 row-parallel."""
    h = spec.hidden_size
    start, stop = even_split(ffn, tp, tp_rank, "MLP intermediate size (Megatron tp)")
    n = stop - start
    out = []
    for suffix, tail in (("weight", (h,)), ("bias", ())) if bias else (("weight", (h,)),):
        gate = rows(f"{hf}gate_proj.{suffix}", (ffn, *tail), start, stop, 0)
        up = rows(f"{hf}up_proj.{suffix}", (ffn, *tail), start, stop, n)
        out.append(LocalTensor(f"{name}linear_fc1.{suffix}", (2 * n, *tail), (gate, up)))
    out.append(
        LocalTensor(
            f"{name}linear_fc2.weight", (h, n), (cols(f"{hf}down_proj.weight", (h, ffn), start, stop),)
        )
    )
    if bias:
        out.append(_replicated(f"{name}linear_fc2.bias", f"{hf}down_proj.bias", (h,)))
    return out


def _layer(
    spec: ModelSpec, layout: ParallelLayout, coords: dict[str, int], i: int, p: str
) -> list[LocalTensor]:
    tp, tp_rank = layout.tp, coords["tp"]
    h, d = spec.hidden_size, spec.head_dim
    hf = f"model.layers.{i}."
    att = f"{hf}self_attn."
    norm_in = (
        "self_attention.linear_qkv.layer_norm_weight" if layout.fused_norms else "input_layernorm.weight"
    )
    out = [_replicated(p + norm_in, f"{hf}input_layernorm.weight", (h,))]
    for suffix in ("weight", "bias") if spec.qkv_bias else ("weight",):
        shape, pieces = qkv_pieces(spec, tp, tp_rank, att, suffix)
        out.append(LocalTensor(f"{p}self_attention.linear_qkv.{suffix}", shape, pieces))
    if spec.qk_norm:
        out.append(_replicated(f"{p}self_attention.q_layernorm.weight", f"{att}q_norm.weight", (d,)))
        out.append(_replicated(f"{p}self_attention.k_layernorm.weight", f"{att}k_norm.weight", (d,)))
    q = spec.num_heads * d
    start, stop = even_split(q, tp, tp_rank, "num_heads x head_dim (Megatron tp)")
    proj = cols(f"{att}o_proj.weight", (h, q), start, stop)
    out.append(LocalTensor(f"{p}self_attention.linear_proj.weight", (h, stop - start), (proj,)))
    if spec.o_bias:
        out.append(_replicated(f"{p}self_attention.linear_proj.bias", f"{att}o_proj.bias", (h,)))
    fused_mlp_norm = layout.fused_norms and not spec.is_moe
    norm_mlp = "mlp.linear_fc1.layer_norm_weight" if fused_mlp_norm else "pre_mlp_layernorm.weight"
    out.append(_replicated(p + norm_mlp, f"{hf}post_attention_layernorm.weight", (h,)))
    if not spec.is_moe:
        out.extend(_mlp(spec, tp, tp_rank, spec.ffn_size, f"{hf}mlp.", f"{p}mlp.", spec.mlp_bias))
        return out
    out.append(_replicated(f"{p}mlp.router.weight", f"{hf}mlp.gate.weight", (spec.num_experts, h)))
    etp, etp_rank, ep_rank = expert_coords(layout, tp_rank, coords["dp"])
    per_rank = spec.num_experts // layout.ep
    for j in range(per_rank):
        e = ep_rank * per_rank + j
        hf_e, name = f"{hf}mlp.experts.{e}.", f"{p}mlp.experts.local_experts.{j}."
        out.extend(_mlp(spec, etp, etp_rank, spec.moe_ffn_size, hf_e, name, bias=False))
    return out
