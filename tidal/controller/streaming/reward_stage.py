"""The reward stage of the streaming runner: scores responses as they arrive in the store.

A thread takes finished responses from the store (task "reward": whole groups, as many as are
ready), scores them with the same scorer as sync mode (parallel Ray tasks, reward combinations,
timeouts, error counting: the `Score` stage) and puts the reward columns back under the same
sample ids; the payloads go rollout worker -> store -> scoring task -> store, never through the
driver. Reward metrics are kept per batch tag (`RewardLedger`) so the trainer reports the
metrics of exactly the samples of its step in the deterministic schedule, and of the samples
scored since its last step in the free one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tidal.dataflow.store.index import StoreTimeout

if TYPE_CHECKING:
    from tidal.controller.stages.scoring import Score
    from tidal.dataflow.store.store import StreamStore

REWARD_TASK = "reward"
POLL_S = 2.0  # a take waits this long before the loop looks at its stop flag again
SUMMED = ("reward/num_errors", "reward/num_timeouts")


@dataclass
class _Tally:
    rows: int = 0
    scored_sum: dict[str, float] = field(default_factory=dict)  # mean * scored rows, per mean metric
    sums: dict[str, float] = field(default_factory=dict)
    first_error: str | None = None


class RewardLedger:
    """Reward metrics of scored batches, merged per tag (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tallies: dict[Any, _Tally] = {}

    def record(self, tag: Any, rows: int, metrics: dict[str, float], first_error: str | None) -> None:
        with self._lock:
            tally = self._tallies.setdefault(tag, _Tally())
            scored = rows - metrics.get("reward/num_errors", 0.0)
            for key, value in metrics.items():
                if key in SUMMED:
                    tally.sums[key] = tally.sums.get(key, 0.0) + value
                elif key.endswith("/mean") or key == "reward/mean":
                    tally.scored_sum[key] = tally.scored_sum.get(key, 0.0) + value * scored
            tally.rows += rows
            tally.first_error = tally.first_error or first_error

    def drain(self, tag: Any) -> tuple[dict[str, float], str | None, int]:
        """The merged metrics of `tag` (forgotten here), its first error and its row count."""
        with self._lock:
            tally = self._tallies.pop(tag, _Tally())
        failed = tally.sums.get("reward/num_errors", 0.0)
        scored = tally.rows - failed
        metrics = {key: total / scored if scored else 0.0 for key, total in tally.scored_sum.items()}
        metrics.setdefault("reward/mean", 0.0)
        metrics["reward/num_errors"] = failed
        metrics["reward/num_timeouts"] = tally.sums.get("reward/num_timeouts", 0.0)
        metrics["reward/error_share"] = failed / tally.rows if tally.rows else 0.0
        return metrics, tally.first_error, tally.rows


class RewardStage:
    """Loop body of the reward thread; `lock` is held from a take until its rewards are stored, so a
    checkpoint never sees a sample taken for scoring whose reward is not stored yet."""

    def __init__(
        self,
        score: Score,
        store: StreamStore,
        ledger: RewardLedger,
        take_size: int,
        exact: bool,
        tag_of: Callable[[list[Any]], Any],
    ) -> None:
        self.score, self.store, self.ledger = score, store, ledger
        self.take_size, self.exact, self.tag_of = take_size, exact, tag_of
        self.lock = threading.Lock()
        self.busy_s = 0.0
        self.scored = 0

    def step(self) -> bool:
        """Score one take; False when nothing was ready within POLL_S."""
        with self.lock:
            try:
                taken = self.store.take(
                    REWARD_TASK,
                    [*self.score.reads, "uid"],
                    self.take_size,
                    sampler="group",
                    timeout_s=POLL_S,
                    partial=not self.exact,
                )
            except StoreTimeout:
                return False
            start = time.perf_counter()
            rewards, metrics, first_error = self.score.rewards_of(taken.batch)
            # Recorded before the put: once the rewards are stored the trainer may take the samples
            # and ask for their metrics.
            self.ledger.record(self.tag_of(taken.ids), len(taken.ids), metrics, first_error)
            self.store.put(taken.ids, rewards, producer="reward stage")
            self.busy_s += time.perf_counter() - start
            self.scored += len(taken.ids)
        return True
