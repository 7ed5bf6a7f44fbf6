"""The rollout role's samples, and the behaviour log-probs it records, against a full forward.

The trainer recomputes log-probs with one forward over prompt + response; PPO's importance ratio
is only meaningful if the rollout recorded the same numbers for the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from char_model import CHARS, EOS, PAD, build_char_model, full_forward_log_probs, prompts

from tidal.config.schema import (
    ArithmeticTask,
    DataConfig,
    JobConfig,
    ModelConfig,
    RolloutConfig,
    SamplingConfig,
)
from tidal.dataflow.batch import Batch
from tidal.workers.context import WorkerContext
from tidal.workers.endpoint import Dispatch, endpoint_spec
from tidal.workers.engines.embedded.engine import EmbeddedEngine
from tidal.workers.engines.embedded.linear import packing_available
from tidal.workers.roles.rollout import RolloutRole

SAMPLING = SamplingConfig(temperature=0.7, top_k=12, top_p=0.95, max_new_tokens=10, n=3)


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_char_model(tmp_path_factory.mktemp("tiny_qwen2"), hidden_size=64)


def make_role(model_dir: Path, dp_rank: int = 0) -> RolloutRole:
    cfg = JobConfig(
        model=ModelConfig(path=str(model_dir)),
        data=DataConfig(task=ArithmeticTask()),
        rollout=RolloutConfig(sampling=SAMPLING),
    )
    ctx = WorkerContext(
        rank=dp_rank, world_size=2, dp_rank=dp_rank, dp_size=2, device=torch.device("cpu"), backend="gloo"
    )
    return RolloutRole(cfg, ctx)


def test_generate_is_a_dp_split_endpoint() -> None:
    assert endpoint_spec(RolloutRole, "generate").dispatch is Dispatch.DP_SPLIT


@pytest.mark.parametrize(
    "engine_options",
    [
        pytest.param(None, id="role-default"),
        pytest.param({"impl": "fast", "pack_weights": True}, id="fast-packed"),
        pytest.param({"impl": "hf"}, id="hf-forward"),
    ],
)
def test_rollout_log_probs_match_a_full_forward(model_dir: Path, engine_options: dict | None) -> None:
    role = make_role(model_dir)
    if engine_options is not None:
        if engine_options.get("pack_weights") and not packing_available(torch.float32):
            pytest.skip("this torch build has no oneDNN linear ops")
        role.engine = EmbeddedEngine(model_dir, **engine_options)
    batch = prompts(role.engine.tokenizer, ["12+7=", "3+4=", "99+1=", "5="])
    out = role.generate(batch, seed=11)

    lengths = out["response_mask"].sum(-1)
    assert (lengths < SAMPLING.max_new_tokens).any() and (lengths == SAMPLING.max_new_tokens).any()
    expected = full_forward_log_probs(model_dir, out, SAMPLING.temperature)
    diff = (out["rollout_log_probs"] - expected).abs().max().item()
    assert diff < 1e-4, f"max |rollout - full forward| = {diff}"
    assert out["rollout_log_probs"].dtype == torch.float32


def test_greedy_log_probs_are_taken_at_temperature_one(model_dir: Path) -> None:
    role = make_role(model_dir)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8, n=1)
    out = role.generate(prompts(role.engine.tokenizer, ["12+7=", "3+4="]), sampling=greedy)
    expected = full_forward_log_probs(model_dir, out, 1.0)
    assert (out["rollout_log_probs"] - expected).abs().max().item() < 1e-4


def test_output_layout_columns_and_text(model_dir: Path) -> None:
    role = make_role(model_dir)
    batch = prompts(role.engine.tokenizer, ["12+7=", "3+4=", "99+1="])
    out = role.generate(batch, seed=3, policy_version=7)

    assert len(out) == 3 * SAMPLING.n
    assert list(out["uid"]) == ["u0"] * 3 + ["u1"] * 3 + ["u2"] * 3  # interleaved: a a a b b b ...
    assert list(out["ground_truth"]) == ["0"] * 3 + ["1"] * 3 + ["2"] * 3
    assert torch.equal(out["prompt_ids"], batch["prompt_ids"].repeat_interleave(3, 0))
    for key in ("response_ids", "response_mask", "rollout_log_probs", "policy_version", "response_text"):
        assert key in out
    assert out["policy_version"].dtype == torch.int64 and (out["policy_version"] == 7).all()
    assert out["response_ids"].dtype == torch.int64
    for row in range(len(out)):
        ids = out["response_ids"][row][out["response_mask"][row].bool()].tolist()
        expected_text = "".join(CHARS[i - 2] for i in ids if i not in (PAD, EOS))
        assert out["response_text"][row] == expected_text
    # n samples of one prompt are not all copies of each other.
    assert not all(torch.equal(out["response_ids"][0], out["response_ids"][i]) for i in (1, 2))


def test_seeded_per_rank_reproducible_and_versions_follow_loaded_weights(model_dir: Path) -> None:
    role0, role1 = make_role(model_dir, 0), make_role(model_dir, 1)
    batch = prompts(role0.engine.tokenizer, ["12+7=", "3+4=", "99+1=", "5="])
    a, b = role0.generate(batch, seed=5), role0.generate(batch, seed=5)
    assert torch.equal(a["response_ids"], b["response_ids"])
    assert torch.equal(a["rollout_log_probs"], b["rollout_log_probs"])
    assert not torch.equal(a["response_ids"], role0.generate(batch, seed=6)["response_ids"])
    assert not torch.equal(a["response_ids"], role1.generate(batch, seed=5)["response_ids"])

    assert (a["policy_version"] == 0).all()
    weights = {name: p.detach() * 1.01 for name, p in role0.engine.model.named_parameters()}
    role0.load_weights(weights.items(), version=4)
    c = role0.generate(batch, seed=5)
    assert (c["policy_version"] == 4).all()
    assert not torch.equal(a["rollout_log_probs"], c["rollout_log_probs"])


def test_empty_batch_returns_empty_batch_with_all_columns(model_dir: Path) -> None:
    role = make_role(model_dir)
    batch = prompts(role.engine.tokenizer, ["12+7=", "3+4="]).slice(0, 0)
    out = role.generate(batch)
    assert len(out) == 0
    assert set(out.keys()) == set(batch.keys()) | {
        "response_ids",
        "response_mask",
        "rollout_log_probs",
        "policy_version",
        "response_text",
    }
    assert out["response_ids"].dtype == torch.int64 and out["rollout_log_probs"].dtype == torch.float32
    assert isinstance(out["response_text"], np.ndarray)


def test_missing_prompt_columns_is_a_clear_error(model_dir: Path) -> None:
    role = make_role(model_dir)
    with pytest.raises(ValueError, match="prompt_mask"):
        role.generate(Batch.from_dict({"prompt_ids": torch.ones(2, 3, dtype=torch.long)}))
