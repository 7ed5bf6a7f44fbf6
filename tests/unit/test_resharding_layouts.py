"""Layouts and conversions: Hugging Face <-> Megatron-core <-> vLLM, checked bit for bit.

The piece lists in `tidal.resharding` are compared against references written here with plain
tensor operations (view, cat, chunk, pad), the way the frameworks' own loaders cut tensors, so a
mistake in the piece arithmetic cannot hide behind the same mistake in the check.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tidal.resharding.apply import assemble, materialize
from tidal.resharding.layout import ParallelLayout
from tidal.resharding.spec import ModelSpec


def full_tensors(spec: ModelSpec, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen).to(spec.torch_dtype)
        for name, shape in spec.canonical_shapes().items()
    }


# ------------------------------------------------------------------ independent references


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, -t.shape[0] % multiple))


def megatron_reference(full, spec: ModelSpec, tp: int, pp: int, tp_rank: int, pp_rank: int) -> dict:
    """Megatron-core local state dict (local layer spec, dense MLP) cut with tensor ops."""
    out, h, d, g = {}, spec.hidden_size, spec.head_dim, spec.num_kv_heads
    vocab_multiple = spec.make_vocab_size_divisible_by * tp
    per_stage = spec.num_layers // pp
    if pp_rank == 0:
        emb = _pad_rows(full["model.embed_tokens.weight"], vocab_multiple)
        out["embedding.word_embeddings.weight"] = emb.chunk(tp)[tp_rank]
    for local in range(per_stage):
        p, m = f"model.layers.{pp_rank * per_stage + local}.", f"decoder.layers.{local}."
        out[m + "input_layernorm.weight"] = full[p + "input_layernorm.weight"]
        for suffix in ("weight", "bias") if spec.qkv_bias else ("weight",):
            tail = (h,) if suffix == "weight" else ()
            q = full[f"{p}self_attn.q_proj.{suffix}"].reshape(g, spec.heads_per_group * d, *tail)
            k = full[f"{p}self_attn.k_proj.{suffix}"].reshape(g, d, *tail)
            v = full[f"{p}self_attn.v_proj.{suffix}"].reshape(g, d, *tail)
            qkv = torch.cat([q, k, v], dim=1).chunk(tp)[tp_rank]
            out[f"{m}self_attention.linear_qkv.{suffix}"] = qkv.reshape(-1, *tail)
        if spec.qk_norm:
            out[m + "self_attention.q_layernorm.weight"] = full[p + "self_attn.q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = full[p + "self_attn.k_norm.weight"]
        out[m + "self_attention.linear_proj.weight"] = full[p + "self_attn.o_proj.weight"].chunk(tp, 1)[
            tp_rank
        ]
        if spec.o_bias:
            out[m + "self_attention.linear_proj.bias"] = full[p + "self_attn.o_proj.bias"]
        out[m + "pre_mlp_layernorm.weight"] = full[p + "post_attention_layernorm.weight"]
        for suffix in ("weight", "bias") if spec.mlp_bias else ("weight",):
            gate, up = full[f"{p}mlp.gate_proj.{suffix}"], full[f"{p}mlp.up_proj.{suffix}"]
            out[f"{m}mlp.linear_fc1.{suffix}"] = torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]])
        out[m + "mlp.linear_fc2.weight"] = full[p + "mlp.down_proj.weight"].chunk(tp, 1)[tp_rank]
        if spec.mlp_bias:
            out[m + "mlp.linear_fc2.bias"] = full[p + "mlp.down_proj.bias"]
    if pp_rank == pp - 1:
        out["decoder.final_layernorm.weight"] = full["model.norm.weight"]
        head = "model.embed_tokens.weight" if spec.tie_embeddings else "lm_head.weight"
        if not spec.tie_embeddings or pp > 1:
            out["output_layer.weight"] = _pad_rows(full[head], vocab_multiple).chunk(tp)[tp_rank]
    return out


def vllm_reference(full, spec: ModelSpec, tp: int, pp: int, tp_rank: int, pp_rank: int) -> dict:
    """vLLM worker parameters after load_weights (dense, no expert parallelism), cut with tensor ops."""
    assert pp in (1, 2)
    out, h, d, kv = {}, spec.hidden_size, spec.head_dim, spec.num_kv_heads
    first_stage = (spec.num_layers + 1) // 2 if pp == 2 else spec.num_layers  # extra layer before last
    layers = range(first_stage) if pp_rank == 0 else range(first_stage, spec.num_layers)
    if pp_rank == 0 or (spec.tie_embeddings and pp_rank == pp - 1):
        out["model.embed_tokens.weight"] = _pad_rows(full["model.embed_tokens.weight"], 64).chunk(tp)[tp_rank]
    for i in layers:
        p = f"model.layers.{i}."
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[p + name] = full[p + name]
        for suffix in ("weight", "bias") if spec.qkv_bias else ("weight",):
            tail = (h,) if suffix == "weight" else ()
            q = full[f"{p}self_attn.q_proj.{suffix}"].reshape(spec.num_heads, d, *tail).chunk(tp)[tp_rank]
            k = full[f"{p}self_attn.k_proj.{suffix}"].reshape(kv, d, *tail)
            v = full[f"{p}self_attn.v_proj.{suffix}"].reshape(kv, d, *tail)
            if tp <= kv:
                k, v = k.chunk(tp)[tp_rank], v.chunk(tp)[tp_rank]
            else:  # one KV head per rank, each replicated over tp // kv consecutive ranks
                k, v = k.repeat_interleave(tp // kv, 0)[tp_rank], v.repeat_interleave(tp // kv, 0)[tp_rank]
            out[f"{p}self_attn.qkv_proj.{suffix}"] = torch.cat([x.reshape(-1, *tail) for x in (q, k, v)])
        if spec.qk_norm:
            for name in ("q_norm.weight", "k_norm.weight"):
                out[f"{p}self_attn.{name}"] = full[f"{p}self_attn.{name}"]
        out[p + "self_attn.o_proj.weight"] = full[p + "self_attn.o_proj.weight"].chunk(tp, 1)[tp_rank]
        if spec.o_bias:
            out[p + "self_attn.o_proj.bias"] = full[p + "self_attn.o_proj.bias"]
        for suffix in ("weight", "bias") if spec.mlp_bias else ("weight",):
            gate, up = full[f"{p}mlp.gate_proj.{suffix}"], full[f"{p}mlp.up_proj.{suffix}"]
            out[f"{p}mlp.gate_up_proj.{suffix}"] = torch.cat([gate.chunk(tp)[tp_rank], up.chunk(tp)[tp_rank]])
        out[p + "mlp.down_proj.weight"] = full[p + "mlp.down_proj.weight"].chunk(tp, 1)[tp_rank]
        if spec.mlp_bias:
            out[p + "mlp.down_proj.bias"] = full[p + "mlp.down_proj.bias"]
    if pp_rank == pp - 1:
        out["model.norm.weight"] = full["model.norm.weight"]
        if not spec.tie_embeddings:
            out["lm_head.weight"] = _pad_rows(full["lm_head.weight"], 64).chunk(tp)[tp_rank]
    return out


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


# -------------------------------------------------------------------------- hand examples


def _labelled_spec(**kw) -> ModelSpec:
    base = dict(num_layers=1, hidden_size=2, num_heads=4, num_kv_heads=2, head_dim=2, ffn_size=4)
    return ModelSpec(**{**base, "vocab_size": 8, "tie_embeddings": True, "dtype": "float32", **kw})


def _labelled(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Row r of q_proj holds 100 + r, of k_proj 200 + r, of v_proj 300 + r, gate 400 + r, up 500 + r."""
    full = full_tensors(spec)
    for name, base in (("q_proj", 100), ("k_proj", 200), ("v_proj", 300)):
        t = full[f"model.layers.0.self_attn.{name}.weight"]
        t.copy_((base + torch.arange(t.shape[0]))[:, None].expand_as(t))
    for name, base in (("gate_proj", 400), ("up_proj", 500)):
        t = full[f"model.layers.0.mlp.{name}.weight"]
        t.copy_((base + torch.arange(t.shape[0]))[:, None].expand_as(t))
    return full


def _column(tensors: dict, name: str) -> list[int]:
    return tensors[name][:, 0].int().tolist()


def test_megatron_qkv_is_grouped_per_query_group_and_tp_splits_whole_groups():
    # 4 heads of dim 2 in 2 query groups: group 0 = q heads 0-1 + kv head 0, group 1 = q heads 2-3 + kv head 1.
    spec = _labelled_spec()
    full = _labelled(spec)
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    tp1 = materialize(spec, ParallelLayout.megatron(tp=1), 0, full)
    assert _column(tp1, qkv) == [
        100,
        101,
        102,
        103,
        200,
        201,
        300,
        301,
        104,
        105,
        106,
        107,
        202,
        203,
        302,
        303,
    ]
    tp2 = [materialize(spec, ParallelLayout.megatron(tp=2), r, full) for r in range(2)]
    assert _column(tp2[0], qkv) == [100, 101, 102, 103, 200, 201, 300, 301]
    assert _column(tp2[1], qkv) == [104, 105, 106, 107, 202, 203, 302, 303]
    assert _column(tp2[1], "decoder.layers.0.mlp.linear_fc1.weight") == [402, 403, 502, 503]


def test_vllm_qkv_holds_own_heads_and_replicates_kv_heads_beyond_their_count():
    spec = _labelled_spec()
    full = _labelled(spec)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    tp2 = [materialize(spec, ParallelLayout.vllm(tp=2), r, full) for r in range(2)]
    assert _column(tp2[1], qkv) == [104, 105, 106, 107, 202, 203, 302, 303]
    tp4 = [materialize(spec, ParallelLayout.vllm(tp=4), r, full) for r in range(4)]  # tp 4 > 2 KV heads
    assert [_column(t, qkv) for t in tp4] == [
        [100, 101, 200, 201, 300, 301],
        [102, 103, 200, 201, 300, 301],
        [104, 105, 202, 203, 302, 303],
        [106, 107, 202, 203, 302, 303],
    ]
    assert _column(tp4[3], "model.layers.0.mlp.gate_up_proj.weight") == [403, 503]


def test_vocab_padding_megatron_and_vllm():
    spec = _labelled_spec(num_kv_heads=4, make_vocab_size_divisible_by=4)  # vocab 8 -> TP 4 pads to 16
    full = full_tensors(spec)
    emb = full["model.embed_tokens.weight"]
    ranks = [materialize(spec, ParallelLayout.megatron(tp=4), r, full) for r in range(4)]
    shards = [r["embedding.word_embeddings.weight"] for r in ranks]
    assert [tuple(s.shape) for s in shards] == [(4, 2)] * 4
    assert torch.equal(torch.cat(shards[:2]), emb) and not shards[2].any() and not shards[3].any()
    vllm = [
        materialize(spec, ParallelLayout.vllm(tp=2), r, full)["model.embed_tokens.weight"] for r in range(2)
    ]
    assert [tuple(s.shape) for s in vllm] == [(32, 2)] * 2  # vLLM pads 8 -> 64 rows
    assert torch.equal(vllm[0][:8], emb) and not vllm[0][8:].any() and not vllm[1].any()


# ---------------------------------------------------------------- generated layouts vs refs


@st.composite
def dense_specs(draw, tp_values=(1, 2, 4, 8)):
    tp = draw(st.sampled_from(tp_values))
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2])) * max(1, tp // kv)
    spec = ModelSpec(
        num_layers=draw(st.sampled_from([2, 3, 4])),
        hidden_size=draw(st.sampled_from([4, 6])),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=draw(st.sampled_from([1, 2])),
        ffn_size=8 * draw(st.sampled_from([1, 2])),
        vocab_size=draw(st.integers(3, 140)),
        tie_embeddings=draw(st.booleans()),
        qkv_bias=draw(st.booleans()),
        o_bias=draw(st.booleans()),
        mlp_bias=draw(st.booleans()),
        qk_norm=draw(st.booleans()),
        dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        make_vocab_size_divisible_by=draw(st.sampled_from([1, 8, 128])),
    )
    return spec, tp


@settings(max_examples=40, deadline=None)
@given(case=dense_specs(), pp=st.sampled_from([1, 2]))
def test_vllm_layout_matches_reference(case, pp):
    spec, tp = case
    full = full_tensors(spec)
    layout = ParallelLayout.vllm(tp=tp, pp=pp)
    locals_ = {}
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        locals_[rank] = materialize(spec, layout, rank, full)
        assert_same_tensors(locals_[rank], vllm_reference(full, spec, tp, pp, c["tp"], c["pp"]))
    assert_same_tensors(assemble(spec, layout, locals_), full)


@settings(max_examples=40, deadline=None)
@given(case=dense_specs(tp_values=(1, 2, 4)), pp=st.sampled_from([1, 2]), dp=st.sampled_from([1, 2]))
def test_megatron_layout_matches_reference(case, pp, dp):
    spec, tp = case
    assume(spec.num_kv_heads % tp == 0 and spec.num_layers % pp == 0)  # else Megatron refuses (tested below)
    full = full_tensors(spec)
    layout = ParallelLayout.megatron(tp=tp, pp=pp, dp=dp)
    locals_ = {}
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        assert rank == c["tp"] + tp * (c["dp"] + dp * c["pp"])  # Megatron's tp-dp-pp order
        locals_[rank] = materialize(spec, layout, rank, full)
        assert_same_tensors(locals_[rank], megatron_reference(full, spec, tp, pp, c["tp"], c["pp"]))
    assert_same_tensors(assemble(spec, layout, locals_), full)


def test_megatron_transformer_engine_names_fuse_the_norms():
    spec = _labelled_spec()
    names = {t.name for t in ParallelLayout.megatron(fused_norms=True).rank_tensors(spec, 0)}
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)


def test_fsdp_shards_dim0_like_torch_chunk():
    spec = _labelled_spec()
    full = full_tensors(spec)
    layout = ParallelLayout.fsdp(dp=3)
    locals_ = {r: materialize(spec, layout, r, full) for r in range(3)}
    for name, tensor in full.items():
        chunks = list(tensor.chunk(3))
        chunks += [tensor[:0]] * (3 - len(chunks))
        for r in range(3):
            assert torch.equal(locals_[r][name], chunks[r]), name
    assert_same_tensors(assemble(spec, layout, locals_), full)


# ------------------------------------------------------------------------- real HF configs


def test_spec_from_hf_config_matches_saved_checkpoint_shapes(tmp_path):
    config = transformers.Qwen2Config(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, vocab_size=100, tie_word_embeddings=True,
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    spec = ModelSpec.from_hf_config(config)
    assert spec.qkv_bias and not spec.o_bias and spec.tie_embeddings
    assert {k: tuple(v.shape) for k, v in saved.items()} == spec.canonical_shapes()


def test_moe_checkpoint_and_transformers_fused_experts_layout(tmp_path):
    """Canonical = the checkpoint's per-expert tensors; transformers>=5 memory = the fused layout."""
    config = transformers.Qwen3MoeConfig(
        num_hidden_layers=2, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_experts=4,
        num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=4, vocab_size=50,
    )  # fmt: skip
    model = transformers.Qwen3MoeForCausalLM(config)
    model.save_pretrained(tmp_path)
    spec = ModelSpec.from_hf_config(config, dtype="float32")
    assert spec.is_moe and spec.qk_norm
    checkpoint = load_file(tmp_path / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in checkpoint.items()} == spec.canonical_shapes()
    in_memory = materialize(spec, ParallelLayout.hf(fused_experts=True), 0, checkpoint)
    assert_same_tensors(in_memory, dict(model.state_dict()))


@pytest.mark.parametrize(
    "layout",
    [
        ParallelLayout.megatron(tp=2, dp=2, ep=2),
        ParallelLayout.megatron(tp=2, pp=2, dp=2, ep=4, etp=1),
        ParallelLayout.vllm(tp=2),
        ParallelLayout.vllm(tp=2, dp=2, expert_parallel=True),
        ParallelLayout.fsdp(dp=3, fused_experts=True),
    ],
)
def test_moe_layouts_round_trip(layout):
    spec = ModelSpec(
        num_layers=2, hidden_size=4, num_heads=4, num_kv_heads=2, head_dim=2, ffn_size=0, vocab_size=20,
        tie_embeddings=False, num_experts=4, moe_ffn_size=4, qk_norm=True, dtype="float32",
    )  # fmt: skip
    full = full_tensors(spec)
    locals_ = {r: materialize(spec, layout, r, full) for r in range(layout.world_size)}
    assert_same_tensors(assemble(spec, layout, locals_), full)


def test_vllm_expert_parallel_places_whole_experts_remainder_first():
    spec = ModelSpec(
        num_layers=1, hidden_size=4, num_heads=2, num_kv_heads=2, head_dim=2, ffn_size=0, vocab_size=8,
        tie_embeddings=True, num_experts=5, moe_ffn_size=4, dtype="float32",
    )  # fmt: skip
    full = full_tensors(spec)
    layout = ParallelLayout.vllm(tp=2, expert_parallel=True)
    w13 = [materialize(spec, layout, r, full)["model.layers.0.mlp.experts.w13_weight"] for r in range(2)]
    assert [w.shape[0] for w in w13] == [3, 2]
    e = "model.layers.0.mlp.experts.3."
    assert torch.equal(w13[1][0], torch.cat([full[e + "gate_proj.weight"], full[e + "up_proj.weight"]]))


# ------------------------------------------------------------------------------ user errors


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: ParallelLayout.megatron(tp=4).rank_tensors(_labelled_spec(), 0),
            "num_heads=4|num_kv_heads=2",
        ),
        (lambda: ParallelLayout.vllm(tp=3).rank_tensors(_labelled_spec(), 0), "num_heads=4"),
        (lambda: ParallelLayout.megatron(pp=3).rank_tensors(_labelled_spec(), 0), "num_layers"),
        (lambda: ParallelLayout("deepspeed"), "format"),
        (lambda: ParallelLayout("hf", tp=2), "only dp"),
        (lambda: ParallelLayout.vllm(tp=2).coords(2), "outside"),
        (lambda: ParallelLayout("vllm", tp=2, ep=3), "ep=3"),
        (lambda: ParallelLayout("megatron", rank_order=("tp", "dp")), "rank_order"),
        (lambda: _labelled_spec(dtype="bf16"), "dtype"),
    ],
)
def test_user_mistakes_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_vllm_tp_not_multiple_of_kv_heads_is_refused():
    spec = ModelSpec(
        num_layers=1, hidden_size=4, num_heads=12, num_kv_heads=3, head_dim=1, ffn_size=12, vocab_size=8,
        tie_embeddings=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match="multiple of it"):
        ParallelLayout.vllm(tp=4).rank_tensors(spec, 0)
