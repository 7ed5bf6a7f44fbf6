"""Rule rewards as parallel Ray tasks, on the session's local cluster (tests/ray/conftest.py)."""

import time

import pytest
import torch

from tidal.config.schema import RewardConfig
from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch
from tidal.workers.rewards.scorer import score_batch, score_in_parallel

pytestmark = pytest.mark.ray


def make_batch(n: int) -> Batch:
    responses = [str(i) if i % 3 else "wrong" for i in range(n)]
    mask = torch.zeros(n, 4, dtype=torch.int64)
    for i in range(n):
        mask[i, : 1 + i % 4] = 1
    return Batch.from_dict(
        {"response_mask": mask, "response_ids": torch.arange(4 * n).view(n, 4)},
        {"prompt_text": ["p"] * n, "response_text": responses, "ground_truth": [str(i) for i in range(n)]},
    )


def test_parallel_scoring_matches_local_scoring():
    batch = make_batch(7)
    expected, expected_metrics = score_batch(batch, "arithmetic")
    rewards, metrics = score_in_parallel(
        batch, RewardConfig(function="arithmetic", num_parallel=3, timeout_s=120)
    )
    assert [s.num_rows for s in rewards.parts[0]] == [3, 2, 2]
    got = rewards.fetch()
    assert torch.equal(got["seq_reward"], expected["seq_reward"])
    assert torch.equal(got["token_rewards"], expected["token_rewards"])
    assert metrics["reward/mean"] == pytest.approx(expected_metrics["reward/mean"])
    assert metrics["reward/num_errors"] == 0 and metrics["reward/num_timeouts"] == 0
    assert metrics["reward/error_share"] == 0

    # A DistributedBatch input is read by reference and the result unions back onto it.
    distributed = DistributedBatch.from_batch(batch, num_shards=2)
    rewards, _ = score_in_parallel(distributed, RewardConfig(num_parallel=2, timeout_s=120))
    joined = distributed.union(rewards).fetch()
    assert torch.equal(joined["seq_reward"], expected["seq_reward"])
    assert torch.equal(joined["response_ids"], batch["response_ids"])


def test_a_chunk_past_the_timeout_is_flagged_and_the_rest_is_kept():
    def slow_on_zero(prompt, response, truth):  # local function: pickled by value into the tasks
        if truth == "0":
            time.sleep(120)
        if truth == "5":
            raise KeyError("odd")
        return float(response == truth)

    batch = make_batch(6)
    # Warm the task workers first so that only the sleeping chunk can miss the deadline.
    score_in_parallel(batch.slice(1, 6), RewardConfig(num_parallel=2, timeout_s=120), reward_fn=slow_on_zero)
    start = time.monotonic()
    rewards, metrics = score_in_parallel(
        batch, RewardConfig(num_parallel=2, timeout_s=10), reward_fn=slow_on_zero
    )
    assert time.monotonic() - start < 60
    got = rewards.fetch()
    assert list(got["reward_error"]) == ["timeout"] * 3 + [None, None, "KeyError: 'odd'"]
    assert got["seq_reward"].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert got["token_rewards"].shape == (6, 4) and got["token_rewards"][:3].abs().sum() == 0
    assert metrics == {
        "reward/mean": pytest.approx(1 / 2),  # over the two samples that were scored
        "reward/num_errors": 4.0,
        "reward/num_timeouts": 3.0,
        "reward/error_share": pytest.approx(4 / 6),
    }
