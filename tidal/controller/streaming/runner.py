"""`trainer.mode: streaming`: the sync loop and programs, fed by the streaming store.

Sets up what streaming adds to a job (the store, the weight bridge from the trainer's pool to the
rollout pool, the StreamingSource with its rollout and reward threads), makes the source the job's
sampler and weight sync, runs the very same `run_steps(job, step_fn)` the sync mode runs, and
takes it all down again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from tidal.controller.loop import StepFn, run_steps
from tidal.controller.streaming.recovery import rollout_bridge
from tidal.controller.streaming.reward_stage import REWARD_TASK
from tidal.controller.streaming.source import TRAIN_TASK, StreamingSource

if TYPE_CHECKING:
    from tidal.controller.job import Job

log = logging.getLogger(__name__)


def store_capacity(job: Job) -> int:
    """Samples the store must be able to hold so that no producer ever blocks on it.

    Admission keeps at most (max_staleness + 1) train batches generated ahead of the trainer; one
    more covers a batch being taken while the next is stored (deterministic schedule) and the
    requests in flight when a take gives budget back.
    """
    cfg = job.cfg
    return (cfg.trainer.max_staleness + 3) * cfg.sizes.samples_per_step


@contextlib.contextmanager
def attached_stream(job: Job) -> Iterator[StreamingSource]:
    """While the block runs, the job streams: a store, the weight bridge from the trainer's pool to
    the rollout pool, and a StreamingSource (its rollout and reward threads start at the first
    weight push) that is the job's sampler and weight sync. Everything is taken down on exit."""
    from tidal.dataflow.store.store import StreamStore

    store = StreamStore([REWARD_TASK, TRAIN_TASK], capacity=store_capacity(job))
    try:
        source = StreamingSource(job, store, rollout_bridge(job))
    except BaseException:
        store.shutdown()
        raise
    sampler, weight_sync = job.sampler, job.weight_sync
    job.stream = job.sampler = job.weight_sync = source
    try:
        yield source
    finally:
        job.stream, job.sampler, job.weight_sync = None, sampler, weight_sync
        source.stop()
        source.bridge.close()  # the one in use: a rollout restart replaces it
        store.shutdown()


def run_streaming(job: Job, step_fn: StepFn) -> dict[str, float]:
    cfg = job.cfg
    if cfg.trainer.max_staleness > 0 and cfg.algorithm.off_policy is None:
        log.warning(
            "trainer.max_staleness=%d trains on samples up to %d policy versions old without an off-policy "
            "correction; consider algorithm.off_policy (decoupled PPO / truncated IS, docs/streaming.md)",
            cfg.trainer.max_staleness,
            cfg.trainer.max_staleness,
        )
    # The same loop and program as sync mode: scored samples come from the store, and weights go
    # to the rollout pool through the bridge.
    with attached_stream(job):
        return run_steps(job, step_fn)
