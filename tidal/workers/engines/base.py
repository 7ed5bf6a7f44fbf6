"""The swap points: what a role asks of its engine.

A training role (actor, critic, reference) builds its engine through the TRAIN_ENGINES registry
(`actor.backend`: fsdp2 today, Megatron-core next) from a `TrainSpec` and then speaks only the
`TrainEngine` interface: forward passes (`infer`), optimizer steps over mini-batches (`train`),
collectives on scalars, its weights as a resharding source, checkpoints.

A rollout role builds its engine from its config through the ROLLOUT_ENGINES registry
(`rollout.backend.type`: embedded, vllm, sglang) and then speaks only this interface:

- `generate`: one-shot batched sampling (the sync loop, held-out evaluation);
- `continuous`: a scheduler for the streaming loop: requests join and leave the running batch
  one token at a time, in-flight requests can be aborted and resumed under new weights, and every
  token records the weights version that sampled it (`ContinuousEngine`);
- weights: `weight_layout` says which layout the resharder writes into, `write_weights` lets it
  fill the engine's tensors in place, `load_weights` takes full named tensors;
- `sleep` / `wake`: give generation memory back while the trainer runs (GPU engines).

Every engine returns the same columns for the same SamplingConfig (token ids, masks, the
behaviour log-prob of each sampled token: log_softmax(logits / temperature) over the whole
vocabulary, see embedded/sampling.py), so the rest of Tidal never knows which one ran. (vLLM
renormalises its log-probs over the tokens top-k / top-p keep, so the config refuses those with it.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeVar

import numpy as np
import torch

from tidal.config.schema import ModelConfig, OptimConfig, SamplingConfig
from tidal.resharding.layout import ParallelLayout

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tidal.config.schema import JobConfig
    from tidal.resharding.sync import WeightSource
    from tidal.workers.context import WorkerContext
    from tidal.workers.engines.requests import GroupResult, Request, StragglerPolicy

T = TypeVar("T")


# ------------------------------------------------------------------------------------ training

ModelKind = Literal["policy", "value", "frozen_policy"]


@dataclass(frozen=True)
class TrainSpec:
    """What a training role asks its engine to build and run."""

    kind: ModelKind  # policy: a causal LM that trains; value: backbone + value head; frozen_policy: no optimizer
    model: ModelConfig
    optim: OptimConfig | None = None  # None: inference only
    total_steps: int = 0  # optimizer steps of the whole run (the learning-rate schedule)
    gradient_checkpointing: bool = False
    seed: int = 0  # initialises what the pretrained model lacks (the value head)


LossFn = Callable[[list[Any], dict[str, torch.Tensor], Any], tuple[torch.Tensor, dict[str, float], dict[str, float]]]


class TrainEngine(ABC):
    """A sharded model that trains and scores, one per training worker."""

    device: torch.device

    @classmethod
    @abstractmethod
    def for_role(cls, spec: TrainSpec, ctx: WorkerContext) -> TrainEngine:
        """Load `spec.model` for `spec.kind` and shard it over the worker group."""

    @abstractmethod
    def infer(self, columns: dict[str, torch.Tensor], micro_batch_size: int, **forward_kwargs: Any) -> list[Any]:
        """Forward over this rank's samples in micro-batches; each output as [n, R] float32 on CPU."""

    @abstractmethod
    def train(
        self,
        columns: dict[str, torch.Tensor],
        *,
        num_mini_batches: int,
        micro_batch_size: int,
        epochs: int,
        loss_fn: LossFn,
        count_masks: tuple[str, ...] = (),
        **forward_kwargs: Any,
    ) -> dict[str, float]:
        """`epochs` passes over this rank's share, one optimizer step per mini-batch; metrics are
        identical on every rank (see FSDPEngine.train for the loss_fn contract)."""

    @abstractmethod
    def all_reduce(self, values: list[float], op: Any = None) -> list[float]:
        """Reduce scalars over the group (sum unless `op` says otherwise)."""

    @abstractmethod
    def weight_source(self) -> WeightSource:
        """This rank's shards of the policy, Hugging Face-named, as a resharding source (no copy)."""

    @abstractmethod
    def full_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) one at a time; a collective every rank consumes in the same order."""

    @abstractmethod
    def save_checkpoint(self, path: str) -> None: ...

    @abstractmethod
    def load_checkpoint(self, path: str) -> None: ...


# ------------------------------------------------------------------------------------ generation


class Generation(NamedTuple):
    response_ids: torch.Tensor  # [N,R] int64, right-padded with the pad id
    response_mask: torch.Tensor  # [N,R] int64, 1 for generated tokens (stop token included)
    log_probs: torch.Tensor  # [N,R] float32, log p of each sampled token under the sampling policy


def pack_responses(ids: list[list[int]], log_probs: list[list[float]], pad_id: int) -> Generation:
    """Right-padded [N,R] tensors of per-sample token ids and log-probs, R the longest response."""
    width = max((len(row) for row in ids), default=0)
    out = Generation(
        torch.full((len(ids), width), pad_id, dtype=torch.long),
        torch.zeros(len(ids), width, dtype=torch.long),
        torch.zeros(len(ids), width, dtype=torch.float32),
    )
    for row, (tokens, values) in enumerate(zip(ids, log_probs)):
        out.response_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        out.response_mask[row, : len(tokens)] = 1
        out.log_probs[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


def hf_parameter_shapes(hf_config: Any) -> dict[str, torch.Size]:
    """Hugging Face parameter names and shapes of the model `hf_config` describes (tied weights once,
    under their first name, as `named_parameters` lists them), without allocating it."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    return {name: p.shape for name, p in skeleton.named_parameters()}


def hf_staging_tensors(shapes: dict[str, torch.Size], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Empty full tensors by Hugging Face name: where an engine that cannot be written in place
    receives new weights before loading them its own way (allocated per sync, freed after)."""
    return {name: torch.empty(shape, dtype=dtype, device=device) for name, shape in shapes.items()}


def one_request_per_sample(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, num_samples: int, seed: int | None
) -> list[tuple[list[int], int | None]]:
    """(prompt tokens, seed) of every sample of left-padded prompts [N,P], prompt by prompt, for
    engines that run each sample as its own seeded request."""
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} must be >= 1")
    if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(
            f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} must both be [N,P]"
        )
    requests = []
    for row in range(prompt_ids.shape[0]):
        tokens = prompt_ids[row][prompt_mask[row].bool()].tolist()
        if not tokens:
            raise ValueError(f"prompt row {row} has no tokens (prompt_mask is all 0)")
        requests += [(tokens, None if seed is None else sample_seed(seed, row, j)) for j in range(num_samples)]
    return requests


def sample_seed(seed: int, *path: int) -> int:
    """A 63-bit seed for one sample, from the call's seed and the sample's place (row, sample ...):
    engines that seed each sample apart make a sample independent of its neighbours in the batch."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ContinuousEngine(Protocol):
    """A running batch that requests join and leave token by token (streaming mode).

    Single-threaded: one thread (engines/streaming.py) calls everything but `check`. `version` is
    the weights version stamped on the tokens sampled next.
    """

    version: int
    num_generated_tokens: int

    @property
    def num_queued(self) -> int: ...

    @property
    def num_running(self) -> int:
        """Sequences in the running batch."""
        ...

    def pending_ids(self) -> list[Hashable]:
        """Request ids not finished: queued, then running."""
        ...

    def check(self, request: Request) -> None:
        """Raise ValueError if `request` can never run here (reads no state: any thread may call it)."""
        ...

    def submit(self, request: Request) -> None: ...

    def step(self, admit: bool = True) -> list[GroupResult]:
        """Admit queued requests (unless `admit` is False), advance every running sequence by one
        decode step, and return the requests that completed."""
        ...

    def expire(self, timeout_s: float, policy: StragglerPolicy) -> list[GroupResult]:
        """End every request running longer than `timeout_s` (truncate or drop)."""
        ...

    def rebuild(self) -> None:
        """Continue every in-flight sequence under the weights just written: the tokens it has stay,
        the next ones come from the new weights (abort + resume with prompt + partial response)."""
        ...

    def close(self) -> None:
        """Release what the engine still holds for these requests (the stream stopped)."""
        ...


class RolloutEngine(ABC):
    """A generation backend of the rollout role (one per rollout worker)."""

    device: torch.device
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: list[int]  # the model's own stop set (tokenizer EOS + generation config)
    pad_token_id: int

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: JobConfig, ctx: WorkerContext) -> RolloutEngine:
        """Build the engine the job's `rollout` section describes, on this worker's device."""

    @abstractmethod
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        stop_token_ids: Sequence[int],
        seed: int | None = None,
        num_samples: int = 1,
    ) -> Generation:
        """Sample `num_samples` responses for each row of the left-padded prompts [N,P].

        Rows come out interleaved (prompt 0's samples, then prompt 1's ...). `stop_token_ids` is
        the complete stop set and the stop token is part of the response. `seed` makes the draws
        reproducible (None: the engine's own random state); `sampling.n` is not read.
        """

    @abstractmethod
    def continuous(self, version: int) -> ContinuousEngine:
        """A continuous-batching scheduler over this engine, stamping tokens with `version`."""

    # ------------------------------------------------------------------ weights

    def weight_layout(self, num_ranks: int) -> ParallelLayout:
        """The layout `write_weights` exposes over the pool's `num_ranks` ranks: by default a full
        replica per rank (a tensor-parallel vLLM engine's loaders then take each rank's shard)."""
        return ParallelLayout.hf(dp=num_ranks)

    @abstractmethod
    def write_weights(self, write: Callable[[dict[str, torch.Tensor]], T]) -> T:
        """Let `write` fill the engine's weight tensors in place, by Hugging Face name and in
        `weight_layout`, then serve them; returns what `write` returns."""

    @abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy full Hugging Face-named tensors in (a partial set is fine); returns how many."""

    # ------------------------------------------------------------------ memory

    def sleep(self) -> None:
        """Free generation memory (KV cache, weights) while the trainer runs; no-op where unsupported."""
        return None

    def wake(self) -> None:
        """Undo `sleep` before generating."""
        return None

    def close(self) -> None:
        """Release what the engine holds outside Python's reach (threads, device memory)."""
        return None

    def _load_tokens(self, model_path: str, trust_remote_code: bool) -> None:
        """Tidal's tokenizer for the model, its stop set (tokenizer EOS + generation config) and pad id:
        the same for every engine, so they stop on the same tokens."""
        from transformers import GenerationConfig

        from tidal.dataflow.tokenizer import eos_token_ids, load_tokenizer, pad_token_id

        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        try:
            generation_config: Any = GenerationConfig.from_pretrained(model_path)
        except OSError:  # no generation_config.json: the tokenizer's EOS alone
            generation_config = None
        self.eos_token_ids = eos_token_ids(self.tokenizer, generation_config)
        self.pad_token_id = pad_token_id(self.tokenizer, self.eos_token_ids)


def generation_length(cfg: JobConfig) -> int:
    """The longest prompt + response the job generates (training or held-out sampling)."""
    longest = max(cfg.rollout.sampling.max_new_tokens, cfg.rollout.val_sampling.max_new_tokens)
    return cfg.data.max_prompt_length + longest
