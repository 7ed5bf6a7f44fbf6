"""How much the rollout may generate ahead of the trainer: AReaL's staleness-bounded admission.

With B samples per train batch, trainer version v and staleness bound eta, the trainer will have
consumed (v + 1) * B samples by the end of the step it is in, and a sample may be trained up to
eta versions after the one that generated it. So at most (eta + v + 1) * B samples may ever have
been *accepted* (generated and kept) or be *running* (submitted, not finished):

    room = (eta + v + 1) * B - (accepted + running)

A request is admitted only when its whole group fits in `room`. Samples that are generated but
never trained (a failed reward dropped, a zero-variance group filtered by dynamic sampling, a
straggler dropped, a stale sample refused) give their budget back, so the rollout replaces them
and dynamic sampling works in streaming mode.

This bound is on average staleness; the hard bound is the consumer's check (the store refuses a
sample whose oldest token is older than v - eta). Rollout ranks are tracked separately so that
work goes to the least loaded one, but the budget is one count: no sample is counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Admission:
    max_staleness: int
    batch_samples: int  # B: samples per train batch
    num_ranks: int = 1  # rollout data-parallel ranks
    accepted: int = 0  # finished and kept (waiting in the store or trained)
    running: list[int] = field(default_factory=list)  # per rank: submitted, not finished
    returned: int = 0  # budget given back so far (dropped, filtered, stale)

    def __post_init__(self) -> None:
        if self.max_staleness < 0 or self.batch_samples < 1 or self.num_ranks < 1:
            raise ValueError(
                f"Admission needs max_staleness >= 0, batch_samples >= 1 and num_ranks >= 1; got "
                f"{self.max_staleness}, {self.batch_samples}, {self.num_ranks}"
            )
        if not self.running:
            self.running = [0] * self.num_ranks

    @property
    def total_running(self) -> int:
        return sum(self.running)

    def room(self, version: int) -> int:
        """Samples that may still be submitted while the trainer is at `version`."""
        limit = (self.max_staleness + version + 1) * self.batch_samples
        return limit - (self.accepted + self.total_running)

    def groups_allowed(self, version: int, group_size: int) -> int:
        return max(0, self.room(version) // group_size)

    def least_loaded_rank(self) -> int:
        return min(range(self.num_ranks), key=lambda r: (self.running[r], r))

    def submit(self, rank: int, samples: int) -> None:
        self.running[rank] += samples

    def finish(self, rank: int, samples: int, kept: int) -> None:
        """`samples` of `rank` finished; `kept` of them went to the store (the rest gave their budget back)."""
        if not 0 <= kept <= samples <= self.running[rank]:
            raise ValueError(
                f"rollout rank {rank} finished {samples} samples (kept {kept}) but had {self.running[rank]} running"
            )
        self.running[rank] -= samples
        self.accepted += kept
        self.returned += samples - kept

    def give_back(self, samples: int) -> None:
        """Accepted samples that will never be trained (stale, filtered, failed reward)."""
        if not 0 <= samples <= self.accepted:
            raise ValueError(f"cannot give back {samples} samples; {self.accepted} are accepted")
        self.accepted -= samples
        self.returned += samples

    def cancel(self, rank: int, samples: int) -> None:
        """Requests withdrawn before they finished (a rollout rank stopped or died): re-issued later."""
        self.running[rank] -= min(samples, self.running[rank])

    def state_dict(self) -> dict[str, Any]:
        # Running requests are re-issued after a resume, so they come back as not yet submitted.
        return {"accepted": self.accepted, "returned": self.returned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accepted, self.returned = int(state["accepted"]), int(state["returned"])
        self.running = [0] * self.num_ranks
