"""The rollout role: turns prompts into sampled responses with the embedded engine.

Each data-parallel rank generates for its own share of the prompts. Randomness comes from a
torch.Generator seeded from (seed, dp_rank), so a step's rollouts are reproducible for a fixed
seed and worker layout. Weights arrive in-process from the colocated actor through
`load_weights`, resharded from the actor's shards (tidal/resharding/sync.py); every sample is
stamped with the version of the weights that produced it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from tidal.config.schema import JobConfig, SamplingConfig
from tidal.dataflow.batch import Batch
from tidal.resharding.executor import SyncStats
from tidal.resharding.layout import ParallelLayout
from tidal.resharding.spec import TensorSpec
from tidal.resharding.sync import Resharder, WeightSource, WeightTarget
from tidal.workers.context import WorkerContext
from tidal.workers.endpoint import Dispatch, endpoint
from tidal.workers.engines.embedded.engine import EmbeddedEngine

PROMPT_COLUMNS = ("prompt_ids", "prompt_mask")


class RolloutRole:
    def __init__(self, cfg: JobConfig, ctx: WorkerContext) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.engine = EmbeddedEngine(
            cfg.model.path,
            dtype=cfg.model.dtype,
            device=ctx.device,
            max_batch_size=cfg.rollout.max_batch_size,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        self.stop_token_ids = sorted(set(self.engine.eos_token_ids) | set(cfg.rollout.stop_token_ids))
        self.weights_version = 0
        # Plans and executors are kept across steps; built at the first sync (a collective).
        sync = cfg.rollout.weight_sync
        self.resharder = Resharder(bucket_bytes=int(sync.bucket_mb * (1 << 20)), verify=sync.verify)

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
        generator = torch.Generator(device=self.engine.device).manual_seed(_rank_seed(seed, self.ctx.dp_rank))
        out = self.engine.generate(
            batch["prompt_ids"],
            batch["prompt_mask"],
            sampling,
            self.stop_token_ids,
            generator,
            num_samples=sampling.n,
        )
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
        if isinstance(weights, WeightSource):
            stats = self.engine.load_weights_in_place(
                lambda params: self.resharder.sync(weights, self._target(params))
            )
        else:
            self.engine.load_weights(weights)
        self.weights_version = version
        return stats

    def _target(self, params: dict[str, torch.Tensor]) -> WeightTarget:
        """The embedded engine holds a full replica on every rank: the `hf` layout, dp = ranks."""
        return WeightTarget(
            TensorSpec.of(params), ParallelLayout.hf(dp=self.ctx.dp_size), self.ctx.dp_rank, params
        )


def _pad_right(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    if x.shape[1] >= width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def _rank_seed(seed: int, dp_rank: int) -> int:
    """A 63-bit seed mixing the step seed and the rank, so ranks never share a random stream."""
    return int(np.random.SeedSequence([seed, dp_rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
