"""Continuous batching on the embedded engine: requests join and leave the decode batch token by token.

`EmbeddedEngine.generate` is one-shot: a batch of prompts is prefilled together and decoded until
its last row ends, so a long response holds every slot of its batch until it is done. Here requests
wait in a queue, and before every decode step as many of them as fit in the free slots
(`engine.max_batch_size` sequences) are prefilled and their cache rows joined to the running batch
(forward.py `join`: caches of different lengths are right-aligned, the shorter left-padded with
masked slots; positions are per row, so the padding shifts nothing). A finished sequence leaves at
once; a request (a group of `num_samples` sequences sharing one prompt) completes when its last
sequence does. `generate` stays as it is: it is the reference the tests compare this against.

Weight updates (see streaming.py): the caller stops stepping, writes the weights, sets `version`
and calls `rebuild`, which re-prefills every in-flight sequence (prompt + the tokens it has) under
the new weights. Every token records the `version` of the weights whose logits it was drawn from,
and its log-prob is the one from those logits, so a response may span several versions.

Sampling is per request: each request may carry its own SamplingConfig and seed (a torch.Generator
of its own), and only its own rows are drawn from that generator, so what a request samples depends on its prompt,
seed and weights, not on which other requests shared the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from tidal.workers.engines.embedded.engine import EmbeddedEngine
from tidal.workers.engines.embedded.sampling import sample_next_per_generator
from tidal.workers.engines.requests import (
    GroupResult,
    GroupState,
    Request,
    RequestQueue,
    SequenceState,
    StragglerPolicy,
)


class ContinuousBatcher(RequestQueue):
    """The scheduler: a queue of requests and the running batch of one EmbeddedEngine.

    Single-threaded: one thread calls `submit`, `step`, `expire` and `rebuild` (streaming.py puts
    it behind a thread). `version` is the weights version stamped on the tokens sampled next.
    """

    def __init__(
        self, engine: EmbeddedEngine, version: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(engine.max_batch_size, "max_batch_size", version, clock)
        self.engine = engine
        self.rows: list[SequenceState] = []  # the sequences in the batch, in cache row order
        self.logits: torch.Tensor | None = None  # [B,V] the next token's logits of every row
        self.next_pos: torch.Tensor | None = None  # [B] position of every row's next token

    @property
    def num_running(self) -> int:
        """Sequences in the batch."""
        return len(self.rows)

    def submit(self, request: Request) -> GroupState:
        group = super().submit(request)
        if request.seed is not None:
            group.rng = torch.Generator(device=self.engine.device).manual_seed(request.seed)
        return group

    # ------------------------------------------------------------------ the decode step

    @torch.no_grad()
    def step(self, admit: bool = True) -> list[GroupResult]:
        """Admit queued requests into free slots (unless `admit` is False), sample one token for every
        running sequence, retire the finished ones and decode the rest; returns completed requests."""
        if admit:
            self._admit()
        if not self.rows:
            return []
        tokens, log_probs = self._sample()
        results, keep = [], []
        for row, (seq, token, log_prob) in enumerate(zip(self.rows, tokens.tolist(), log_probs.tolist())):
            seq.ids.append(token)
            seq.log_probs.append(log_prob)
            seq.versions.append(self.version)
            group = seq.group
            if token in group.stops or len(seq.ids) >= group.max_new:
                seq.done = True
                group.num_open -= 1
                if group.num_open == 0:
                    results.append(self._finish(group, "done"))
            else:
                keep.append(row)
        self.num_generated_tokens += len(self.rows)
        tokens = self._keep_rows(keep, tokens)
        if self.rows:
            assert self.next_pos is not None
            self.logits = self.engine.forward.decode(tokens, self.next_pos)
            self.next_pos = self.next_pos + 1
        return results

    def expire(self, timeout_s: float, policy: StragglerPolicy) -> list[GroupResult]:
        """Straggler cap: end every running request admitted more than `timeout_s` ago (`_end_late`)."""
        late = self.late(timeout_s)
        if not late:
            return []
        results = [self._end_late(group, policy) for group in late]
        ended = {id(g) for g in late}
        self._keep_rows([row for row, seq in enumerate(self.rows) if id(seq.group) not in ended])
        return results

    @torch.no_grad()
    def rebuild(self) -> None:
        """Re-prefill every running sequence (prompt + its tokens so far), e.g. under new weights."""
        if not self.rows:
            return
        sequences = [
            torch.cat([s.group.request.prompt_ids, torch.tensor(s.ids, dtype=torch.long)]) for s in self.rows
        ]
        ids, mask = self._left_pad(sequences)
        room = max(s.group.max_new - len(s.ids) for s in self.rows)
        forward = self.engine.forward
        forward.detach()
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        self.logits = forward.prefill(ids, mask, positions, max_len=ids.shape[1] + room)
        self.next_pos = mask.long().sum(-1)

    # ------------------------------------------------------------------ helpers

    def _admit(self) -> None:
        admitted = self.take_admissible(self.engine.max_batch_size - len(self.rows))
        if not admitted:
            return
        device = self.engine.device
        ids, mask = self._left_pad([g.request.prompt_ids for g in admitted])
        forward = self.engine.forward
        states = [forward.detach()] if self.rows else []
        logits = forward.prefill(ids, mask, (mask.long().cumsum(-1) - 1).clamp(min=0), max_len=ids.shape[1])
        counts = torch.tensor([g.request.num_samples for g in admitted], device=device)
        fan_out = torch.arange(len(admitted), device=device).repeat_interleave(counts)
        if len(fan_out) != len(admitted):
            forward.keep(fan_out)
        states.append(forward.detach())
        for group in admitted:
            self.rows.extend(group.seqs)
        new_pos = mask.long().sum(-1)[fan_out]
        self.next_pos = new_pos if self.next_pos is None else torch.cat([self.next_pos, new_pos])
        new_logits = logits[fan_out]
        self.logits = new_logits if self.logits is None else torch.cat([self.logits, new_logits])
        # Slots the batch may still need: no sequence outlives its remaining token budget.
        room = max(s.group.max_new - len(s.ids) for s in self.rows)
        forward.join(states, room, int(self.next_pos.max()) + room + 1)

    def _sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One draw per row; the rows of a request draw from its own generator."""
        assert self.logits is not None
        # sampling settings -> generator -> rows (None: the global generator)
        buckets: dict[tuple, dict[int | None, list[int]]] = {}
        for row, seq in enumerate(self.rows):
            s = seq.group.request.sampling
            by_generator = buckets.setdefault((s.temperature, s.top_k, s.top_p), {})
            rng = seq.group.rng
            by_generator.setdefault(None if rng is None else id(rng), []).append(row)
        generators = {id(g): g for g in (s.group.rng for s in self.rows) if g is not None}
        device = self.logits.device
        if len(buckets) == 1:
            (((temperature, top_k, top_p), by_generator),) = buckets.items()
            draws = [
                (torch.tensor(rows, device=device), generators.get(key)) for key, rows in by_generator.items()
            ]
            return sample_next_per_generator(self.logits, temperature, top_k, top_p, draws)
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=device)
        log_probs = torch.empty(len(self.rows), dtype=torch.float32, device=device)
        for (temperature, top_k, top_p), by_generator in buckets.items():
            idx = torch.tensor([row for rows in by_generator.values() for row in rows], device=device)
            draws, start = [], 0
            for key, rows in by_generator.items():
                draws.append((torch.arange(start, start + len(rows), device=device), generators.get(key)))
                start += len(rows)
            tokens[idx], log_probs[idx] = sample_next_per_generator(
                self.logits[idx], temperature, top_k, top_p, draws
            )
        return tokens, log_probs

    def _keep_rows(self, keep: list[int], tokens: torch.Tensor | None = None) -> torch.Tensor | None:
        """Drop every row not in `keep` from the batch and its cache; returns `tokens` of the kept rows."""
        if len(keep) == len(self.rows):
            return tokens
        if not keep:
            self.engine.forward.detach()
            self.rows, self.logits, self.next_pos = [], None, None
            return None
        assert self.logits is not None and self.next_pos is not None
        idx = torch.tensor(keep, device=self.logits.device)
        self.engine.forward.keep(idx)
        self.rows = [self.rows[row] for row in keep]
        self.logits, self.next_pos = self.logits[idx], self.next_pos[idx]
        return None if tokens is None else tokens[idx]

    def _left_pad(self, sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.engine.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(sequences), width, dtype=torch.bool)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = seq
            mask[row, width - len(seq) :] = True
        return ids.to(self.engine.device), mask.to(self.engine.device)
