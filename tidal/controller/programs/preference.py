"""Offline preference training (DPO, SimPO, REDI): no generation and no reward. Each step takes a
batch of (prompt, chosen, rejected) pairs and moves the policy towards the chosen responses with
the loss `algorithm.preference.type` names:

    pairs <- the pair loader
    DPO only: reference log-probs of both responses (the frozen initial policy)
    actor.update_preference(pairs)

REDI has two stages: its first `algorithm.preference.sft_steps` steps are SFT on the chosen
responses (stage 1), the rest the REDI loss on both (stage 2).

Evaluation, whenever the loop evaluates: the loss, accuracy and margin on held-out pairs
(`val/preference/*`), and with the built-in task the greedy held-out accuracy (`val/reward`)
through the rollout, which then receives the weights after every step like in RL.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tidal.controller.loop import evaluate as evaluate_rollout
from tidal.controller.loop import run_steps
from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch

if TYPE_CHECKING:
    from tidal.controller.job import Job


def in_sft_stage(job: Job, step: int) -> bool:
    """REDI stage 1: the first `sft_steps` steps train on the chosen responses alone."""
    return step <= getattr(job.cfg.algorithm.preference, "sft_steps", 0)


def with_reference(job: Job, pairs: Batch) -> DistributedBatch:
    """The pairs, plus the reference's log-probs of both responses when the loss needs them."""
    batch = DistributedBatch.from_batch(pairs)
    if job.cfg.reference_enabled:
        batch = batch.union(job.cluster.reference.compute_pair_ref_log_probs(batch))
    return batch


def evaluate_pairs(job: Job) -> dict[str, float]:
    """Loss, accuracy and margin of the configured loss on the held-out pairs."""
    if job.data.val_pairs is None:
        return {}
    start = time.perf_counter()
    metrics = job.cluster.actor.evaluate_preference(with_reference(job, job.data.val_pairs))
    return metrics | {"perf/eval_pairs_s": time.perf_counter() - start}


def preference_step(job: Job, step: int) -> dict[str, float]:
    pairs = job.data.train_loader.next_batch()
    start = time.perf_counter()
    if in_sft_stage(job, step):
        metrics = job.cluster.actor.update_preference(pairs, sft=True)
    else:
        metrics = job.cluster.actor.update_preference(with_reference(job, pairs))
    metrics["perf/update_s"] = time.perf_counter() - start
    return metrics


def evaluate(job: Job) -> dict[str, float]:
    return evaluate_pairs(job) | evaluate_rollout(job)


def run_preference(job: Job) -> dict[str, float]:
    return run_steps(job, preference_step, evaluate)
