"""Continuous batching on vLLM for the streaming loop: requests go straight into vLLM's scheduler.

vLLM already batches continuously: a request added between two `step()` calls joins the running
batch, and a finished sequence frees its slot at once. This class keeps Tidal's side of it: which
group each vLLM request belongs to, the tokens, log-probs and weights version of every sequence,
and when a group is complete. Each sample of a group is its own vLLM request (its own seed; prefix
caching shares the prompt), streamed back token by token (RequestOutputKind.DELTA).

Abort / resume: `suspend` takes every in-flight sequence out of vLLM (aborted there, kept here
with its tokens); the next `step` adds each back with prompt + the tokens it already has as its
prompt and the rest of its budget as max_tokens, so vLLM re-prefills it and it continues. The engine
suspends its streams itself before new weights are loaded (so the prefix cache can be emptied: no
request holds old-weight blocks) and before a one-shot `generate` shares its scheduler; `rebuild`
(after a weight update) is a suspend. Tokens keep the version that sampled them. Admission is
bounded by `max_num_seqs` sequences, so vLLM's own queue never holds work Tidal cannot account for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tidal.workers.engines.base import sample_seed
from tidal.workers.engines.requests import (
    GroupResult,
    Request,
    RequestQueue,
    SequenceState,
    StragglerPolicy,
)
from tidal.workers.engines.vllm.engine import token_log_probs

if TYPE_CHECKING:
    from tidal.workers.engines.vllm.engine import VLLMEngine


class VLLMContinuous(RequestQueue):
    def __init__(
        self, engine: VLLMEngine, version: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(engine.max_num_seqs, "rollout.backend.max_num_seqs", version, clock)
        self.engine = engine
        self.core = engine.llm.llm_engine
        self._open: list[SequenceState] = []  # admitted and unfinished, in admission order
        self._live: dict[str, SequenceState] = {}  # vLLM request id -> the sequence it samples now
        self._serial = 0
        engine.streams.add(self)

    @property
    def num_running(self) -> int:
        return len(self._open)

    def check(self, request: Request) -> None:
        super().check(request)
        need = len(request.prompt_ids) + request.sampling.max_new_tokens
        if need > self.engine.max_model_len:
            raise ValueError(
                f"request {request.rid!r}: {len(request.prompt_ids)} prompt tokens + max_new_tokens="
                f"{request.sampling.max_new_tokens} exceed the engine's max_model_len={self.engine.max_model_len}; "
                "shorten the prompt or raise rollout.backend.max_model_len"
            )

    def step(self, admit: bool = True) -> list[GroupResult]:
        if admit:
            self._admit()
        live = set(map(id, self._live.values()))
        for seq in self._open:
            if id(seq) not in live:  # suspended: continue it from its tokens
                self._add(seq)
        if not self._live:
            return []
        results = []
        for output in self.core.step():
            seq = self._live.get(output.request_id)
            if seq is None:  # aborted in this step (straggler cap, rebuild)
                continue
            sample = output.outputs[0]
            new = list(sample.token_ids)
            seq.ids += new
            seq.log_probs += token_log_probs(new, sample.logprobs)
            seq.versions += [self.version] * len(new)
            self.num_generated_tokens += len(new)
            if output.finished:
                del self._live[output.request_id]
                self._open.remove(seq)
                seq.done = True
                group = seq.group
                group.num_open -= 1
                if group.num_open == 0:
                    results.append(self._finish(group, "done"))
        return results

    def expire(self, timeout_s: float, policy: StragglerPolicy) -> list[GroupResult]:
        results = []
        for group in self.late(timeout_s):
            self._abort(group.seqs)
            self._open = [seq for seq in self._open if seq.group is not group]
            results.append(self._end_late(group, policy))
        return results

    def rebuild(self) -> None:
        """Continue every in-flight sequence under the weights just loaded: out of vLLM now, back in
        (prompt + its tokens) at the next step."""
        self.suspend()

    def suspend(self) -> None:
        """Take every in-flight sequence out of vLLM; it stays open here and resumes at the next step."""
        self._abort(list(self._live.values()))

    def close(self) -> None:
        """Abort what this stream still has in vLLM and stop answering for it (the engine forgets it)."""
        self.suspend()
        self.engine.streams.discard(self)

    # ------------------------------------------------------------------ helpers

    def _admit(self) -> None:
        for group in self.take_admissible(self.engine.max_num_seqs - len(self._open)):
            self._open.extend(group.seqs)
            for seq in group.seqs:
                self._add(seq)

    def _add(self, seq: SequenceState) -> None:
        """Hand `seq` to vLLM: its prompt plus the tokens it already has, for the rest of its budget."""
        group = seq.group
        request = group.request
        index = group.seqs.index(seq)
        seed = None if request.seed is None else sample_seed(request.seed, index, len(seq.ids))
        params = self.engine.sampling_params(
            request.sampling, request.stop_token_ids, seed, group.max_new - len(seq.ids)
        )
        self._serial += 1
        vllm_id = f"{request.rid}#{index}#{self._serial}"
        prompt = request.prompt_ids.tolist() + seq.ids
        self.core.add_request(vllm_id, {"prompt_token_ids": prompt}, params)
        self._live[vllm_id] = seq

    def _abort(self, seqs: list[SequenceState]) -> None:
        ids = [vllm_id for vllm_id, seq in self._live.items() if seq in seqs]
        if ids:
            self.core.abort_request(ids)
        for vllm_id in ids:
            del self._live[vllm_id]
