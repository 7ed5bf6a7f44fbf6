"""The two ways the embedded engine runs the model: a lean Llama-family path and the HF reference.

Both implement the calls used by the decode loop:
    prefill(ids [B,P], mask [B,P], positions [B,P], max_len) -> last-token logits [B,V]
    decode(tokens [B], positions [B]) -> logits [B,V]
    keep(rows [B'])   keep these rows of the cache (drop finished ones, or fan a prompt out to n)
    refresh()         re-read weights after an in-place update
and, for continuous batching (continuous.py), two more:
    detach() -> state             hand the batch's cache over (the forward forgets it)
    join(states, room, num_positions)
                      the batch becomes the rows of these detached states, in order: caches of
                      different lengths are right-aligned (the shorter left-padded with masked
                      slots), with room for `room` more tokens and positions < num_positions

`HFForward` is the plain reference: the model's own forward with a transformers DynamicCache.
`FastForward` reuses the model's embeddings, norms and rotary table but does the rest itself over
a preallocated `StaticKVCache`: q/k/v in one product, SiLU fused into the gate product (oneDNN
prepacked weights on CPU, see linear.py), and decode attention as two small matmuls, which on CPU
are several times cheaper than scaled_dot_product_attention for a single query. It covers decoders
whose layers are exactly Llama's (Llama, Qwen2, Qwen3, Mistral without sliding windows);
`FastForward.unsupported` says why a model is not covered, and the engine then uses `HFForward`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from tidal.workers.engines.embedded.kv_cache import StaticKVCache
from tidal.workers.engines.embedded.linear import Linear

_FAST_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})
# Rope variants whose frequencies do not depend on the sequence length seen so far, so one table
# computed up front is exact ("dynamic" and "longrope" rescale with length).
_FAST_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})


class HFForward:
    """Reference path: the Hugging Face forward with a DynamicCache and an explicit 2-D mask."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, max_len: int
    ) -> torch.Tensor:
        self.cache = DynamicCache(config=self.model.config)
        self.mask = mask.long()
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        assert self.cache is not None and self.mask is not None, "prefill first"
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def refresh(self) -> None:
        """Nothing to do: the HF forward reads the parameters directly."""

    def keep(self, rows: torch.Tensor) -> None:
        assert self.cache is not None and self.mask is not None, "prefill first"
        self.cache.batch_select_indices(rows)
        self.mask = self.mask.index_select(0, rows)

    def detach(self) -> tuple[DynamicCache, torch.Tensor] | None:
        if self.cache is None or self.mask is None:
            return None
        state, self.cache, self.mask = (self.cache, self.mask), None, None
        return state

    def join(self, states: list[tuple[DynamicCache, torch.Tensor]], room: int, num_positions: int) -> None:
        """See the module docstring; a DynamicCache grows as it goes, so `room` and positions need nothing."""
        assert states, "nothing to join"
        spans = []
        for cache, mask in states:
            if any(type(layer) is not DynamicLayer for layer in cache.layers):
                raise ValueError(
                    f"continuous batching cannot join caches of {type(self.model).__name__}: its cache "
                    "has non-full-attention layers (sliding window or recurrent); use EmbeddedEngine.generate"
                )
            real = mask.bool().any(dim=0)
            spans.append((cache, mask, int(real.long().argmax()) if bool(real.any()) else mask.shape[1]))
        width = max(mask.shape[1] - first for _, mask, first in spans)
        joined = DynamicCache(config=self.model.config)
        for index in range(len(states[0][0].layers)):
            keys = [_pad_left(c.layers[index].keys[:, :, first:], width) for c, _, first in spans]
            values = [_pad_left(c.layers[index].values[:, :, first:], width) for c, _, first in spans]
            joined.update(torch.cat(keys), torch.cat(values), index)
        self.cache = joined
        self.mask = torch.cat([_pad_left(mask[:, first:], width, dim=1) for _, mask, first in spans])


class FastForward:
    """Llama-family decoder over a StaticKVCache, built from the HF model's own modules.

    Norms, embeddings and the rotary table are the model's modules; the projections go through
    `Linear` (q/k/v fused into one product, SiLU fused into the gate), prepacked for oneDNN on CPU
    when `packed`. Fused/packed weights are copies: call `refresh()` after the model's weights
    change in place.
    """

    def __init__(self, model: PreTrainedModel, packed: bool) -> None:
        reason = self.unsupported(model)
        if reason is not None:
            raise ValueError(f"FastForward cannot run this model: {reason}")
        cfg = model.config
        self.model = model
        self.layers = list(model.model.layers)
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = self.layers[0].self_attn.head_dim
        self.scaling = self.layers[0].self_attn.scaling
        self.q_width = self.num_heads * self.head_dim
        self.kv_width = self.num_kv_heads * self.head_dim
        self.linears = [
            {
                "qkv": Linear(
                    [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], packed
                ),
                "o": Linear([layer.self_attn.o_proj], packed),
                "gate": Linear([layer.mlp.gate_proj], packed, activation="swish"),
                "up": Linear([layer.mlp.up_proj], packed),
                "down": Linear([layer.mlp.down_proj], packed),
            }
            for layer in self.layers
        ]
        self.cache: StaticKVCache | None = None
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    @staticmethod
    def unsupported(model: PreTrainedModel) -> str | None:
        """None when this path computes what the model computes (up to float rounding); else why not."""
        cfg = model.config
        if cfg.model_type not in _FAST_MODEL_TYPES:
            return f"model_type {cfg.model_type!r} is not one of {sorted(_FAST_MODEL_TYPES)}"
        layer_types = getattr(cfg, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            return f"layer_types {sorted(set(layer_types))} include sliding-window attention"
        if getattr(cfg, "sliding_window", None) is not None and cfg.model_type == "mistral":
            return "mistral with sliding_window set"
        rope_type = (getattr(cfg, "rope_parameters", None) or {"rope_type": "default"})["rope_type"]
        if rope_type not in _FAST_ROPE_TYPES:
            return f"rope_type {rope_type!r} is not one of {sorted(_FAST_ROPE_TYPES)}"
        if cfg.hidden_act != "silu":
            return f"hidden_act {cfg.hidden_act!r} is not silu"
        return None

    def refresh(self) -> None:
        """Re-read fused/packed weights from the model after an in-place weight update."""
        for linears in self.linears:
            for linear in linears.values():
                linear.refresh()

    # ------------------------------------------------------------------ the three calls

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, max_len: int
    ) -> torch.Tensor:
        batch, width = ids.shape
        dtype = self.model.model.embed_tokens.weight.dtype
        self.cache = StaticKVCache(
            len(self.layers), batch, self.num_kv_heads, max_len, self.head_dim, dtype, ids.device
        )
        self._build_rope_table(int(positions.max()) + max_len, dtype, ids.device)
        self.cache.append_mask(mask.bool())
        # Causal over slots, restricted to real keys. A pad query may see itself so that its softmax
        # row is never empty (its output is never used).
        causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
        attn_mask = causal[None] & self.cache.key_mask[:, None, :width]
        attn_mask |= torch.eye(width, dtype=torch.bool, device=ids.device)[None]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [B,1,T,hd]

        hidden = self.model.model.embed_tokens(ids)
        for index, (layer, linears) in enumerate(zip(self.layers, self.linears)):
            qkv = linears["qkv"](layer.input_layernorm(hidden))
            q, k, v = qkv.split([self.q_width, self.kv_width, self.kv_width], dim=-1)
            q = q.reshape(batch, width, self.num_heads, self.head_dim)
            k = k.reshape(batch, width, self.num_kv_heads, self.head_dim)
            v = v.reshape(batch, width, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._qk_norm(layer.self_attn, q, k)
            q = _rope(q.transpose(1, 2), cos, sin)
            k = _rope(k.transpose(1, 2), cos, sin)
            keys, values = self.cache.write(index, k, v)
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=attn_mask[:, None], scale=self.scaling, enable_gqa=True
            )
            hidden = hidden + linears["o"](out.transpose(1, 2).reshape(batch, width, -1))
            hidden = hidden + self._mlp(linears, layer.post_attention_layernorm(hidden))
        self.cache.advance(width)
        return self._logits(hidden[:, -1])

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        assert cache is not None and self.cos is not None and self.sin is not None, "prefill first"
        batch = tokens.shape[0]
        groups = self.num_heads // self.num_kv_heads
        cache.append_mask(torch.ones(batch, 1, dtype=torch.bool, device=tokens.device))
        # Additive mask shared by all layers: 0 for real keys, -inf for padding. [B,1,1,S]
        valid = cache.key_mask[:, None, None, : cache.length + 1]
        bias = torch.zeros(valid.shape, dtype=cache.data.dtype, device=tokens.device)
        bias = bias.masked_fill_(~valid, float("-inf"))
        cos, sin = self.cos[positions][:, None, None], self.sin[positions][:, None, None]  # [B,1,1,hd]

        hidden = self.model.model.embed_tokens(tokens)  # [B,H]
        for index, (layer, linears) in enumerate(zip(self.layers, self.linears)):
            qkv = linears["qkv"](layer.input_layernorm(hidden))
            q, k, v = qkv.split([self.q_width, self.kv_width, self.kv_width], dim=-1)
            # One new query per row: fold the query heads of a KV group into the "query length"
            # axis, [B, kv_heads, groups, hd], so attention needs no repeated keys.
            q = q.reshape(batch, self.num_kv_heads, groups, self.head_dim)
            k = k.reshape(batch, self.num_kv_heads, 1, self.head_dim)
            v = v.reshape(batch, self.num_kv_heads, 1, self.head_dim)
            q, k = self._qk_norm(layer.self_attn, q, k)
            keys, values = cache.write(index, _rope(k, cos, sin), v)
            # Plain matmul-softmax-matmul: for one query per row it is several times faster on
            # CPU than scaled_dot_product_attention, whose fixed cost dominates at this size.
            scores = torch.matmul(_rope(q, cos, sin) * self.scaling, keys.transpose(-1, -2))
            probs = torch.softmax(scores.add_(bias), dim=-1, dtype=torch.float32).to(values.dtype)
            out = torch.matmul(probs, values)
            hidden = hidden + linears["o"](out.reshape(batch, -1))
            hidden = hidden + self._mlp(linears, layer.post_attention_layernorm(hidden))
        cache.advance(1)
        return self._logits(hidden)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep these rows of the batch (repeats allowed: this also fans a prompt out to n samples)."""
        assert self.cache is not None, "prefill first"
        self.cache.keep(rows)

    def detach(self) -> StaticKVCache | None:
        cache, self.cache = self.cache, None
        return cache

    def join(self, states: list[StaticKVCache], room: int, num_positions: int) -> None:
        """See the module docstring and StaticKVCache.joined."""
        self.cache = StaticKVCache.joined(states, room)
        if self.cos is None or self.cos.shape[0] < num_positions:
            self._build_rope_table(num_positions, self.cache.data.dtype, self.cache.data.device)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _mlp(linears: dict[str, Linear], x: torch.Tensor) -> torch.Tensor:
        return linears["down"](linears["gate"](x) * linears["up"](x))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden))

    @staticmethod
    def _qk_norm(
        attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Qwen3 normalises each head of q and k before rotary; the others have no such modules.
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k

    def _build_rope_table(self, num_positions: int, dtype: torch.dtype, device: torch.device) -> None:
        positions = torch.arange(num_positions, device=device)[None]
        probe = torch.empty(0, dtype=dtype, device=device)
        cos, sin = self.model.model.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # [positions, hd]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, the same arithmetic as transformers' apply_rotary_pos_emb."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _pad_left(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zero-pad `x` on the left along `dim` to `width` (masked slots: zeros keep attention finite)."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)
