"""vLLM worker parameters as pieces of Hugging Face tensors.

What the worker (tp_rank, pp_rank) of an engine holds once vLLM's weight loaders have run, so that
a resharder can write straight into those parameters:

- `self_attn.qkv_proj` = `[q heads of this rank | k | v]`. With tp <= num_kv_heads each rank has
  num_kv_heads / tp KV heads; with tp > num_kv_heads every rank has one KV head, replicated over
  tp / num_kv_heads ranks (rank r holds head r // (tp / num_kv_heads)), as `QKVParallelLinear` does.
- `mlp.gate_up_proj` = `[gate rows of this slice; up rows of this slice]`; `o_proj` and
  `down_proj` are row-parallel, their biases replicated.
- `embed_tokens` / `lm_head`: the vocabulary is padded to a multiple of 64 (vLLM's
  DEFAULT_VOCAB_PADDING_SIZE) and split evenly by rows; each rank's real rows come first, the
  rest is zero padding. The data itself is the unpadded Hugging Face tensor. With tied embeddings
  `lm_head` *is* `embed_tokens` (no tensor of its own), and with pp > 1 the last stage also holds
  `embed_tokens`.
- Layer names keep their global index; stages split layers as `get_pp_indices` does (the extra
  layers of an uneven split go to the stages just before the last).
- MoE (`FusedMoE`): `mlp.gate` (router) is replicated; `mlp.experts.w13_weight[j]` = [gate; up] of
  local expert j and `w2_weight[j]` its down projection. Without expert parallelism every rank
  holds all experts split over tp; with it (ep = tp x dp) rank dp_rank * tp + tp_rank holds whole
  experts, a contiguous block with the remainder going to the first ranks ("linear" placement).
"""

from __future__ import annotations

from tidal.resharding.layout import (
    LocalTensor,
    ParallelLayout,
    Piece,
    cols,
    even_split,
    rows,
    stacked,
    whole,
)
from tidal.resharding.spec import ModelSpec, Shape

VOCAB_PADDING = 64


def pp_layers(num_layers: int, pp: int, pp_rank: int) -> tuple[int, int]:
    """[first, stop) global layers of a vLLM pipeline stage (vLLM's `get_pp_indices`)."""
    sizes = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        sizes[-i] += 1
    first = sum(sizes[:pp_rank])
    return first, first + sizes[pp_rank]


def kv_heads_of_rank(spec: ModelSpec, tp: int, tp_rank: int) -> tuple[int, int]:
    """[first, stop) of the KV heads a TP rank holds (replicated when tp > num_kv_heads)."""
    kv = spec.num_kv_heads
    if kv >= tp:
        return even_split(kv, tp, tp_rank, "ModelSpec.num_kv_heads (vLLM tp)")
    if tp % kv:
        raise ValueError(
            f"vLLM tp={tp} exceeds ModelSpec.num_kv_heads={kv} but is not a multiple of it; "
            "vLLM replicates KV heads only when tp is a multiple of num_kv_heads"
        )
    head = tp_rank // (tp // kv)
    return head, head + 1


def experts_of_rank(num_experts: int, ep: int, ep_rank: int) -> tuple[int, int]:
    """vLLM's linear expert placement: contiguous blocks, the remainder on the first ranks."""
    base, extra = divmod(num_experts, ep)
    first = ep_rank * base + min(ep_rank, extra)
    return first, first + base + (1 if ep_rank < extra else 0)


def vllm_tensors(spec: ModelSpec, layout: ParallelLayout, coords: dict[str, int]) -> tuple[LocalTensor, ...]:
    tp, pp = layout.tp, layout.pp
    tp_rank, pp_rank = coords["tp"], coords["pp"]
    if spec.num_heads % tp:
        raise ValueError(f"ModelSpec.num_heads={spec.num_heads} is not divisible by vLLM tp={tp}")
    if pp > spec.num_layers:
        raise ValueError(f"vLLM pp={pp} exceeds ModelSpec.num_layers={spec.num_layers}")
    out: list[LocalTensor] = []
    if pp_rank == 0 or (spec.tie_embeddings and pp_rank == pp - 1):
        out.append(_vocab(spec, tp, tp_rank, "model.embed_tokens.weight", "model.embed_tokens.weight"))
    first, stop = pp_layers(spec.num_layers, pp, pp_rank)
    for i in range(first, stop):
        out.extend(_layer(spec, layout, coords, i))
    if pp_rank == pp - 1:
        norm = (spec.hidden_size,)
        out.append(LocalTensor("model.norm.weight", norm, (whole("model.norm.weight", norm),)))
        if not spec.tie_embeddings:
            out.append(_vocab(spec, tp, tp_rank, "lm_head.weight", "lm_head.weight"))
    return tuple(out)


def _vocab(spec: ModelSpec, tp: int, tp_rank: int, name: str, canonical: str) -> LocalTensor:
    padded = -(-spec.vocab_size // VOCAB_PADDING) * VOCAB_PADDING
    start, end = even_split(padded, tp, tp_rank, f"vocabulary padded to {VOCAB_PADDING} (vLLM tp)")
    stop = min(end, spec.vocab_size)
    shape = (spec.vocab_size, spec.hidden_size)
    pieces = (rows(canonical, shape, start, stop),) if start < stop else ()
    return LocalTensor(name, (end - start, spec.hidden_size), pieces)


def _replicated(name: str, shape: Shape) -> LocalTensor:
    return LocalTensor(name, shape, (whole(name, shape),))


def qkv_pieces(
    spec: ModelSpec, tp: int, tp_rank: int, att: str, suffix: str
) -> tuple[Shape, tuple[Piece, ...]]:
    """qkv_proj.{suffix} of one TP rank: its q heads, then its k heads, then its v heads."""
    d = spec.head_dim
    tail = (spec.hidden_size,) if suffix == "weight" else ()
    q0, q1 = even_split(spec.num_heads, tp, tp_rank, "ModelSpec.num_heads (vLLM tp)")
    k0, k1 = kv_heads_of_rank(spec, tp, tp_rank)
    q_rows, kv_rows = (q1 - q0) * d, (k1 - k0) * d
    q_shape, kv_shape = (spec.num_heads * d, *tail), (spec.num_kv_heads * d, *tail)
    pieces = (
        rows(f"{att}q_proj.{suffix}", q_shape, q0 * d, q1 * d, 0),
        rows(f"{att}k_proj.{suffix}", kv_shape, k0 * d, k1 * d, q_rows),
        rows(f"{att}v_proj.{suffix}", kv_shape, k0 * d, k1 * d, q_rows + kv_rows),
    )
    return (q_rows + 2 * kv_rows, *tail), pieces


def _layer(spec: ModelSpec, layout: ParallelLayout, coords: dict[str, int], i: int) -> list[LocalTensor]:
    tp, tp_rank = layout.tp, coords["tp"]
    h, d = spec.hidden_size, spec.head_dim
    p = f"model.layers.{i}."
    att = f"{p}self_attn."
    out = [_replicated(f"{p}input_layernorm.weight", (h,))]
    for suffix in ("weight", "bias") if spec.qkv_bias else ("weight",):
        shape, pieces = qkv_pieces(spec, tp, tp_rank, att, suffix)
        out.append(LocalTensor(f"{att}qkv_proj.{suffix}", shape, pieces))
    if spec.qk_norm:
        out += [_replicated(f"{att}q_norm.weight", (d,)), _replicated(f"{att}k_norm.weight", (d,))]
    q = spec.num_heads * d
    start, stop = even_split(q, tp, tp_rank, "num_heads x head_dim (vLLM tp)")
    proj = cols(f"{att}o_proj.weight", (h, q), start, stop)
    out.append(LocalTensor(f"{att}o_proj.weight", (h, stop - start), (proj,)))
    if spec.o_bias:
        out.append(_replicated(f"{att}o_proj.bias", (h,)))
    out.append(_replicated(f"{p}post_attention_layernorm.weight", (h,)))
    if spec.is_moe:
        out.extend(_experts(spec, layout, coords, f"{p}mlp."))
        return out
    f = spec.ffn_size
    start, stop = even_split(f, tp, tp_rank, "ModelSpec.ffn_size (vLLM tp)")
    n = stop - start
    for suffix, tail in (("weight", (h,)), ("bias", ())) if spec.mlp_bias else (("weight", (h,)),):
        gate = rows(f"{p}mlp.gate_proj.{suffix}", (f, *tail), start, stop, 0)
        up = rows(f"{p}mlp.up_proj.{suffix}", (f, *tail), start, stop, n)
        out.append(LocalTensor(f"{p}mlp.gate_up_proj.{suffix}", (2 * n, *tail), (gate, up)))
    down = cols(f"{p}mlp.down_proj.weight", (h, f), start, stop)
    out.append(LocalTensor(f"{p}mlp.down_proj.weight", (h, n), (down,)))
    if spec.mlp_bias:
        out.append(_replicated(f"{p}mlp.down_proj.bias", (h,)))
    return out


def _experts(spec: ModelSpec, layout: ParallelLayout, coords: dict[str, int], p: str) -> list[LocalTensor]:
    h, f = spec.hidden_size, spec.moe_ffn_size
    out = [_replicated(f"{p}gate.weight", (spec.num_experts, h))]
    if layout.ep > 1:  # whole experts per rank, no TP inside an expert
        e0, e1 = experts_of_rank(spec.num_experts, layout.ep, coords["dp"] * layout.tp + coords["tp"])
        start, stop = 0, f
    else:
        e0, e1 = 0, spec.num_experts
        start, stop = even_split(f, layout.tp, coords["tp"], "ModelSpec.moe_ffn_size (vLLM tp)")
    n = stop - start
    w13, w2 = [], []
    for j, e in enumerate(range(e0, e1)):
        hf = f"{p}experts.{e}."
        w13.append(stacked(f"{hf}gate_proj.weight", (f, h), j, start, stop, 0, dim=0))
        w13.append(stacked(f"{hf}up_proj.weight", (f, h), j, start, stop, n, dim=0))
        w2.append(stacked(f"{hf}down_proj.weight", (h, f), j, start, stop, 0, dim=1))
    out.append(LocalTensor(f"{p}experts.w13_weight", (e1 - e0, 2 * n, h), tuple(w13)))
    out.append(LocalTensor(f"{p}experts.w2_weight", (e1 - e0, h, n), tuple(w2)))
    return out
