"""What a continuous-batching engine schedules: requests, their sequences, their results.

Shared by every engine's `ContinuousEngine` (engines/base.py) and the StreamingGenerator that drives
one. A request is one prompt and `num_samples` sequences sampled for it (a GRPO group); it completes
when its last sequence does, or when the straggler cap ends it (truncated or dropped).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tidal.config.schema import SamplingConfig

Status = Literal["done", "truncated", "dropped"]
StragglerPolicy = Literal["truncate", "drop"]


@dataclass
class Request:
    """One prompt to sample `num_samples` responses for."""

    rid: Hashable  # unique among the batcher's unfinished requests
    prompt_ids: torch.Tensor  # [P] int64, the real tokens only (no padding)
    num_samples: int
    sampling: SamplingConfig  # `n` is not read: num_samples is
    stop_token_ids: Sequence[int]  # the complete stop set; the stop token is part of the response
    seed: int | None = None  # seeds this request's draws (None: the engine's own random state)
    payload: Any = None  # carried to the GroupResult untouched (the role keeps the prompt row here)


@dataclass(eq=False)  # compared by identity
class SequenceState:
    """One response being sampled."""

    group: GroupState
    ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    done: bool = False
    truncated: bool = False


class GroupState:
    """A request being served: its sequences and how many are still open."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.stops = frozenset(int(t) for t in request.stop_token_ids)
        self.max_new = request.sampling.max_new_tokens
        self.seqs: list[SequenceState] = []
        self.num_open = request.num_samples
        self.started_at: float | None = None
        self.rng: Any = None  # the engine's own random state for this request, if it keeps one


@dataclass
class GroupResult:
    """A finished request: its sequences in sample order (empty lists when dropped)."""

    request: Request
    status: Status
    response_ids: list[list[int]]
    log_probs: list[list[float]]
    versions: list[list[int]]  # the weights version that sampled each token
    truncated: list[bool]  # per sequence: cut by the straggler cap before it ended
    version_at_finish: int

    @property
    def min_version(self) -> int:
        """The oldest version of any token (the current one for a group without tokens)."""
        return min((min(v) for v in self.versions if v), default=self.version_at_finish)

    @property
    def num_response_tokens(self) -> int:
        return sum(len(ids) for ids in self.response_ids)

    def tensors(self, width: int, pad_token_id: int) -> dict[str, torch.Tensor]:
        """response_ids, response_mask, log_probs, token_versions [n,width] (right-padded) and truncated [n]."""
        n = len(self.response_ids)
        longest = max((len(ids) for ids in self.response_ids), default=0)
        if longest > width:
            raise ValueError(f"width={width} is shorter than the longest response ({longest} tokens)")
        out = {
            "response_ids": torch.full((n, width), pad_token_id, dtype=torch.long),
            "response_mask": torch.zeros(n, width, dtype=torch.long),
            "log_probs": torch.zeros(n, width, dtype=torch.float32),
            "token_versions": torch.zeros(n, width, dtype=torch.long),
        }
        for row, (ids, lps, vers) in enumerate(zip(self.response_ids, self.log_probs, self.versions)):
            length = len(ids)
            out["response_ids"][row, :length] = torch.tensor(ids, dtype=torch.long)
            out["response_mask"][row, :length] = 1
            out["log_probs"][row, :length] = torch.tensor(lps, dtype=torch.float32)
            out["token_versions"][row, :length] = torch.tensor(vers, dtype=torch.long)
        out["truncated"] = torch.tensor(self.truncated, dtype=torch.bool)
        return out


def finish(group: GroupState, status: Status, version: int) -> GroupResult:
    """The result of a request that ended with `status` while `version` was being served."""
    seqs = [] if status == "dropped" else group.seqs
    return GroupResult(
        request=group.request,
        status=status,
        response_ids=[s.ids for s in seqs],
        log_probs=[s.log_probs for s in seqs],
        versions=[s.versions for s in seqs],
        truncated=[s.truncated for s in seqs],
        version_at_finish=version,
    )


class RequestQueue:
    """What every continuous engine keeps besides its batch: the queue, the requests running, the
    checks a request must pass, and admission into free sequence slots. Single-threaded like the
    engines built on it (only `check` may be called from another thread)."""

    def __init__(self, slots: int, slots_name: str, version: int, clock: Callable[[], float]) -> None:
        self.slots = slots  # sequences the engine runs at once
        self.slots_name = slots_name  # the setting that sets `slots`, for messages
        self.version = version  # stamped on the tokens sampled next
        self.clock = clock
        self.queue: deque[GroupState] = deque()
        self._queued_ids: set[Hashable] = set()
        self.running: dict[Hashable, GroupState] = {}  # admitted and unfinished, by request id
        self.num_generated_tokens = 0

    @property
    def num_queued(self) -> int:
        return len(self.queue)

    def pending_ids(self) -> list[Hashable]:
        """Request ids not finished: queued, then running."""
        return [g.request.rid for g in self.queue] + list(self.running)

    def check(self, request: Request) -> None:
        """Raise ValueError if `request` can never run here (reads no state: any thread may call it)."""
        prompt = request.prompt_ids
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError(
                f"request {request.rid!r}: prompt_ids must be a non-empty 1-D tensor, got {tuple(prompt.shape)}"
            )
        if not 1 <= request.num_samples <= self.slots:
            raise ValueError(
                f"request {request.rid!r}: num_samples={request.num_samples} must be in "
                f"[1, {self.slots_name}={self.slots}] (a group runs together)"
            )

    def submit(self, request: Request) -> GroupState:
        self.check(request)
        if request.rid in self.running or request.rid in self._queued_ids:
            raise ValueError(f"request id {request.rid!r} is already queued or running")
        group = GroupState(request)
        self.queue.append(group)
        self._queued_ids.add(request.rid)
        return group

    def take_admissible(self, free: int) -> list[GroupState]:
        """Queued requests, in order, while their sequences fit in `free` slots; they start now."""
        admitted: list[GroupState] = []
        now = self.clock()
        while self.queue and self.queue[0].request.num_samples <= free:
            group = self.queue.popleft()
            self._queued_ids.discard(group.request.rid)
            free -= group.request.num_samples
            group.started_at = now
            group.seqs = [SequenceState(group) for _ in range(group.request.num_samples)]
            self.running[group.request.rid] = group
            admitted.append(group)
        return admitted

    def late(self, timeout_s: float) -> list[GroupState]:
        """Running requests admitted more than `timeout_s` ago (the straggler cap)."""
        now = self.clock()
        return [g for g in self.running.values() if g.started_at is not None and now - g.started_at > timeout_s]

    def close(self) -> None:
        """Release what the engine holds for these requests (the streaming generator stopped)."""
        return None

    def _end_late(self, group: GroupState, policy: StragglerPolicy) -> GroupResult:
        """The straggler cap's verdict on a late request. truncate: its sequences end with the tokens
        they have (marked truncated), status 'truncated'; drop: status 'dropped' and no tokens."""
        if policy == "truncate":
            for seq in group.seqs:
                seq.truncated = not seq.done
            return self._finish(group, "truncated")
        return self._finish(group, "dropped")

    def _finish(self, group: GroupState, status: Status) -> GroupResult:
        del self.running[group.request.rid]
        return finish(group, status, self.version)
