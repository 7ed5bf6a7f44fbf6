"""A real megatron-core GPTModel at TP=2 on 2 gloo ranks, resharded to Hugging Face and vLLM shards.

For a Qwen2-shaped model (qkv bias, untied output layer) and a Qwen3-shaped one (q/k norms, tied
embeddings), each rank builds its Megatron TP shard and fills it with random values. The model's own
full weights are gathered along each parameter's `partition_dim` and converted to Hugging Face
tensors by a plain reference written here (reshape the per-group q/k/v, de-interleave fc1's
per-rank [gate; up]); a transformers model loaded with them must give Megatron's logits, so the
reference itself is right. Then the executor syncs the Megatron parameters, colocated on the same
two ranks, into full Hugging Face tensors on both ranks and vLLM shards at TP 1 (rank 0) and TP 2,
each compared bit for bit with the reference, and again after the weights change in place.
"""

from __future__ import annotations

import datetime
import importlib.util
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tidal.resharding.apply import materialize
from tidal.resharding.executor import ReshardExecutor
from tidal.resharding.layout import ParallelLayout
from tidal.resharding.planner import Placement, make_plan
from tidal.resharding.spec import ModelSpec
from tidal.resharding.transports import TorchP2PTransport

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None,
        reason="megatron-core is not installed (pip install megatron-core==0.16.1, the 'megatron' extra)",
    ),
]

TP = 2
VOCAB = 200  # Megatron pads it to 256 (128 x TP): the padded rows must not leak anywhere
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def _hf_config(kind: str):
    import transformers

    if kind == "qwen2":  # q/k/v biases, separate output layer
        return transformers.Qwen2Config(**COMMON, tie_word_embeddings=False)
    return transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True)  # q/k norms


def _build_megatron(hf_config, spec: ModelSpec):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=torch.float32,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
    )
    return GPTModel(
        config,
        get_gpt_layer_local_spec(qk_layernorm=spec.qk_norm, normalization="RMSNorm"),
        vocab_size=spec.megatron_padded_vocab(TP),
        max_sequence_length=64,
        position_embedding_type="rope",
        rotary_base=10000,
        share_embeddings_and_output_weights=spec.tie_embeddings,
        parallel_output=False,  # logits gathered over TP, for the comparison with transformers
    )


def _randomize(model, seed: int, tp_rank: int, scale: float) -> None:
    """Random values in place: TP shards differ per rank, replicated parameters agree across ranks."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            sharded = getattr(p, "tensor_model_parallel", False)
            gen = torch.Generator().manual_seed(
                zlib.crc32(f"{seed}/{name}/{tp_rank if sharded else -1}".encode())
            )
            noise = torch.randn(p.shape, generator=gen) * scale
            p.add_(noise) if "norm" in name else p.copy_(noise)


def _full_megatron(model) -> dict[str, torch.Tensor]:
    """The model's own full weights: each TP-sharded parameter gathered along its partition_dim."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(TP)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, dim=p.partition_dim)
        out[name] = t.clone()
    return out


def _reference_hf(mc: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Full Megatron tensors -> Hugging Face tensors, with plain reshapes (independent of the planner)."""
    d, nh, ng, f, h = spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.ffn_size, spec.hidden_size
    per_group = nh // ng
    out = {"model.embed_tokens.weight": mc["embedding.word_embeddings.weight"][:VOCAB]}
    for i in range(spec.num_layers):
        m, p = f"decoder.layers.{i}.", f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = mc[m + "input_layernorm.weight"]
        for suffix in ("weight", "bias") if spec.qkv_bias else ("weight",):
            tail = (h,) if suffix == "weight" else ()
            groups = mc[f"{m}self_attention.linear_qkv.{suffix}"].reshape(ng, per_group + 2, d, *tail)
            out[f"{p}self_attn.q_proj.{suffix}"] = groups[:, :per_group].reshape(nh * d, *tail)
            out[f"{p}self_attn.k_proj.{suffix}"] = groups[:, per_group].reshape(ng * d, *tail)
            out[f"{p}self_attn.v_proj.{suffix}"] = groups[:, per_group + 1].reshape(ng * d, *tail)
        out[p + "self_attn.o_proj.weight"] = mc[m + "self_attention.linear_proj.weight"]
        if spec.qk_norm:
            out[p + "self_attn.q_norm.weight"] = mc[m + "self_attention.q_layernorm.weight"]
            out[p + "self_attn.k_norm.weight"] = mc[m + "self_attention.k_layernorm.weight"]
        out[p + "post_attention_layernorm.weight"] = mc[m + "pre_mlp_layernorm.weight"]
        fc1 = mc[m + "mlp.linear_fc1.weight"].reshape(TP, 2, f // TP, h)  # per rank: [gate; up]
        out[p + "mlp.gate_proj.weight"] = fc1[:, 0].reshape(f, h)
        out[p + "mlp.up_proj.weight"] = fc1[:, 1].reshape(f, h)
        out[p + "mlp.down_proj.weight"] = mc[m + "mlp.linear_fc2.weight"]
    out["model.norm.weight"] = mc["decoder.final_layernorm.weight"]
    if not spec.tie_embeddings:
        out["lm_head.weight"] = mc["output_layer.weight"][:VOCAB]
    assert sorted(out) == sorted(spec.canonical_shapes())
    return out


def _check_logits(model, hf_config, reference: dict[str, torch.Tensor], rank: int) -> None:
    """Megatron's TP=2 forward equals transformers' forward with the reference weights."""
    import transformers

    from tidal.resharding.megatron_cpu_compat import causal_mask

    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        logits = model(ids, positions, attention_mask=causal_mask(ids.shape[1]))[..., :VOCAB]
    if rank != 0:
        return
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(reference, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    with torch.no_grad():
        expected = hf(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def _targets_match(executor: ReshardExecutor, targets: dict, reference: dict, what: str) -> None:
    for rank, tensors in targets.items():
        expected = materialize(executor.plan.spec, executor.plan.dst, rank, reference)
        for name, got in tensors.items():
            assert torch.equal(got, expected[name]), (what, rank, name)


def _worker(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=TP, timeout=datetime.timedelta(seconds=90)
    )
    from megatron.core import parallel_state

    from tidal.resharding.megatron_cpu_compat import apply_cpu_shims

    apply_cpu_shims()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    transport = TorchP2PTransport()
    src = ParallelLayout.megatron(tp=TP)
    for kind in ("qwen2", "qwen3"):
        hf_config = _hf_config(kind)
        spec = ModelSpec.from_hf_config(hf_config, dtype="float32")
        model = _build_megatron(hf_config, spec)
        _randomize(model, seed=0, tp_rank=rank, scale=0.05)
        reference = _reference_hf(_full_megatron(model), spec)
        _check_logits(model, hf_config, reference, rank)

        sources = {rank: dict(model.named_parameters())}
        syncs = []
        for what, dst, placement in (
            ("hf on both ranks", ParallelLayout.hf(dp=TP), Placement.colocated(TP, TP)),
            ("vllm tp1 on rank 0", ParallelLayout.vllm(tp=1), Placement.colocated(TP, 1)),
            ("vllm tp2", ParallelLayout.vllm(tp=TP), Placement.colocated(TP, TP)),
        ):
            executor = ReshardExecutor(make_plan(spec, src, dst, placement, bucket_bytes=16 << 10), transport)
            targets = executor.allocate_targets()
            with torch.no_grad():
                executor.sync(sources, targets, verify=True)
            _targets_match(executor, targets, reference, f"{kind}: {what}")
            syncs.append((what, executor, targets))

        # The trainer steps: the same parameters change in place; a second sync into the same
        # target tensors must carry the new values (no cached copy of the old ones).
        _randomize(model, seed=1, tp_rank=rank, scale=0.05)
        new_reference = _reference_hf(_full_megatron(model), spec)
        assert not torch.equal(
            new_reference["model.layers.0.self_attn.q_proj.weight"],
            reference["model.layers.0.self_attn.q_proj.weight"],
        )
        for what, executor, targets in syncs:
            with torch.no_grad():
                executor.sync(sources, targets, verify=True)
            _targets_match(executor, targets, new_reference, f"{kind}: {what}, after the weights changed")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def test_megatron_tp2_weights_to_hf_and_vllm_tp1_tp2_match_the_models_own_weights(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path}/rendezvous",), nprocs=TP, join=True)
