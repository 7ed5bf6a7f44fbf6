"""StreamingSource: where a streaming run's training batches come from.

The step loop (loop.py `run_steps`) and the programs (grpo.py, ppo.py) run unchanged in
streaming mode; the runner makes this object the job's sampler and weight sync:

- `job.sampler.sample(step)` -> `sample`: take whole, scored, fresh-enough groups from the
  store (waiting while the rollout catches up), drop failed rewards and (DAPO) zero-variance
  groups, give their budget back, refill until the step has its groups.
- `job.weight_sync.push(version)` -> `push`: the trainer's weights to the rollout pool
  through the weight bridge (the rollout resumes at once; in the deterministic schedule first
  waiting for the batches the older version still owes).

Behind them two threads keep working while the trainer trains: the rollout thread (feeders.py)
and the reward thread (reward_stage.py). A failure in either stops the run at the trainer's next
call, with the thread named; every wait has a timeout (trainer.streaming.wait_timeout_s) whose
error names who waited for what.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tidal.algorithms import DynamicSamplingQuota
from tidal.controller.stages.base import ready_columns, take_rows
from tidal.controller.streaming.admission import Admission
from tidal.controller.streaming.feeders import DeterministicFeeder, FreeFeeder, batch_of
from tidal.controller.streaming.recovery import RolloutRecovery
from tidal.controller.streaming.reward_stage import RewardLedger, RewardStage
from tidal.dataflow.distributed_batch import DistributedBatch
from tidal.observability.metrics import truncate_jsonl

if TYPE_CHECKING:
    from tidal.controller.job import Job
    from tidal.dataflow.store.store import StreamStore

log = logging.getLogger(__name__)

TRAIN_TASK = "train"
LEDGER_FILE = "streaming_ledger.jsonl"


class StageFailed(RuntimeError):
    """A background stage of the streaming runner failed; the message names it and says why."""


class StreamingSource:
    def __init__(self, job: Job, store: StreamStore, bridge: Any) -> None:
        cfg = job.cfg
        self.job, self.store, self.bridge = job, store, bridge
        self.settings = cfg.trainer.streaming
        self.max_staleness = cfg.trainer.max_staleness
        self.total_steps = cfg.trainer.total_steps
        self.deterministic = self.settings.schedule == "deterministic"
        n = cfg.rollout.sampling.n
        rollout_ranks = cfg.resources.pools[cfg.rollout.pool].num_workers
        self.admission = Admission(cfg.trainer.max_staleness, cfg.sizes.samples_per_step, rollout_ranks)
        self.feeder: DeterministicFeeder | FreeFeeder = (
            DeterministicFeeder(self) if self.deterministic else FreeFeeder(self)
        )
        self.ledger = RewardLedger()
        self.rewards = RewardStage(
            job.stages.score,
            store,
            self.ledger,
            # Deterministic: exactly one batch per scoring call. Free: whatever whole groups are
            # ready, up to a train batch, so a backlog is scored in one call, not many small ones.
            take_size=max(n, cfg.sizes.samples_per_step),
            exact=self.deterministic,
            tag_of=(lambda ids: batch_of(ids[0])) if self.deterministic else (lambda ids: None),
        )
        self.cond = threading.Condition()
        self.feeder_lock = threading.Lock()  # held while the rollout thread changes what is in flight
        self.rollout_version = -1  # none loaded yet
        self.stopping = False
        self.failure: tuple[str, BaseException, str] | None = None
        self.threads: list[threading.Thread] = []
        self.rollout_busy_s = 0.0  # deterministic schedule: time inside generate calls
        self.counters = {"stale": 0, "regenerated": 0, "filtered": 0, "reward_dropped": 0}
        self._last = {"time": time.perf_counter(), "rollout_busy": 0.0, "gen_tokens": 0.0}
        self._train_since: float | None = None  # when the trainer last got a batch
        self.ledger_path = job.output_dir / LEDGER_FILE if self.settings.ledger else None
        self.recovery = RolloutRecovery(self)  # restarts the rollout pool when a worker dies
        # A sample is trainable once everything generate and score write is in.
        self.ready_fields = ready_columns(job.stages.generate, job.stages.score)

    # ------------------------------------------------------------------ threads
    def start(self) -> None:
        for name, body in (("rollout", self.feeder.run), ("reward", self._reward_loop)):
            thread = threading.Thread(
                target=self._guard, args=(name, body), name=f"tidal-{name}", daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def _reward_loop(self) -> None:
        while not self.stopping:
            self.rewards.step()

    def _guard(self, name: str, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as err:  # surfaced by the trainer's next call
            with self.cond:
                self.failure = self.failure or (name, err, traceback.format_exc())
                self.cond.notify_all()

    def check(self) -> None:
        if self.failure is not None:
            name, err, trace = self.failure
            raise StageFailed(
                f"the streaming {name} thread failed: {type(err).__name__}: {err}\n{trace}"
            ) from err

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        """Block until `predicate` (checked under the condition), the run stops or a stage fails."""
        timeout = self.settings.wait_timeout_s
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate() and not self.stopping:
                if self.failure is not None and threading.current_thread() is threading.main_thread():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{what}, and gave up after trainer.streaming.wait_timeout_s={timeout:g}s "
                        f"(trainer version {self.job.state.version}, rollout version {self.rollout_version}); "
                        "raise the timeout if steps are this slow"
                    )
                self.cond.wait(min(remaining, 1.0))
        self.check()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        for thread in self.threads:
            thread.join(timeout=30.0)
        if isinstance(self.feeder, FreeFeeder):
            self.feeder.stop()

    # ------------------------------------------------------------------ weights
    def push(self, version: int) -> dict[str, float]:
        """Trainer -> rollout pool; the first call (after a resume's restore) starts the threads."""
        self.check()
        if self.threads and isinstance(self.feeder, DeterministicFeeder):
            through = self.feeder.batches_needing_older_than(version)
            self.wait_for(
                lambda: self.feeder.generated_through >= through,
                f"the weight sync of version {version} waited for the rollout thread to finish batch {through} "
                f"(the last one of the older version)",
            )
        metrics = self.recovery.sync(version)  # through self.bridge, rebuilt if a rollout worker died
        with self.cond:
            self.rollout_version = version
            self.cond.notify_all()
        if not self.threads:
            if self.ledger_path is not None:  # steps after the restored one are redone by this run
                truncate_jsonl(self.ledger_path, version + 1)
            if self.job.stream_resume is not None:  # a resumed run continues the stream it saved
                self.load_state_dict(self.job.stream_resume)
                self.job.stream_resume = None
            self.start()
        return metrics

    # ------------------------------------------------------------------ training batches
    def sample(self, step: int) -> tuple[DistributedBatch, None, dict[str, float]]:
        """The step's scored groups from the store, like `InPlaceSampler.sample` in sync mode."""
        job = self.job
        cfg, version = job.cfg, job.state.version
        n = cfg.rollout.sampling.n
        settings = cfg.algorithm.dynamic_sampling
        quota = DynamicSamplingQuota(cfg.trainer.prompts_per_step, settings.max_rounds) if settings else None
        min_version = version - self.max_staleness
        began = time.perf_counter()
        entry: dict[str, list[Any]] = {"trained": [], "stale": [], "dropped": []}
        batches: list[DistributedBatch] = []
        keeps: list[list[bool]] = []
        versions: list[int] = []
        waited = 0.0
        totals = {"reward/num_errors": 0.0, "reward/num_timeouts": 0.0, "reward/num_dropped": 0.0, "rows": 0}
        reward_means: list[tuple[dict[str, float], int]] = []
        while True:
            groups = cfg.trainer.prompts_per_step - (quota.kept_groups if quota else 0)
            start = time.perf_counter()
            taken = self._take(groups * n, min_version, step)
            waited += time.perf_counter() - start
            entry["stale"] += taken.stale
            versions += [v for v in taken.versions if v is not None]
            if isinstance(self.feeder, FreeFeeder):
                self.feeder.consumed(taken.ids)
            metrics, first_error, rows = self.ledger.drain(step if self.deterministic else None)
            rows = rows or len(taken.ids)
            batch, metrics, kept = job.stages.score.drop_failed(taken.batch, metrics, first_error, rows)
            ids = _kept(taken.ids, kept, entry["dropped"])
            dropped = len(taken.ids) - len(batch)
            self.counters["reward_dropped"] += dropped
            self.admission.give_back(dropped)
            for key in ("reward/num_errors", "reward/num_timeouts", "reward/num_dropped"):
                totals[key] += metrics[key]
            totals["rows"] += rows
            reward_means.append(({k: v for k, v in metrics.items() if k.endswith("/mean")}, rows))
            if quota is None:
                batches.append(batch)
                entry["trained"] += ids
                break
            keep, _ = job.stages.filter_groups(batch, quota)
            entry["trained"] += _kept(ids, keep, entry["dropped"])
            filtered = len(keep) - sum(keep)
            self.counters["filtered"] += filtered
            self.admission.give_back(filtered)
            batches.append(batch)
            keeps.append(keep)
            if quota.full:
                break
        out = batches[0] if quota is None else take_rows(batches, keeps)
        metrics = _merge_means(reward_means)
        metrics |= {k: v for k, v in totals.items() if k != "rows"}
        metrics["reward/error_share"] = totals["reward/num_errors"] / max(totals["rows"], 1)
        if quota is not None:
            metrics |= quota.metrics()
        metrics |= self._stream_metrics(version, versions, waited)
        now = time.perf_counter()
        if self._train_since is not None:  # the trainer's work between two batches vs its wait for this one
            busy = began - self._train_since
            metrics["streaming/train_busy_ratio"] = busy / max(busy + waited, 1e-9)
        self._train_since = now
        if self.ledger_path is not None:
            with self.ledger_path.open("a") as f:
                f.write(json.dumps({"step": step, **{k: [str(i) for i in v] for k, v in entry.items()}}) + "\n")
        return out, None, metrics

    def _take(self, num_samples: int, min_version: int, step: int) -> Any:
        from tidal.dataflow.store.index import StoreTimeout

        timeout = self.settings.wait_timeout_s
        while True:
            self.check()
            self.recovery.restart_if_lost()
            try:
                taken = self.store.take(
                    TRAIN_TASK,
                    self.ready_fields,
                    num_samples,
                    sampler="group",
                    min_version=min_version,
                    timeout_s=min(timeout, 5.0),
                    all_fields=True,
                )
            except StoreTimeout as err:
                timeout -= 5.0
                if timeout <= 0:
                    raise TimeoutError(
                        f"trainer step {step} waited trainer.streaming.wait_timeout_s="
                        f"{self.settings.wait_timeout_s:g}s for {num_samples} scored samples: {err}"
                    ) from None
                continue
            if taken.stale:
                self._handle_stale(taken.stale)
            return taken

    def _handle_stale(self, stale: list[Any]) -> None:
        """Samples older than the bound: never trained; counted, their budget given back."""
        self.counters["stale"] += len(stale)
        self.admission.give_back(len(stale))
        if isinstance(self.feeder, FreeFeeder):
            rows = self.feeder.consumed(stale)
            if self.settings.stale_policy == "regenerate":
                self.feeder.reissue(rows)
                self.counters["regenerated"] += len(rows)

    # ------------------------------------------------------------------ metrics
    def _stream_metrics(self, version: int, versions: list[int], waited: float) -> dict[str, float]:
        staleness = [version - v for v in versions]
        out: dict[str, float] = {
            "streaming/staleness_mean": sum(staleness) / len(staleness) if staleness else 0.0,
            "streaming/staleness_max": float(max(staleness, default=0)),
            "streaming/train_wait_s": waited,
            "streaming/stale_dropped": float(self.counters["stale"]),
            "streaming/stale_regenerated": float(self.counters["regenerated"]),
            "streaming/filtered": float(self.counters["filtered"]),
            "streaming/reward_dropped": float(self.counters["reward_dropped"]),
            "streaming/admission_room": float(self.admission.room(version)),
            "streaming/budget_returned": float(self.admission.returned),
            "streaming/rollout_restarts": float(self.recovery.restarts),
        }
        for lag in range(self.max_staleness + 1):
            out[f"streaming/staleness_hist/{lag}"] = float(sum(s == lag for s in staleness))
        stats = self.store.stats()
        for task, depth in stats["waiting_on"].items():
            out[f"streaming/store_depth/{task}"] = float(depth)
        out |= self._rollout_metrics()
        return out

    def _rollout_metrics(self) -> dict[str, float]:
        """Busy share and token rate of the rollout pool since the previous step."""
        now = time.perf_counter()
        elapsed = max(now - self._last["time"], 1e-9)
        if isinstance(self.feeder, FreeFeeder) and self.feeder.stats:
            busy = sum(s.get("busy_s", 0.0) for s in self.feeder.stats) / len(self.feeder.stats)
            tokens = float(sum(s.get("generated_tokens", 0) for s in self.feeder.stats))
        else:
            busy, tokens = self.rollout_busy_s, self._last["gen_tokens"]
        out = {
            "streaming/rollout_busy_ratio": min(1.0, (busy - self._last["rollout_busy"]) / elapsed),
            "streaming/rollout_tokens_per_s": (tokens - self._last["gen_tokens"]) / elapsed,
            "streaming/reward_busy_s": self.rewards.busy_s,
            "perf/gen_s": busy - self._last["rollout_busy"],
        }
        self._last = {"time": now, "rollout_busy": busy, "gen_tokens": tokens}
        return out

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """A consistent snapshot: no generation, reward or take half done while it is taken."""
        with self.feeder_lock, self.rewards.lock:
            return {
                "schedule": self.settings.schedule,
                "feeder": self.feeder.state_dict(),
                "admission": self.admission.state_dict(),
                "counters": dict(self.counters),
                "loader": self.job.data.train_loader.state_dict(),
                "store": self.store.state_dict(),
            }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["schedule"] != self.settings.schedule:
            raise ValueError(
                f"the checkpoint was made with trainer.streaming.schedule={state['schedule']}, this run has "
                f"{self.settings.schedule}; resume with the same schedule"
            )
        self.store.load_state_dict(state["store"])
        self.admission.load_state_dict(state["admission"])
        self.counters.update(state["counters"])
        self.job.data.train_loader.load_state_dict(state["loader"])
        if isinstance(self.feeder, FreeFeeder):
            stored = {str(sid).split("/", 1)[0] for sid, *_ in state["store"]["index"]["samples"]}
            self.feeder.load_state_dict(state["feeder"], stored)
        else:
            self.feeder.load_state_dict(state["feeder"])


def _kept(ids: list[Any], keep: list[bool] | None, dropped: list[Any]) -> list[Any]:
    """`ids` whose rows `keep` keeps (None: all); the others are appended to `dropped`."""
    if keep is None:
        return list(ids)
    dropped += [i for i, k in zip(ids, keep) if not k]
    return [i for i, k in zip(ids, keep) if k]


def _merge_means(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    total = sum(rows for _, rows in parts) or 1
    keys = {k for metrics, _ in parts for k in metrics}
    return {k: sum(m.get(k, 0.0) * rows for m, rows in parts) / total for k in keys}


__all__ = ["TRAIN_TASK", "StageFailed", "StreamingSource"]
