"""The shapes of a decoder-only transformer, and its canonical (Hugging Face) tensors.

Every layout in this package describes a rank's local tensors as rectangles of these canonical
tensors. The canonical form is the Hugging Face *checkpoint* form: what `save_pretrained` writes
and what vLLM's `load_weights` reads. MoE experts are therefore one 2-D tensor per expert
(`model.layers.{i}.mlp.experts.{j}.gate_proj.weight`), even though transformers >= 5 keeps them
fused in memory; that fused form is just another layout (see `layout.py`, `fused_experts`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

Shape = tuple[int, ...]

_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and structural switches of a Llama/Qwen-family decoder (hashable: plans are cached on it)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int  # = Megatron's num_query_groups
    head_dim: int
    ffn_size: int  # dense MLP intermediate size
    vocab_size: int  # rows of the HF embedding (unpadded for Megatron/vLLM purposes)
    tie_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0  # 0 = dense MLP in every layer
    moe_ffn_size: int = 0
    dtype: str = "bfloat16"
    # Megatron pads the vocabulary to a multiple of this times the TP size.
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelSpec.{name}={getattr(self, name)} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelSpec.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.num_experts:
            if self.moe_ffn_size < 1:
                raise ValueError(f"ModelSpec.moe_ffn_size={self.moe_ffn_size} must be >= 1 with experts")
            if self.mlp_bias:
                raise ValueError("ModelSpec.mlp_bias=True is not supported with experts (no such model)")
        elif self.ffn_size < 1:
            raise ValueError(f"ModelSpec.ffn_size={self.ffn_size} must be >= 1 for a dense MLP")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"ModelSpec.dtype={self.dtype!r} is not a torch dtype name (e.g. 'bfloat16')")

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def element_size(self) -> int:
        return torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def megatron_padded_vocab(self, tp: int) -> int:
        """Megatron's `_vocab_size_with_padding`: round up to a multiple of divisible_by x TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def canonical_shapes(self) -> dict[str, Shape]:
        """Every canonical tensor, in checkpoint order (the order plans and buckets follow)."""
        return dict(_canonical_shapes(self))

    def num_bytes(self) -> int:
        return sum(_numel(s) for s in self.canonical_shapes().values()) * self.element_size

    @classmethod
    def from_hf_config(cls, config: Any, dtype: str = "bfloat16") -> ModelSpec:
        """Read a transformers config (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE)."""
        model_type = config.model_type
        if model_type not in _SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.model_type={model_type!r} is not supported by the resharder; "
                f"supported: {_SUPPORTED_MODEL_TYPES}"
            )
        num_heads = config.num_attention_heads
        num_kv_heads = config.num_key_value_heads or num_heads
        # Qwen2's config has no head_dim attribute; Llama/Qwen3 may leave it None.
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False  # hard-wired in Qwen2's attention
        else:
            qkv_bias = o_bias = bool(config.attention_bias)
            mlp_bias = bool(getattr(config, "mlp_bias", False))  # Qwen3 has no such field: never biased
        num_experts, moe_ffn_size = 0, 0
        if model_type == "qwen3_moe":
            if config.decoder_sparse_step != 1 or list(config.mlp_only_layers):
                raise ValueError(
                    f"qwen3_moe with decoder_sparse_step={config.decoder_sparse_step}, "
                    f"mlp_only_layers={config.mlp_only_layers} mixes dense and MoE layers; "
                    "the resharder supports all-MoE models only"
                )
            num_experts, moe_ffn_size = config.num_experts, config.moe_intermediate_size
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            ffn_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            tie_embeddings=bool(config.tie_word_embeddings),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=model_type.startswith("qwen3"),
            num_experts=num_experts,
            moe_ffn_size=moe_ffn_size,
            dtype=dtype,
        )


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def layer_shapes(spec: ModelSpec, i: int) -> dict[str, Shape]:
    """The canonical tensors of decoder layer `i`."""
    h, d = spec.hidden_size, spec.head_dim
    q, kv = spec.num_heads * d, spec.num_kv_heads * d
    p = f"model.layers.{i}."
    out: dict[str, Shape] = {f"{p}input_layernorm.weight": (h,)}
    for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        out[f"{p}self_attn.{name}.weight"] = (rows, h)
        if spec.qkv_bias:
            out[f"{p}self_attn.{name}.bias"] = (rows,)
    out[f"{p}self_attn.o_proj.weight"] = (h, q)
    if spec.o_bias:
        out[f"{p}self_attn.o_proj.bias"] = (h,)
    if spec.qk_norm:
        out[f"{p}self_attn.q_norm.weight"] = (d,)
        out[f"{p}self_attn.k_norm.weight"] = (d,)
    out[f"{p}post_attention_layernorm.weight"] = (h,)
    if spec.is_moe:
        out[f"{p}mlp.gate.weight"] = (spec.num_experts, h)
        f = spec.moe_ffn_size
        for e in range(spec.num_experts):
            out[f"{p}mlp.experts.{e}.gate_proj.weight"] = (f, h)
            out[f"{p}mlp.experts.{e}.up_proj.weight"] = (f, h)
            out[f"{p}mlp.experts.{e}.down_proj.weight"] = (h, f)
    else:
        f = spec.ffn_size
        for name, shape in (("gate_proj", (f, h)), ("up_proj", (f, h)), ("down_proj", (h, f))):
            out[f"{p}mlp.{name}.weight"] = shape
            if spec.mlp_bias:
                out[f"{p}mlp.{name}.bias"] = (shape[0],)
    return out


@functools.cache
def _canonical_shapes(spec: ModelSpec) -> tuple[tuple[str, Shape], ...]:
    out: dict[str, Shape] = {"model.embed_tokens.weight": (spec.vocab_size, spec.hidden_size)}
    for i in range(spec.num_layers):
        out.update(layer_shapes(spec, i))
    out["model.norm.weight"] = (spec.hidden_size,)
    if not spec.tie_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, spec.hidden_size)
    return tuple(out.items())


@dataclass(frozen=True)
class TensorSpec:
    """Any model's canonical tensors by name and shape, without its structure.

    The `hf` and `fsdp` layouts only hold whole tensors or row blocks of them, so they need
    nothing more: with this spec an FSDP trainer feeds an engine holding full tensors for any
    model transformers loads (the embedded engine), not only the families `ModelSpec` describes.
    Megatron and vLLM layouts cut fused tensors by heads and groups and need a `ModelSpec`.
    """

    tensors: tuple[tuple[str, Shape], ...]  # checkpoint order: the order plans and buckets follow
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.tensors:
            raise ValueError("TensorSpec.tensors is empty; pass the model's (name, shape) pairs")
        names = [name for name, _ in self.tensors]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"TensorSpec.tensors names {twice[:3]} more than once; names must be unique")
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"TensorSpec.dtype={self.dtype!r} is not a torch dtype name (e.g. 'bfloat16')")

    def __hash__(self) -> int:
        return self._hash  # plans and layouts are cached on the spec: hash the long tuple once

    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.tensors, self.dtype))

    @property
    def element_size(self) -> int:
        return torch.empty(0, dtype=self.torch_dtype).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def canonical_shapes(self) -> dict[str, Shape]:
        return dict(self.tensors)

    def num_bytes(self) -> int:
        return sum(_numel(s) for _, s in self.tensors) * self.element_size

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> TensorSpec:
        """The spec of a model's own tensors (`dict(model.named_parameters())`: tied ones once)."""
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) != 1:
            raise ValueError(
                f"TensorSpec.of: the tensors have dtypes {sorted(map(str, dtypes))}; the resharder "
                "moves one dtype per model, so load the model in one dtype"
            )
        dtype = str(dtypes.pop()).removeprefix("torch.")
        return cls(tuple((name, tuple(t.shape)) for name, t in tensors.items()), dtype)


# What a plan is computed over: a structured model, or bare named tensors (hf and fsdp layouts only).
Spec = ModelSpec | TensorSpec
