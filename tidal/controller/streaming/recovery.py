"""Restarting the rollout pool when one of its workers dies (free schedule).

A rollout worker that dies shows up as a `ray.exceptions.RayActorError` in a call to the pool: the
rollout thread's poll or submit (feeders.py), or the weight sync of the trainer's thread. The
restart itself always runs on the trainer's thread, between two of its calls to the trainer pool,
because it needs the trainer's workers (they leave the broken weight bridge, join the new one and
send their weights) and a second thread calling them could interleave with the trainer's own
collectives:

1. the rollout thread reports the death (`report`) and waits; the trainer's next call into the
   source (a take in `sample`, or `push`) runs `restart`;
2. `restart` (holding the feeder's lock) kills the whole rollout pool and starts it again (its
   ranks share one torch world: Cluster.restart_group), closes the broken WeightBridge and builds a
   new one, pushes the trainer's current version through it, and hands the feeder what the dead
   pool had in flight: groups the store already holds (a worker puts a group in one put, all or
   nothing) are kept, the others are issued again with their budget cancelled; then streaming
   starts on the new pool and the rollout thread goes on.

After trainer.streaming.max_rollout_restarts restarts the next death ends the run with an error.
The deterministic schedule never restarts (its batches must come from fixed policy versions):
resume it from a checkpoint instead.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import ray

if TYPE_CHECKING:
    from tidal.controller.job import Job
    from tidal.controller.streaming.source import StreamingSource
    from tidal.controller.weight_bridge import WeightBridge
    from tidal.controller.worker_group import WorkerGroup

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 10.0  # a rank that does not answer within this is busy, not dead


def rollout_bridge(job: Job) -> WeightBridge:
    """The weight bridge from the trainer's pool to the rollout pool (built again after a restart)."""
    from tidal.controller.weight_bridge import actor_to_rollout

    return actor_to_rollout(job.cluster, job.cfg)


def dead_ranks(group: WorkerGroup, timeout_s: float = PING_TIMEOUT_S) -> list[int]:
    """Ranks of `group` whose worker is gone. A rank still busy with an earlier call (it answers
    pings in turn) counts as alive when `timeout_s` runs out."""
    if not group.workers:  # shut down already
        return []
    refs = {w.ping.remote(): rank for rank, w in enumerate(group.workers)}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    dead = []
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError:
            dead.append(refs[ref])
    return sorted(dead)


def is_actor_death(err: BaseException) -> bool:
    """Whether `err`, or an error it was raised from, says an actor died."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ray.exceptions.RayActorError):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


class RolloutRecovery:
    """See the module docstring. `generation` counts the rollout pools the run has had."""

    def __init__(self, source: StreamingSource) -> None:
        self.src = source
        self.max_restarts = source.settings.max_rollout_restarts
        self.restarts = 0
        self.generation = 0
        self.lost: BaseException | None = None  # a death the rollout thread saw, not yet handled

    # ------------------------------------------------------------------ the rollout thread
    def report(self, err: BaseException, generation: int) -> None:
        """The rollout thread's call to pool `generation` failed with `err`: wait for the trainer's
        thread to restart the pool (returns at once if it already has, or when the run stops)."""
        src = self.src
        if src.deterministic:
            raise err
        with src.cond:
            if self.generation == generation and self.lost is None:
                self.lost = err
            src.cond.notify_all()
        dead = dead_ranks(src.job.cluster.group_of("rollout")) if self.generation == generation else []
        src.wait_for(
            lambda: self.generation != generation,
            f"the rollout thread lost {_ranks(dead)} ({_first_line(err)}) and waited for the trainer's "
            "thread to restart the rollout pool (it does so at its next take or weight sync)",
        )

    # ------------------------------------------------------------------ the trainer's thread
    def restart_if_lost(self) -> dict[str, float]:
        """Called by the trainer's thread while it waits for samples: restart a pool the rollout
        thread saw die, loading the trainer's current version (the one it trains from)."""
        if self.lost is None:
            return {}
        return self.restart(self.src.job.state.version, self.lost)

    def sync(self, version: int) -> dict[str, float]:
        """Push `version` to the rollout pool through the bridge; a pool that died (now or before)
        is restarted and receives `version` there instead."""
        src = self.src
        if self.lost is not None:
            return self.restart(version, self.lost)
        try:
            return src.bridge.sync(version, timeout_s=src.settings.wait_timeout_s)
        except Exception as err:
            if not (is_actor_death(err) or dead_ranks(src.job.cluster.group_of("rollout"))):
                raise
            return self.restart(version, err)  # (the deterministic schedule raises there, saying why)

    def restart(self, version: int, err: BaseException) -> dict[str, float]:
        """Start the rollout pool again, serving `version`; returns the weight sync's metrics."""
        src, job = self.src, self.src.job
        pool = job.cfg.rollout.pool
        dead = dead_ranks(job.cluster.group_of("rollout"))
        who = _ranks(dead)
        if src.deterministic:
            raise RuntimeError(
                f"{who} of pool {pool!r} died ({_first_line(err)}); the deterministic schedule does not "
                "restart the rollout pool (its batches come from fixed policy versions): resume from the "
                "last checkpoint (trainer.resume=true)"
            ) from err
        if self.restarts >= self.max_restarts:
            raise RuntimeError(
                f"{who} of pool {pool!r} died ({_first_line(err)}) after the pool was already restarted "
                f"{self.restarts} time(s); giving up (trainer.streaming.max_rollout_restarts="
                f"{self.max_restarts})"
            ) from err
        self.restarts += 1
        log.warning(
            "%s of pool %r died (%s); restarting the rollout pool (restart %d of at most %d) and issuing "
            "its requests in flight again",
            who,
            pool,
            _first_line(err),
            self.restarts,
            self.max_restarts,
        )
        start = time.perf_counter()
        with src.feeder_lock:  # the rollout thread is parked, or finishes its call to the dead pool first
            group = job.cluster.restart_group(pool)
            src.bridge.close(timeout_s=src.settings.wait_timeout_s)
            src.bridge = rollout_bridge(job)
            metrics = src.bridge.sync(version, timeout_s=src.settings.wait_timeout_s)
            with src.cond:
                src.rollout_version = version
            kept, reissued = src.feeder.restart_stream(complete_groups(_store_index(src)["samples"]), group)
            with src.cond:
                self.generation += 1
                self.lost = None
                src.cond.notify_all()
        log.warning(
            "rollout pool %r restarted in %.1f s at version %d: %d group(s) in flight were already stored, "
            "%d issued again",
            pool,
            time.perf_counter() - start,
            version,
            kept,
            reissued,
        )
        return metrics


def complete_groups(samples: list[tuple]) -> dict[str, bool]:
    """Request uid -> whether its samples are complete in the store (their fields committed), for
    each group in the store index's `samples` (StoreIndex.state_dict: no payload). A put of the
    dead worker may have been admitted and never committed: that group is not complete."""
    complete: dict[str, bool] = {}
    for sid, _meta, fields, _consumed in samples:
        uid = str(sid).split("/", 1)[0]
        complete[uid] = complete.get(uid, True) and bool(fields)
    return complete


def _store_index(src: StreamingSource) -> dict:
    """The store's index (which samples it holds, with which fields), without any payload."""
    timeout = src.settings.wait_timeout_s
    try:
        return ray.get(src.store.controller.state_dict.remote(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(
            f"the rollout pool restart waited trainer.streaming.wait_timeout_s={timeout:g}s for the store's "
            "index (to tell which requests in flight already reached the store)"
        ) from None


def _ranks(dead: list[int]) -> str:
    return f"rollout rank {', '.join(map(str, dead))}" if dead else "a rollout worker (rank unknown)"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


__all__ = ["RolloutRecovery", "complete_groups", "dead_ranks", "is_actor_death", "rollout_bridge"]
