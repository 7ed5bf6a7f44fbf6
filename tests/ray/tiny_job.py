"""Overrides shared by the Ray tests that run a whole job on a tiny model: one worker with one CPU,
one reward process, no progress bar, TensorBoard or plot."""

from __future__ import annotations

ONE_WORKER = [
    "resources.pools.default.num_workers=1",
    "resources.pools.default.cpus_per_worker=1",
    "reward.num_parallel=1",
]
QUIET = ["logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false"]


def tiny_model(
    path, *, num_layers: int = 2, hidden_size: int = 64, intermediate_size: int = 128
) -> list[str]:
    """A tiny_qwen2 built at `path` (2 heads, 1 KV head; no warm-up unless overridden after)."""
    return [
        f"model.path={path}",
        "model.build.type=tiny_qwen2",
        f"model.build.num_layers={num_layers}",
        f"model.build.hidden_size={hidden_size}",
        "model.build.num_heads=2",
        "model.build.num_kv_heads=1",
        f"model.build.intermediate_size={intermediate_size}",
    ]


# The 1-digit arithmetic task on a model warmed up until some answers are right and some wrong, so
# that groups have reward variance (dynamic sampling, advantages that move the policy).
WARM_ARITHMETIC = [
    "model.build.sft_steps=60",
    "model.build.sft_batch_size=32",
    "data.task.type=arithmetic",
    "data.task.max_digits=1",
    "data.task.num_train=2000",
    "data.task.num_val=8",
]

# Streaming mode on the tiny box: the actor's pool and the rollout's, one 1-CPU worker each, one
# reward process whose slow start on a busy box must not count as a reward timeout.
TWO_POOLS = [
    "resources.pools.default.num_workers=1",
    "resources.pools.default.cpus_per_worker=1",
    "resources.pools.rollout.num_workers=1",
    "resources.pools.rollout.cpus_per_worker=1",
    "rollout.pool=rollout",
    "reward.num_parallel=1",
    "reward.timeout_s=120",
]
