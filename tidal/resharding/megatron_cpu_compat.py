"""Shims that let megatron-core 0.16 build and run a GPTModel on a CPU-only torch (tests, CI).

megatron-core assumes CUDA in three places a CPU run reaches:
- `torch.cuda.current_device()` as a device argument (RoPE's `inv_freq.to(...)`, buffers),
- the CUDA RNG tracker that `model_parallel_cuda_manual_seed` sets up for dropout and init,
- `get_default_causal_mask`, which builds the causal mask on "cuda" when no mask is passed.

The first two are patched here; for the third, pass an explicit mask (`causal_mask`) to the model.
Nothing here is used on a GPU machine: `apply_cpu_shims` refuses to run where CUDA is available,
so a GPU job cannot pick up the patched `current_device` by accident.
"""

from __future__ import annotations

import torch

_applied = False


def apply_cpu_shims() -> None:
    """Patch this process for megatron-core on CPU (idempotent). Call before building the model."""
    global _applied
    if _applied:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "apply_cpu_shims() is for CPU-only runs; this process sees a CUDA device, where "
            "megatron-core needs no shim (use the NCCL backend and the real CUDA RNG tracker)"
        )
    from megatron.core import tensor_parallel

    # Megatron passes current_device() to `.to(...)` / `device=`; "cpu" is a valid answer there.
    torch.cuda.current_device = lambda: "cpu"
    # The inference tracker forks no CUDA RNG state (dropout is off in the tests that use this).
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    _applied = True


def causal_mask(seq_len: int) -> torch.Tensor:
    """Megatron's attention mask for causal attention: [1, 1, s, s] bool, True where masked out."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool).triu(diagonal=1)[None, None]
