"""Continuous batching and interruptible streaming generation against the one-shot engine.

The reference is `EmbeddedEngine.generate` on one prompt alone: with greedy decoding a request
must produce the same tokens however it shared the batch (joining mid-flight, neighbours ending
early) and however often it was interrupted, and after a weight update its tokens must be the new
weights' greedy continuation of what it had.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from test_embedded_engine import build_model_dir, left_padded_prompts
from transformers import AutoModelForCausalLM

from tidal.config.schema import (
    ArithmeticTask,
    DataConfig,
    JobConfig,
    ModelConfig,
    RolloutConfig,
    SamplingConfig,
)
from tidal.config.streaming import StreamingConfig
from tidal.dataflow.batch import Batch
from tidal.workers.context import WorkerContext
from tidal.workers.endpoint import Collect, Dispatch, EndpointSpec, endpoint_spec
from tidal.workers.engines.embedded.continuous import ContinuousBatcher
from tidal.workers.engines.embedded.engine import EmbeddedEngine
from tidal.workers.engines.requests import GroupResult, Request
from tidal.workers.engines.streaming import StreamingGenerator
from tidal.workers.roles.rollout import RolloutRole

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)
# Long enough that a pause requested a few tokens in lands mid-response even on a busy machine.
LONG = SamplingConfig(temperature=0.0, max_new_tokens=150)


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("old"))


@pytest.fixture(scope="module")
def new_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    path = build_model_dir(tmp_path_factory.mktemp("new"), seed=1)
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def prompts(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    ids, mask = left_padded_prompts(lengths, seed)
    return [ids[row][mask[row].bool()] for row in range(len(lengths))]


def reference(engine: EmbeddedEngine, prompt: torch.Tensor, sampling: SamplingConfig, stops: list[int]):
    """(tokens, log-probs) of the one-shot engine on this prompt alone."""
    out = engine.generate(prompt[None], torch.ones(1, len(prompt), dtype=torch.long), sampling, stops)
    length = int(out.response_mask.sum())
    return out.response_ids[0, :length].tolist(), out.log_probs[0, :length]


def run_to_end(batcher: ContinuousBatcher, pending: list[Request] = (), every: int = 1) -> dict:
    """Step until idle, submitting one of `pending` every `every` steps (requests join mid-flight)."""
    pending, results, step = list(pending), {}, 0
    while batcher.num_running or batcher.num_queued or pending:
        if pending and step % every == 0:
            batcher.submit(pending.pop(0))
        results.update({r.request.rid: r for r in batcher.step()})
        step += 1
    return results


@pytest.mark.parametrize("impl", ["fast", "hf"])
def test_greedy_tokens_equal_the_one_shot_engine_on_each_prompt_alone(model_dir: Path, impl: str) -> None:
    engine = EmbeddedEngine(model_dir, impl=impl, max_batch_size=5)  # 5 slots for 15 sequences: a queue
    stops = engine.eos_token_ids
    texts = prompts([3, 7, 1, 5, 7, 2, 4, 6, 9, 2])
    requests = [Request(i, p, 1 + i % 2, GREEDY, stops) for i, p in enumerate(texts)]
    batcher = ContinuousBatcher(engine)
    for request in requests[:4]:
        batcher.submit(request)
    results = run_to_end(batcher, requests[4:], every=3)
    assert engine.forward.cache is None  # the batch emptied: nothing left behind

    lengths = []
    for i, prompt in enumerate(texts):
        tokens, log_probs = reference(engine, prompt, GREEDY, stops)
        assert results[i].status == "done" and len(results[i].response_ids) == 1 + i % 2
        for ids, lps in zip(results[i].response_ids, results[i].log_probs):
            assert ids == tokens, f"request {i}"
            torch.testing.assert_close(torch.tensor(lps), log_probs, atol=1e-4, rtol=0)
        lengths.append(len(tokens))
    # Both endings happen, so rows leave the batch while others keep going and new ones join.
    assert min(lengths) < GREEDY.max_new_tokens and max(lengths) == GREEDY.max_new_tokens
    assert batcher.num_generated_tokens == sum(n * (1 + i % 2) for i, n in enumerate(lengths))


def test_sampled_requests_depend_on_their_seed_not_on_their_neighbours(model_dir: Path) -> None:
    engine = EmbeddedEngine(model_dir, max_batch_size=12)
    sampling = SamplingConfig(temperature=0.9, top_k=10, top_p=0.95, max_new_tokens=10)
    hotter = SamplingConfig(temperature=1.3, max_new_tokens=10)
    texts = prompts([4, 6, 2, 5])
    stops = engine.eos_token_ids

    def request(i: int, seed: int, config: SamplingConfig = sampling) -> Request:
        return Request(i, texts[i], 3, config, stops, seed=seed)

    alone = run_to_end(ContinuousBatcher(engine), [request(0, 7)])[0]
    # Neighbours with the same settings, other settings, greedy, and the global generator.
    crowd = run_to_end(
        ContinuousBatcher(engine),
        [
            request(1, 1),
            request(0, 7),
            request(2, 2, hotter),
            Request(3, texts[3], 2, GREEDY, stops),
            Request(4, texts[1], 1, sampling, stops),
        ],
    )
    assert crowd[0].response_ids == alone.response_ids
    torch.testing.assert_close(torch.tensor(crowd[0].log_probs[0]), torch.tensor(alone.log_probs[0]))
    assert crowd[3].response_ids == [reference(engine, texts[3], GREEDY, stops)[0]] * 2
    assert len(crowd[2].response_ids) == 3 and len(crowd[4].response_ids) == 1
    other_seed = run_to_end(ContinuousBatcher(engine), [request(0, 8)])[0]
    assert other_seed.response_ids != alone.response_ids


def test_rebuild_under_the_same_weights_reproduces_an_uninterrupted_run(model_dir: Path) -> None:
    engine = EmbeddedEngine(model_dir, max_batch_size=6)
    texts = prompts([5, 2, 8, 3])
    expected = run_to_end(
        ContinuousBatcher(engine),
        [Request(i, p, 2, GREEDY, engine.eos_token_ids) for i, p in enumerate(texts)],
    )

    batcher = ContinuousBatcher(engine)
    for request in [Request(i, p, 2, GREEDY, engine.eos_token_ids) for i, p in enumerate(texts)]:
        batcher.submit(request)
    results, step = {}, 0
    while batcher.num_running or batcher.num_queued:
        if step in (2, 3, 7):
            batcher.rebuild()
        results.update({r.request.rid: r for r in batcher.step()})
        step += 1
    for rid, result in expected.items():
        assert results[rid].response_ids == result.response_ids
        for a, b in zip(results[rid].log_probs, result.log_probs):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-4, rtol=0)


@pytest.mark.parametrize("impl", ["fast", "hf"])
def test_new_weights_mid_response_continue_as_the_new_policy_and_stamp_versions(
    model_dir: Path, new_weights: dict, impl: str
) -> None:
    engine = EmbeddedEngine(model_dir, impl=impl, max_batch_size=8)
    texts = prompts([5, 2, 8, 3])
    batcher = ContinuousBatcher(engine)
    for i, prompt in enumerate(texts):
        batcher.submit(Request(i, prompt, 1, GREEDY, []))  # no stop: every response runs 12 tokens
    switch = 5
    for _ in range(switch):
        assert batcher.step() == []
    partial = {row.group.request.rid: list(row.ids) for row in batcher.rows}
    engine.load_weights(new_weights.items())
    batcher.version = 3
    batcher.rebuild()
    results = run_to_end(batcher)

    for i, prompt in enumerate(texts):
        result = results[i]
        assert result.response_ids[0][:switch] == partial[i]
        assert result.versions[0] == [0] * switch + [3] * (GREEDY.max_new_tokens - switch)
        assert result.min_version == 0
        rest = SamplingConfig(temperature=0.0, max_new_tokens=GREEDY.max_new_tokens - switch)
        tokens, log_probs = reference(engine, torch.cat([prompt, torch.tensor(partial[i])]), rest, [])
        assert result.response_ids[0][switch:] == tokens, f"request {i}"
        torch.testing.assert_close(torch.tensor(result.log_probs[0][switch:]), log_probs, atol=1e-4, rtol=0)
        tensors = result.tensors(16, engine.pad_token_id)
        assert tensors["token_versions"][0].tolist() == result.versions[0] + [0] * 4
        assert tensors["response_mask"][0].tolist() == [1] * 12 + [0] * 4


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_stragglers_are_truncated_or_dropped_after_the_group_timeout(model_dir: Path, policy: str) -> None:
    engine = EmbeddedEngine(model_dir, max_batch_size=4)
    clock = Clock()
    batcher = ContinuousBatcher(engine, clock=clock)
    texts = prompts([4, 6, 3])
    batcher.submit(Request("early", texts[0], 2, LONG, []))
    batcher.step()
    clock.now = 5.0
    batcher.submit(Request("late", texts[1], 2, LONG, []))
    batcher.submit(Request("queued", texts[2], 2, LONG, []))  # no free slot: waiting does not count
    batcher.step()
    assert batcher.num_running == 4 and batcher.num_queued == 1
    clock.now = 10.5  # "early" started 10.5 s ago, "late" 5.5 s ago
    (cut,) = batcher.expire(10.0, policy)
    assert cut.request.rid == "early" and cut.status == ("truncated" if policy == "truncate" else "dropped")
    if policy == "truncate":
        assert [len(ids) for ids in cut.response_ids] == [2, 2] and cut.truncated == [True, True]
        assert cut.tensors(LONG.max_new_tokens, engine.pad_token_id)["truncated"].tolist() == [True, True]
    else:
        assert cut.response_ids == [] and cut.num_response_tokens == 0
    assert batcher.num_running == 2 and batcher.pending_ids() == ["queued", "late"]
    batcher.step()  # the freed slots go to the queued request, which starts now
    assert batcher.num_running == 4 and batcher.expire(10.0, policy) == []
    clock.now = 16.0
    assert [r.request.rid for r in batcher.expire(10.0, policy)] == ["late"]
    rest = run_to_end(batcher)
    assert rest["queued"].status == "done" and rest["queued"].truncated == [False, False]


def test_rejects_requests_that_cannot_run(model_dir: Path) -> None:
    engine = EmbeddedEngine(model_dir, max_batch_size=4)
    batcher = ContinuousBatcher(engine)
    with pytest.raises(ValueError, match="num_samples=5"):
        batcher.submit(Request("a", prompts([3])[0], 5, GREEDY, []))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        batcher.submit(Request("a", torch.zeros(1, 3, dtype=torch.long), 1, GREEDY, []))
    batcher.submit(Request("a", prompts([3])[0], 1, GREEDY, []))
    with pytest.raises(ValueError, match="already queued"):
        batcher.submit(Request("a", prompts([3])[0], 1, GREEDY, []))


# ---------------------------------------------------------------------------------- the thread


class Sink:
    def __init__(self, fail_on: str | None = None) -> None:
        self.results: dict[str, GroupResult] = {}
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, result: GroupResult) -> None:
        if result.request.rid == self.fail_on:
            raise OSError("the store is unreachable")
        with self.lock:
            self.results[result.request.rid] = result


def poll_until(generator: StreamingGenerator, done: set, timeout_s: float = 20.0) -> list:
    finished, deadline = [], time.monotonic() + timeout_s
    while {f[0] for f in finished} < done:
        assert time.monotonic() < deadline, f"still waiting for {done - {f[0] for f in finished}}"
        finished += generator.poll()["finished"]
        time.sleep(0.005)
    return finished


def test_weight_update_through_pause_and_resume(model_dir: Path, new_weights: dict) -> None:
    engine = EmbeddedEngine(model_dir, max_batch_size=8)
    sink = Sink()
    generator = StreamingGenerator(ContinuousBatcher(engine), sink, name="rollout rank 3").start()
    texts = prompts([5, 2, 8, 3])
    generator.submit([Request(i, p, 2, LONG, []) for i, p in enumerate(texts)])
    while generator.batcher.num_generated_tokens < 8 * 4:  # a few tokens into every response
        time.sleep(0.001)
    generator.pause(drain=False, timeout_s=10)
    engine.load_weights(new_weights.items())
    generator.resume(version=1)
    finished = poll_until(generator, set(range(4)))
    stats = generator.poll()
    assert generator.stop(timeout_s=10) == []

    assert sorted(f[0] for f in finished) == [0, 1, 2, 3]
    assert all(
        f[1] == 2 and f[2] == "done" and f[3] == 0 and f[4] == 2 * LONG.max_new_tokens for f in finished
    )
    assert stats["generated_tokens"] == 4 * 2 * LONG.max_new_tokens and stats["weights_version"] == 1
    assert stats["finished_groups"] == 4 and stats["running_sequences"] == 0 and stats["busy_s"] > 0
    for i, prompt in enumerate(texts):
        result = sink.results[i]
        # Greedy samples of one prompt are equal, and the pause hit both at the same token.
        assert result.response_ids[0] == result.response_ids[1] and result.versions[0] == result.versions[1]
        ids, versions, lps = result.response_ids[0], result.versions[0], result.log_probs[0]
        switch = versions.index(1)  # wherever the pause landed, the versions switch once
        assert 4 <= switch < LONG.max_new_tokens and versions == [0] * switch + [1] * (len(ids) - switch)
        rest = SamplingConfig(temperature=0.0, max_new_tokens=LONG.max_new_tokens - switch)
        tokens, log_probs = reference(engine, torch.cat([prompt, torch.tensor(ids[:switch])]), rest, [])
        assert ids[switch:] == tokens
        torch.testing.assert_close(torch.tensor(lps[switch:]), log_probs, atol=1e-4, rtol=0)


def test_drain_finishes_in_flight_sequences_under_the_old_weights(model_dir: Path) -> None:
    engine = EmbeddedEngine(model_dir, max_batch_size=2)
    sink = Sink()
    generator = StreamingGenerator(ContinuousBatcher(engine), sink, name="rollout rank 0").start()
    texts = prompts([5, 2, 8])
    generator.submit([Request(i, p, 1, LONG, []) for i, p in enumerate(texts)])
    while generator.batcher.num_generated_tokens < 4:
        time.sleep(0.001)
    generator.pause(drain=True, timeout_s=10)
    # Parked only once the two running sequences ended; the third request waits in the queue.
    assert generator.batcher.num_running == 0 and generator.batcher.pending_ids() == [2]
    generator.resume(version=5)
    poll_until(generator, {0, 1, 2})
    generator.stop(timeout_s=10)
    width = LONG.max_new_tokens
    assert sink.results[0].versions == [[0] * width] and sink.results[1].versions == [[0] * width]
    assert sink.results[2].versions == [[5] * width]


def test_waits_time_out_naming_the_rank_and_what_they_waited_for(model_dir: Path) -> None:
    engine = EmbeddedEngine(model_dir, max_batch_size=2)
    generator = StreamingGenerator(ContinuousBatcher(engine), Sink(), name="rollout rank 7").start()
    long = SamplingConfig(temperature=0.0, max_new_tokens=4000)
    generator.submit([Request(0, prompts([3])[0], 1, long, [])])
    while generator.batcher.num_running == 0:
        time.sleep(0.001)
    with pytest.raises(TimeoutError, match=r"rollout rank 7: pause waited 0.01s .* finish its in-flight"):
        generator.pause(drain=True, timeout_s=0.01)
    assert generator.stop(timeout_s=10) == [0]  # the loop kept going after the failed pause


def test_stop_returns_what_did_not_finish(model_dir: Path) -> None:
    engine = EmbeddedEngine(model_dir, max_batch_size=3)
    sink = Sink()
    generator = StreamingGenerator(ContinuousBatcher(engine), sink, name="rollout rank 0").start()
    texts = prompts([3, 4, 5, 6, 7])
    very_long = SamplingConfig(temperature=0.0, max_new_tokens=400)
    generator.submit(
        [Request(f"u{i}", p, 1, GREEDY if i == 0 else very_long, []) for i, p in enumerate(texts)]
    )
    poll_until(generator, {"u0"})
    generator.pause(drain=False, timeout_s=10)
    unfinished = generator.stop(timeout_s=10)
    finished = {f[0] for f in generator.poll()["finished"]} | {"u0"}
    assert set(unfinished) | finished == {f"u{i}" for i in range(5)} and not set(unfinished) & finished
    assert {"u1", "u2", "u4"} <= set(unfinished)  # u4 has no slot before one of u1, u2, u3 ends
    with pytest.raises(RuntimeError, match="rollout rank 0: the streaming generator is stopped"):
        generator.submit([Request("u9", texts[0], 1, GREEDY, [])])


def test_errors_of_the_background_threads_reach_the_caller(model_dir: Path) -> None:
    engine = EmbeddedEngine(model_dir, max_batch_size=4)
    generator = StreamingGenerator(
        ContinuousBatcher(engine), Sink(fail_on="bad"), name="rollout rank 2"
    ).start()
    texts = prompts([3, 4])
    generator.submit([Request("good", texts[0], 1, GREEDY, []), Request("bad", texts[1], 1, GREEDY, [])])
    deadline = time.monotonic() + 20
    with pytest.raises(
        RuntimeError, match=r"rollout rank 2: the streaming generator failed: OSError: the store"
    ) as err:
        while time.monotonic() < deadline:
            generator.poll()
            time.sleep(0.005)
    assert isinstance(err.value.__cause__, OSError)
    with pytest.raises(RuntimeError, match="rollout rank 2"):
        generator.stop(timeout_s=10)  # still reported: an error is never lost

    broken = StreamingGenerator(ContinuousBatcher(engine), Sink(), name="rollout rank 5")
    broken.batcher.step = lambda admit=True: 1 / 0  # a failure inside the decode loop itself
    broken.start().submit([Request("x", texts[0], 1, GREEDY, [])])
    broken._loop.join(10)
    with pytest.raises(RuntimeError, match="rollout rank 5: .*ZeroDivisionError"):
        broken.poll()
    with pytest.raises(RuntimeError, match="rollout rank 5: .*ZeroDivisionError"):
        broken.stop(timeout_s=10)  # ends the delivery thread too, and still reports the failure
    assert not broken._delivery.is_alive()


def test_straggler_drop_is_reported_by_poll(model_dir: Path) -> None:
    engine = EmbeddedEngine(model_dir, max_batch_size=4)
    clock = Clock()
    sink = Sink()
    generator = StreamingGenerator(
        ContinuousBatcher(engine, clock=clock), sink, name="r", group_timeout_s=1.0, straggler_policy="drop"
    ).start()
    generator.submit(
        [Request("slow", prompts([3])[0], 2, SamplingConfig(temperature=0.0, max_new_tokens=4000), [])]
    )
    while generator.batcher.num_running == 0:
        time.sleep(0.001)
    clock.now = 2.0
    (report,) = poll_until(generator, {"slow"})
    assert report[:3] == ("slow", 0, "dropped") and "slow" not in sink.results
    assert generator.poll()["dropped_groups"] == 1
    assert generator.stop(timeout_s=10) == []


# ---------------------------------------------------------------------------------- the rollout role


class RecordingStore:
    """StreamStore.put's signature; records the calls (the real store: tests/ray/test_rollout_streaming.py)."""

    def __init__(self) -> None:
        self.puts: list[dict] = []

    def put(self, sample_ids, columns, **kwargs) -> None:
        self.puts.append({"ids": list(sample_ids), "columns": columns, **kwargs})


def make_role(model_dir: Path, max_new_tokens: int = 12) -> RolloutRole:
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, n=2)
    cfg = JobConfig(
        model=ModelConfig(path=str(model_dir)),
        data=DataConfig(task=ArithmeticTask(), max_prompt_length=16),
        rollout=RolloutConfig(sampling=sampling, max_batch_size=4),
    )
    ctx = WorkerContext(
        rank=1, world_size=2, dp_rank=1, dp_size=2, device=torch.device("cpu"), backend="gloo"
    )
    return RolloutRole(cfg, ctx)


def prompt_rows(lengths: list[int], first_uid: int = 0) -> Batch:
    ids, mask = left_padded_prompts(lengths)
    uids = [f"q{first_uid + i}" for i in range(len(lengths))]
    return Batch.from_dict(
        {"prompt_ids": ids, "prompt_mask": mask, "seed": torch.arange(len(lengths)) + 100},
        non_tensors={"uid": uids, "ground_truth": [u.upper() for u in uids]},
    )


def poll_role(role: RolloutRole, num_groups: int) -> list:
    finished, deadline = [], time.monotonic() + 20
    while len(finished) < num_groups:
        assert time.monotonic() < deadline, finished
        finished += role.stream_poll()["finished"]
        time.sleep(0.005)
    return finished


def test_rollout_role_streams_what_generate_returns_into_the_store(
    model_dir: Path, new_weights: dict
) -> None:
    for name in ("stream_start", "stream_poll", "stream_stop"):
        assert endpoint_spec(RolloutRole, name) == EndpointSpec(Dispatch.ALL, Collect.LIST)
    assert endpoint_spec(RolloutRole, "stream_submit") == EndpointSpec(Dispatch.DP_SPLIT, Collect.LIST)
    role, store = make_role(model_dir), RecordingStore()
    role.stream_start(store, StreamingConfig(wait_timeout_s=30, interrupt_on_sync=True))
    batch = prompt_rows([4, 2, 6])
    assert role.stream_submit(batch) == 3
    finished = poll_role(role, 3)
    expected = role.generate(batch)  # while the generator runs: it is paused around the call

    assert sorted(f[0] for f in finished) == ["q0", "q1", "q2"] and all(
        f[1:4] == (2, "done", 0) for f in finished
    )
    assert len(store.puts) == 3
    for put in store.puts:
        uid = put["groups"][0]
        rows = [2 * int(uid[1:]), 2 * int(uid[1:]) + 1]
        got, want = put["columns"], expected.index(rows)
        assert (
            put["ids"] == [f"{uid}/0", f"{uid}/1"] and put["groups"] == [uid, uid] and put["group_size"] == 2
        )
        assert put["producer"] == "rollout rank 1" and put["versions"] == [0, 0] and put["timeout_s"] == 30
        for key in ("response_ids", "response_mask", "rollout_log_probs", "policy_version", "seed"):
            torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=0)
        for key in ("uid", "ground_truth", "response_text"):
            assert list(got[key]) == list(want[key])
        # Prompts are left-padded to data.max_prompt_length, so groups of any submit concatenate.
        assert got["prompt_ids"].shape == (2, 16) and torch.equal(
            got["prompt_ids"][:, -7:], want["prompt_ids"]
        )
        assert int(got["prompt_mask"].sum()) == int(want["prompt_mask"].sum())
        assert torch.equal(got["token_versions"], torch.zeros(2, 12, dtype=torch.long))
        assert got["truncated"].tolist() == [False, False]
        assert put["lengths"] == (got["prompt_mask"].sum(-1) + got["response_mask"].sum(-1)).tolist()

    role.load_weights(new_weights.items(), version=2)  # pauses the (idle) generator
    wide = prompt_rows([5], first_uid=3)  # 20 columns, 5 tokens: stored as the last 16 columns
    wide["prompt_ids"] = torch.nn.functional.pad(wide["prompt_ids"], (14, 0))
    wide["prompt_mask"] = torch.nn.functional.pad(wide["prompt_mask"], (14, 0))
    role.stream_submit(wide)
    ((uid, num, status, min_version, _),) = poll_role(role, 1)
    assert (uid, num, status, min_version) == ("q3", 2, "done", 2)
    assert torch.equal(store.puts[-1]["columns"]["prompt_ids"][0], wide["prompt_ids"][0, -16:])
    with pytest.raises(ValueError, match="17 tokens, more than data.max_prompt_length=16"):
        role.stream_submit(prompt_rows([17], first_uid=8))
    versions = store.puts[-1]["columns"]["token_versions"]
    assert set(versions[store.puts[-1]["columns"]["response_mask"].bool()].tolist()) == {2}
    with pytest.raises(ValueError, match="already queued or running"):
        role.stream_submit(Batch.concat([prompt_rows([3], 7), prompt_rows([3], 7)]))
    assert role.stream_stop() == []
    with pytest.raises(RuntimeError, match="rollout rank 1: no streaming generator is running"):
        role.stream_submit(prompt_rows([3]))


def test_rollout_role_write_weights_mid_generation_and_missing_columns(
    model_dir: Path, new_weights: dict
) -> None:
    role, store = make_role(model_dir, max_new_tokens=300), RecordingStore()
    role.stream_start(store, StreamingConfig(wait_timeout_s=30, interrupt_on_sync=True))
    with pytest.raises(ValueError, match=r"needs batch columns \['seed'\]"):
        role.stream_submit(prompt_rows([3]).select("prompt_ids", "prompt_mask", "uid"))
    role.stop_token_ids = []  # every response runs its 300 tokens: the write lands mid-response
    role.stream_submit(prompt_rows([4, 2]))
    while role.streaming.batcher.num_generated_tokens < 8:
        time.sleep(0.001)

    def write(params: dict[str, torch.Tensor]) -> int:
        for name, param in params.items():
            param.copy_(new_weights[name])
        return len(params)

    assert role.write_weights(write, version=4) == len(dict(role.engine.model.named_parameters()))
    assert role.weights_version == 4
    poll_role(role, 2)
    for put in store.puts:
        for row in put["columns"]["token_versions"].tolist():
            switch = row.index(4)
            assert switch >= 2 and row == [0] * switch + [4] * (300 - switch)
        assert put["versions"] == [0, 0] and put["columns"]["policy_version"].tolist() == [0, 0]
    assert role.stream_stop() == []
