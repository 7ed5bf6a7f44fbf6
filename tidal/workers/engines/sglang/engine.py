"""SGLang as a rollout engine (GPU only): SGLang's offline Engine inside the rollout worker.

Token ids go in (`skip_tokenizer_init`: Tidal's tokenizer decodes), token ids and the sampled
tokens' log-probs come back. New weights go in memory through `update_weights_from_tensor`
(full Hugging Face-named tensors staged on this rank's GPU: the `hf` layout), and
`release_memory_occupation` / `resume_memory_occupation` free and restore the GPU memory around
training when the rollout shares the trainer's GPUs.

Importing this module does not import SGLang (it has no CPU build); building the engine does, and
the config refuses SGLang for a rollout pool without GPUs before any process starts.

Not built yet: continuous batching for streaming mode (SGLang batches continuously inside its
scheduler, but Tidal's step-wise ContinuousEngine over it, with abort/resume, is still to come);
`continuous` raises and names the backends that have it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

import torch

from tidal.config.rollout_backend import SGLangBackend
from tidal.config.schema import JobConfig, SamplingConfig
from tidal.workers.engines.base import (
    ContinuousEngine,
    Generation,
    RolloutEngine,
    generation_length,
    hf_parameter_shapes,
    hf_staging_tensors,
    one_request_per_sample,
    pack_responses,
)

if TYPE_CHECKING:
    from tidal.workers.context import WorkerContext

T = TypeVar("T")


class SGLangEngine(RolloutEngine):
    def __init__(
        self,
        model_path: str,
        backend: SGLangBackend,
        *,
        dtype: str = "bfloat16",
        device: str | torch.device = "cuda",
        context_length: int | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(
                f"rollout.backend.type=sglang runs on GPUs only, but this rollout worker's device is {self.device}; "
                "give the rollout pool GPUs or use rollout.backend.type=vllm / embedded"
            )
        import sglang  # GPU-only dependency: the `sglang` extra
        from transformers import AutoConfig

        self.backend = backend
        self.model_path = str(model_path)
        self.dtype = getattr(torch, dtype)
        self.llm = sglang.Engine(
            model_path=self.model_path,
            skip_tokenizer_init=True,
            dtype=dtype,
            tp_size=backend.tp_size,
            mem_fraction_static=backend.mem_fraction_static,
            max_running_requests=backend.max_running_requests,
            context_length=context_length,
            trust_remote_code=trust_remote_code,
            # release / resume_memory_occupation; weights backed up on the CPU so that a resume restores
            # them (a generation may follow without a weight load in between: held-out evaluation)
            enable_memory_saver=backend.enable_sleep_mode,
            enable_weights_cpu_backup=backend.enable_sleep_mode,
            random_seed=0,
        )
        self._load_tokens(self.model_path, trust_remote_code)
        hf_config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
        self.parameter_shapes = hf_parameter_shapes(hf_config)
        self._asleep = False

    @classmethod
    def from_config(cls, cfg: JobConfig, ctx: WorkerContext) -> SGLangEngine:
        backend = cfg.rollout.backend
        assert isinstance(backend, SGLangBackend)
        return cls(
            cfg.model.path,
            backend,
            dtype=cfg.model.dtype,
            device=ctx.device,
            context_length=generation_length(cfg),
            trust_remote_code=cfg.model.trust_remote_code,
        )

    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        stop_token_ids: Sequence[int],
        seed: int | None = None,
        num_samples: int = 1,
    ) -> Generation:
        requests = one_request_per_sample(prompt_ids, prompt_mask, num_samples, seed)
        self.wake()
        inputs = [tokens for tokens, _ in requests]
        params = [
            {
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "top_k": sampling.top_k if sampling.top_k > 0 else -1,
                "max_new_tokens": sampling.max_new_tokens,
                "stop_token_ids": sorted(set(stop_token_ids)),
                **({} if sample is None else {"sampling_seed": sample % (1 << 31)}),
            }
            for _, sample in requests
        ]
        if not inputs:
            return pack_responses([], [], self.pad_token_id)
        outputs = self.llm.generate(input_ids=inputs, sampling_params=params, return_logprob=True)
        ids = [list(out["output_ids"]) for out in outputs]
        log_probs = [[float(entry[0]) for entry in out["meta_info"]["output_token_logprobs"]] for out in outputs]
        return pack_responses(ids, log_probs, self.pad_token_id)

    def continuous(self, version: int) -> ContinuousEngine:
        raise NotImplementedError(
            "rollout.backend.type=sglang has no continuous batching for trainer.mode=streaming yet; use "
            "rollout.backend.type=vllm or embedded for streaming, or trainer.mode=sync with SGLang"
        )

    def write_weights(self, write: Callable[[dict[str, torch.Tensor]], T]) -> T:
        staging = hf_staging_tensors(self.parameter_shapes, self.dtype, self.device)  # freed after the sync
        result = write(staging)
        self._update(list(staging.items()))
        return result

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        items = [(name, tensor.detach().to(self.device)) for name, tensor in named_tensors]
        self._update(items)
        return len(items)

    def _update(self, items: list[tuple[str, torch.Tensor]]) -> None:
        self.wake()
        self.llm.update_weights_from_tensor(named_tensors=items, flush_cache=True)

    def sleep(self) -> None:
        if self.backend.enable_sleep_mode and not self._asleep:
            self.llm.release_memory_occupation()
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self.llm.resume_memory_occupation()
            self._asleep = False

    def close(self) -> None:
        self.llm.shutdown()
