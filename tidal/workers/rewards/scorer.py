"""Score a batch with a rule reward function, locally or as parallel Ray tasks.

Failures are per sample: a function that raises gives that sample reward 0 and a `reward_error`
("ExcType: message"), and a chunk of samples that runs past `reward.timeout_s` is scored 0 with
reward_error "timeout". Both are counted in the metrics and the run goes on, because one odd
response must not end a long training run.
"""

from __future__ import annotations

import math
import time

import ray
import torch

from tidal.config.schema import RewardConfig
from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch
from tidal.workers.rewards.registry import REWARD_FUNCTIONS, RewardFn

INPUT_COLUMNS = ("prompt_text", "response_text", "ground_truth", "response_mask")
# Rule rewards are light; a small CPU share lets them run beside the worker actors that hold the
# cluster's whole CPUs.
TASK_NUM_CPUS = 0.25


def token_rewards_at_last_token(seq_reward: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[N,R]: each sample's reward on its last real response token, zeros elsewhere.

    A response with no real token (an empty generation) has nowhere to carry its reward and gets a
    row of zeros; its `seq_reward` still holds the value.
    """
    mask = response_mask.bool()
    num_cols = mask.shape[1]
    last = num_cols - 1 - mask.flip(dims=[1]).to(torch.int64).argmax(dim=1)
    out = torch.zeros(mask.shape, dtype=torch.float32)
    rows = torch.nonzero(mask.any(dim=1)).squeeze(1)
    out[rows, last[rows]] = seq_reward[rows].to(torch.float32)
    return out


def _resolve(fn: str | RewardFn) -> RewardFn:
    return REWARD_FUNCTIONS.get(fn) if isinstance(fn, str) else fn


def score_batch(batch: Batch, fn: str | RewardFn) -> tuple[Batch, dict[str, float]]:
    """Reward every sample; returns the new columns (seq_reward, token_rewards, reward_error) and
    metrics reward/mean, reward/num_errors. `fn` is a registry name or the function itself."""
    reward_fn = _resolve(fn)
    rewards: list[float] = []
    errors: list[str | None] = []
    for prompt, response, truth in zip(batch["prompt_text"], batch["response_text"], batch["ground_truth"]):
        try:
            value = float(reward_fn(prompt, response, truth))
            if not math.isfinite(value):
                raise ValueError(f"reward function returned {value}")
        except Exception as err:  # noqa: BLE001 - one bad sample must not stop the run
            rewards.append(0.0)
            errors.append(f"{type(err).__name__}: {err}")
        else:
            rewards.append(value)
            errors.append(None)
    seq_reward = torch.tensor(rewards, dtype=torch.float32)
    out = Batch.from_dict(
        {
            "seq_reward": seq_reward,
            "token_rewards": token_rewards_at_last_token(seq_reward, batch["response_mask"]),
        },
        {"reward_error": errors},
    )
    num_errors = sum(e is not None for e in errors)
    mean = float(seq_reward.mean()) if len(rewards) else 0.0
    return out, {"reward/mean": mean, "reward/num_errors": float(num_errors)}


@ray.remote(num_cpus=TASK_NUM_CPUS, num_returns=2, max_retries=0)
def _score_rows(source: DistributedBatch, start: int, stop: int, fn: str | RewardFn) -> tuple[Batch, dict]:
    return score_batch(source.materialize(start, stop), fn)


def _timed_out_rows(source: DistributedBatch, start: int, stop: int) -> Batch:
    # Only the mask is fetched: its width sizes the zero token rewards.
    mask = source.select("response_mask").materialize(start, stop)["response_mask"]
    return Batch.from_dict(
        {"seq_reward": torch.zeros(stop - start), "token_rewards": torch.zeros(mask.shape)},
        {"reward_error": ["timeout"] * (stop - start)},
    )


def score_in_parallel(
    batch: Batch | DistributedBatch,
    cfg: RewardConfig,
    reward_fn: RewardFn | None = None,
) -> tuple[DistributedBatch, dict[str, float]]:
    """Score `batch` in `cfg.num_parallel` Ray tasks over contiguous row ranges.

    The result columns stay in the object store (a DistributedBatch to `union` with the input).
    `reward_fn` replaces the registry lookup of `cfg.function` (for functions that live outside
    the registry, e.g. in a user's script). Chunks not done `cfg.timeout_s` after submission are
    cancelled and scored 0 with reward_error "timeout"; metrics: reward/mean (over all samples),
    reward/num_errors (timeouts included), reward/num_timeouts.
    """
    fn: str | RewardFn = reward_fn if reward_fn is not None else cfg.function
    if isinstance(fn, str):
        REWARD_FUNCTIONS.get(fn)  # fail here, with the list of names, not inside a task
    source = batch if isinstance(batch, DistributedBatch) else DistributedBatch.from_batch(batch)
    source = source.select(*INPUT_COLUMNS)
    ranges = source.row_ranges(max(1, min(cfg.num_parallel, len(source))))
    pending = [_score_rows.remote(source, start, stop, fn) for start, stop in ranges]
    metric_refs = [metrics for _, metrics in pending]

    deadline = time.monotonic() + cfg.timeout_s
    done: set[ray.ObjectRef] = set()
    while len(done) < len(metric_refs):
        waiting = [r for r in metric_refs if r not in done]
        ready, _ = ray.wait(waiting, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        ray.get(ready)  # a task that failed as a whole (not one sample) is a bug: raise it
        done.update(ready)

    shards: list[tuple[ray.ObjectRef, int]] = []
    total = 0.0
    num_errors = 0.0
    num_timeouts = 0
    for (start, stop), (rows_ref, metrics_ref) in zip(ranges, pending):
        n = stop - start
        if metrics_ref in done:
            metrics = ray.get(metrics_ref)
            shards.append((rows_ref, n))
            total += metrics["reward/mean"] * n
            num_errors += metrics["reward/num_errors"]
        else:
            ray.cancel(metrics_ref, force=True)
            shards.append((ray.put(_timed_out_rows(source, start, stop)), n))
            num_timeouts += n
    num_rows = len(source)
    return DistributedBatch.from_refs([r for r, _ in shards], [n for _, n in shards]), {
        "reward/mean": total / num_rows if num_rows else 0.0,
        "reward/num_errors": num_errors + num_timeouts,
        "reward/num_timeouts": float(num_timeouts),
    }
