"""The rollout role: turns prompts into sampled responses with the engine its config names.

The engine (`rollout.backend.type`: embedded, vllm, sglang) is built through the ROLLOUT_ENGINES
registry and reached only through the RolloutEngine interface (engines/base.py). Each
data-parallel rank generates for its own share of the prompts. Randomness comes from a seed
derived from (seed, dp_rank), so a step's rollouts are reproducible for a fixed seed and worker
layout. Weights arrive in-process from the colocated actor through `load_weights`, resharded from
the actor's shards (tidal/resharding/sync.py) into the engine's `weight_layout`; every sample is
stamped with the version of the weights that produced it.

Streaming mode (trainer.mode=streaming, the rollout on its own pool): `stream_start` starts a
background generator (the engine's continuous batching, driven by engines/streaming.py) on every rank,
`stream_submit` queues prompt groups, finished groups go from this worker straight into the
StreamStore, `stream_poll` reports what finished (metadata only) and `stream_stop` returns what did
not. A weight update (`write_weights` from the cross-pool sync, or `load_weights`) pauses the
generator at a token boundary, or lets it finish its in-flight sequences first
(trainer.streaming.interrupt_on_sync=false), and resumes it under the new weights: every token
records the version that sampled it (`token_versions`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from tidal.config.schema import JobConfig, SamplingConfig
from tidal.config.streaming import StreamingConfig
from tidal.dataflow.batch import Batch
from tidal.registry import ROLLOUT_ENGINES
from tidal.resharding.executor import SyncStats
from tidal.resharding.layout import ParallelLayout
from tidal.resharding.spec import TensorSpec
from tidal.resharding.sync import Resharder, WeightSource, WeightTarget
from tidal.workers.context import WorkerContext
from tidal.workers.endpoint import Collect, Dispatch, endpoint
from tidal.workers.engines.base import RolloutEngine
from tidal.workers.engines.requests import GroupResult, Request
from tidal.workers.engines.streaming import StreamingGenerator

if TYPE_CHECKING:
    from tidal.dataflow.store import StreamStore

PROMPT_COLUMNS = ("prompt_ids", "prompt_mask")
STREAM_COLUMNS = ("prompt_ids", "prompt_mask", "uid", "seed")
T = TypeVar("T")


class RolloutRole:
    def __init__(self, cfg: JobConfig, ctx: WorkerContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.engine: RolloutEngine = ROLLOUT_ENGINES.get(cfg.rollout.backend.type).from_config(cfg, ctx)
        self.stop_token_ids = sorted(set(self.engine.eos_token_ids) | set(cfg.rollout.stop_token_ids))
        self.weights_version = 0
        # Plans and executors are kept across steps; built at the first sync (a collective).
        sync = cfg.rollout.weight_sync
        self.resharder = Resharder(bucket_bytes=int(sync.bucket_mb * (1 << 20)), verify=sync.verify)
        self.name = f"rollout rank {ctx.rank}"
        self.streaming: StreamingGenerator | None = None
        self.stream_settings: StreamingConfig | None = None

    @endpoint(Dispatch.DP_SPLIT)
    def generate(
        self,
        batch: Batch,
        sampling: SamplingConfig | None = None,
        seed: int = 0,
        policy_version: int | None = None,
    ) -> Batch:
        """Sample `sampling.n` responses per prompt row.

        Returns n x len(batch) rows, the samples of one prompt adjacent (a a b b), holding every
        input column (repeated) plus response_ids, response_mask, rollout_log_probs,
        policy_version and response_text. sampling defaults to cfg.rollout.sampling;
        policy_version defaults to the version of the weights last loaded.
        """
        missing = [key for key in PROMPT_COLUMNS if key not in batch]
        if missing:
            raise ValueError(f"rollout.generate needs batch columns {missing}; the batch has {batch.keys()}")
        if seed < 0:
            raise ValueError(f"rollout.generate seed={seed} must be >= 0")
        sampling = self.cfg.rollout.sampling if sampling is None else sampling
        version = self.weights_version if policy_version is None else policy_version
        with self._paused(drain=False):  # a running stream generator shares the engine's cache
            out = self.engine.generate(
                batch["prompt_ids"],
                batch["prompt_mask"],
                sampling,
                self.stop_token_ids,
                _rank_seed(seed, self.ctx.dp_rank),
                num_samples=sampling.n,
            )
        if self.cfg.trainer.mode == "sync":
            # The trainer runs next: an engine that can free its memory meanwhile does (vLLM's sleep
            # mode on GPU, rollout.backend.enable_sleep_mode); the next weight load or generate wakes it.
            self.engine.sleep()
        # Every rank returns R = max_new_tokens columns, so shards of different ranks concatenate.
        width = sampling.max_new_tokens
        response_ids = _pad_right(out.response_ids, width, self.engine.pad_token_id)
        response_mask = _pad_right(out.response_mask, width, 0)
        log_probs = _pad_right(out.log_probs, width, 0.0)
        lengths = response_mask.sum(-1).tolist()
        rows = [ids[:length] for ids, length in zip(response_ids.tolist(), lengths)]
        # (batch_decode of no rows returns [''], not [])
        texts = self.engine.tokenizer.batch_decode(rows, skip_special_tokens=True) if rows else []
        responses = Batch.from_dict(
            {
                "response_ids": response_ids,
                "response_mask": response_mask,
                "rollout_log_probs": log_probs,
                "policy_version": torch.full((len(lengths),), version, dtype=torch.long),
            },
            non_tensors={"response_text": texts},
        )
        return batch.repeat(sampling.n, interleave=True).union(responses)

    def load_weights(
        self, weights: WeightSource | Iterable[tuple[str, torch.Tensor]], version: int
    ) -> SyncStats | None:
        """In-process weight sync from the colocated trainer; the engine serves `version` next.

        A `WeightSource` (the trainer's shards) goes through this rank's resharder straight into
        the engine's parameters (every rank of the pool calls this at once); (name, full tensor)
        pairs are copied in. Returns the resharder's SyncStats, or None for full tensors.
        """
        stats = None
        with self._paused():
            if isinstance(weights, WeightSource):
                stats = self.engine.write_weights(
                    lambda params: self.resharder.sync(weights, self._target(params))
                )
            else:
                self.engine.load_weights(weights)
            self.weights_version = version
        return stats

    def write_weights(self, write: Callable[[dict[str, torch.Tensor]], T], version: int) -> T:
        """Let `write` fill the engine's parameters in place (by HF name) and serve `version` next;
        returns what `write` returns. A running stream generator is paused (or drained, per
        trainer.streaming.interrupt_on_sync) around the write and resumes under the new weights."""
        with self._paused():
            result = self.engine.write_weights(write)
            self.weights_version = version
        return result

    # ------------------------------------------------------------------ streaming

    @endpoint(Dispatch.ALL)
    def stream_start(self, store: StreamStore, settings: StreamingConfig) -> None:
        """Start this rank's background generator; finished groups go from here into `store`."""
        if self.streaming is not None and self.streaming.running:
            raise RuntimeError(
                f"{self.name}: a streaming generator is already running; call stream_stop first"
            )
        self.stream_settings = settings
        self.streaming = StreamingGenerator(
            self.engine.continuous(self.weights_version),
            lambda result: self._store_group(store, settings, result),
            name=self.name,
            group_timeout_s=settings.group_timeout_s,
            straggler_policy=settings.straggler_policy,
            device=self.engine.device,
        ).start()

    @endpoint(Dispatch.DP_SPLIT, collect=Collect.LIST)
    def stream_submit(self, batch: Batch) -> int:
        """Queue one group of rollout.sampling.n samples per row; returns how many groups this rank took.

        Columns: prompt_ids and prompt_mask (left-padded), uid (unique per request), seed (per row:
        seeds that request's sampling, whichever rank runs it); every column is carried into the samples.
        """
        missing = [key for key in STREAM_COLUMNS if key not in batch]
        if missing:
            raise ValueError(
                f"rollout.stream_submit needs batch columns {missing}; the batch has {batch.keys()}"
            )
        generator = self._generator()
        sampling = self.cfg.rollout.sampling
        longest, limit = (
            int(batch["prompt_mask"].sum(-1).max()) if len(batch) else 0,
            self.cfg.data.max_prompt_length,
        )
        if longest > limit:
            raise ValueError(
                f"rollout.stream_submit: a prompt has {longest} tokens, more than data.max_prompt_length={limit} "
                "(stored prompts are padded to that width so groups concatenate); filter or raise the limit"
            )
        requests = []
        for row in range(len(batch)):
            seed = int(batch["seed"][row])
            if seed < 0:
                raise ValueError(f"rollout.stream_submit: row {row} has seed={seed}; seeds must be >= 0")
            requests.append(
                Request(
                    rid=str(batch["uid"][row]),
                    prompt_ids=batch["prompt_ids"][row][batch["prompt_mask"][row].bool()],
                    num_samples=sampling.n,
                    sampling=sampling,
                    stop_token_ids=self.stop_token_ids,
                    seed=_request_seed(seed),
                    payload=batch.slice(row, row + 1),
                )
            )
        generator.submit(requests)
        return len(requests)

    @endpoint(Dispatch.ALL, collect=Collect.LIST)
    def stream_poll(self) -> dict[str, Any]:
        """Groups finished since the last poll, [(uid, num_samples_stored, status, min_version,
        num_response_tokens)] under "finished", plus cumulative stats and this rank. Metadata only.
        Re-raises (naming this rank) any error of the background generator."""
        return {"rank": self.ctx.rank, **self._generator(running=False).poll()}

    @endpoint(Dispatch.ALL, collect=Collect.LIST)
    def stream_stop(self) -> list[str]:
        """Stop the generator (finished groups are stored first); returns the uids not finished
        (queued or running) for the driver to issue again. A poll after this reports the last groups."""
        if self.streaming is None:
            return []
        assert self.stream_settings is not None
        return [str(uid) for uid in self.streaming.stop(self.stream_settings.wait_timeout_s)]

    def _generator(self, running: bool = True) -> StreamingGenerator:
        if self.streaming is None or (running and not self.streaming.running):
            if self.streaming is not None:
                self.streaming.poll()  # a generator that died raises its error here
            raise RuntimeError(f"{self.name}: no streaming generator is running; call stream_start first")
        return self.streaming

    @contextmanager
    def _paused(self, drain: bool | None = None) -> Iterator[None]:
        """Hold a running stream generator at a token boundary (drain: after its in-flight sequences
        end; default: per interrupt_on_sync); on exit it re-prefills them and continues."""
        generator = self.streaming
        if generator is None or not generator.running:
            yield
            return
        assert self.stream_settings is not None
        if drain is None:
            drain = not self.stream_settings.interrupt_on_sync
        generator.pause(drain=drain, timeout_s=self.stream_settings.wait_timeout_s)
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)  # the parked loop's last kernels are done
        try:
            yield
        finally:
            generator.resume(version=self.weights_version, rebuild=True)

    def _store_group(self, store: StreamStore, settings: StreamingConfig, result: GroupResult) -> None:
        """Runs on the generator's delivery thread: one finished group into the store."""
        n = len(result.response_ids)
        out = result.tensors(self.cfg.rollout.sampling.max_new_tokens, self.engine.pad_token_id)
        versions = [min(v) if v else result.version_at_finish for v in result.versions]
        texts = self.engine.tokenizer.batch_decode(result.response_ids, skip_special_tokens=True)
        responses = Batch.from_dict(
            {
                "response_ids": out["response_ids"],
                "response_mask": out["response_mask"],
                "rollout_log_probs": out["log_probs"],
                "policy_version": torch.tensor(versions, dtype=torch.long),
                "token_versions": out["token_versions"],
                "truncated": out["truncated"],
            },
            non_tensors={"response_text": texts},
        )
        prompts = _pad_prompts(
            result.request.payload, self.cfg.data.max_prompt_length, self.engine.pad_token_id
        )
        columns = prompts.repeat(n, interleave=True).union(responses)
        uid = result.request.rid
        store.put(
            [f"{uid}/{j}" for j in range(n)],
            columns,
            groups=[uid] * n,
            group_size=n,
            lengths=(columns["prompt_mask"].sum(-1) + columns["response_mask"].sum(-1)).tolist(),
            versions=versions,
            producer=self.name,
            timeout_s=settings.wait_timeout_s,
        )

    def weight_layout(self) -> ParallelLayout:
        """The layout the engine's weights take over this pool's ranks (what a resharder writes into);
        each rank receives its own share (with a tensor-parallel engine too: its loaders split)."""
        return self.engine.weight_layout(self.ctx.world_size)

    def _target(self, params: dict[str, torch.Tensor]) -> WeightTarget:
        """This rank's share of the engine's weight layout, as the resharder writes into it."""
        return WeightTarget(TensorSpec.of(params), self.weight_layout(), self.ctx.rank, params)


def _pad_right(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    if x.shape[1] >= width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def _pad_prompts(batch: Batch, width: int, pad_token_id: int) -> Batch:
    """Left-padded prompt_ids/prompt_mask of exactly `width` columns (no real token is cut: checked at
    submit), so groups from different submits concatenate."""
    missing = width - batch["prompt_ids"].shape[1]
    if missing == 0:
        return batch
    out = batch.select(*batch.keys())
    if missing < 0:  # only padding columns go
        out["prompt_ids"], out["prompt_mask"] = (
            batch["prompt_ids"][:, -width:],
            batch["prompt_mask"][:, -width:],
        )
        return out
    out["prompt_ids"] = torch.nn.functional.pad(batch["prompt_ids"], (missing, 0), value=pad_token_id)
    out["prompt_mask"] = torch.nn.functional.pad(batch["prompt_mask"], (missing, 0), value=0)
    return out


def _request_seed(seed: int) -> int:
    """A 63-bit seed for one streaming request: its row seed only, so the rank running it does not matter."""
    return int(np.random.SeedSequence([seed]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _rank_seed(seed: int, dp_rank: int) -> int:
    """A 63-bit seed mixing the step seed and the rank, so ranks never share a random stream."""
    return int(np.random.SeedSequence([seed, dp_rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
