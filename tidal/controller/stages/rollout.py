"""The rollout's stages: generate responses to prompts, and the held-out evaluation."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from tidal.config.schema import JobConfig, SamplingConfig
from tidal.controller.stages.base import Stage
from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch

if TYPE_CHECKING:
    from tidal.controller.cluster import Cluster
    from tidal.controller.stages.scoring import Score


def generation_seed(cfg: JobConfig, step: int, attempt: int = 0) -> int:
    """The seed of a step's `attempt`-th generation round (dynamic sampling runs several)."""
    return cfg.trainer.seed * 100_003 + step + attempt * 1_000_003


class Generate(Stage):
    """prompts x n -> responses, response masks, behaviour log-probs and the policy version."""

    name = "generate"
    reads = ("prompt_ids", "prompt_mask")
    writes = ("response_ids", "response_mask", "rollout_log_probs", "policy_version", "response_text")

    def __init__(self, cfg: JobConfig, cluster: Cluster):
        self.cfg, self.cluster = cfg, cluster

    def __call__(
        self,
        prompts: Batch,
        step: int,
        version: int,
        attempt: int = 0,
        sampling: SamplingConfig | None = None,
        seed: int | None = None,
    ) -> DistributedBatch:
        """`version` stamps the samples (the weights the rollout holds). The data's reference
        responses (PAR baseline=data) stay with the prompts: every sample would otherwise carry
        its prompt's copy through the step."""
        if "reference_responses" in prompts:
            prompts = prompts.select(*(key for key in prompts.keys() if key != "reference_responses"))
        seed = generation_seed(self.cfg, step, attempt) if seed is None else seed
        return self.cluster.rollout.generate(prompts, sampling=sampling, seed=seed, policy_version=version)


class Evaluate(Stage):
    """Held-out reward with the validation sampling settings (greedy by default)."""

    name = "evaluate"
    reads = Generate.reads

    def __init__(self, cfg: JobConfig, generate: Generate, score: Score, val_prompts: Batch | None):
        self.cfg, self.generate, self.score, self.val_prompts = cfg, generate, score, val_prompts

    def __call__(self, version: int) -> dict[str, Any]:
        if self.val_prompts is None:
            return {}
        start = time.perf_counter()
        batch = self.generate(self.val_prompts, 0, version, sampling=self.cfg.rollout.val_sampling, seed=0)
        _, metrics, _ = self.score(batch)  # failed rewards are counted, never a reason to stop
        return {
            "val/reward": metrics["reward/mean"],
            "val/reward_errors": metrics["reward/num_errors"],
            "perf/eval_s": time.perf_counter() - start,
        }
