import pytest
import torch

from tidal.dataflow.batch import Batch
from tidal.workers.rewards import REWARD_FUNCTIONS
from tidal.workers.rewards.scorer import score_batch, token_rewards_at_last_token


@pytest.mark.parametrize(
    ("response", "truth", "reward"),
    [
        ("82", "82", 1.0),
        ("  82<|endoftext|>", "82", 1.0),
        ("82\n37+45=82", "82", 1.0),
        ("82 is it", "82", 1.0),
        ("-8", "-8", 1.0),
        ("820", "82", 0.0),
        ("8", "82", 0.0),
        ("", "82", 0.0),
        ("the answer is 82", "82", 0.0),
    ],
)
def test_arithmetic_reward(response, truth, reward):
    assert REWARD_FUNCTIONS.get("arithmetic")("37+45=", response, truth) == reward


@pytest.mark.parametrize(
    ("response", "truth", "reward"),
    [
        ("so the total is \\boxed{72}.", "72", 1.0),
        ("3 apples and 5 pears make 8", "8", 1.0),
        ("3 apples and 5 pears make 8", "3", 0.0),
        ("half: \\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("x = 1/2", "\\frac{1}{2}", 1.0),
        ("no number here", "72", 0.0),
    ],
)
def test_math_verify_reward(response, truth, reward):
    assert REWARD_FUNCTIONS.get("math_verify")("q", response, truth) == reward


def test_math_verify_rejects_an_unparsable_ground_truth():
    with pytest.raises(ValueError, match="cannot parse the ground truth"):
        REWARD_FUNCTIONS.get("math_verify")("q", "72", "")


def test_builtin_reward_functions_are_registered_and_a_miss_names_the_field():
    assert {"arithmetic", "math_verify"} <= set(REWARD_FUNCTIONS.names())
    with pytest.raises(ValueError, match=r"reward.function='arithmetc' is not registered; did you mean"):
        REWARD_FUNCTIONS.get("arithmetc")


def test_token_rewards_sit_on_the_last_real_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    out = token_rewards_at_last_token(torch.tensor([1.0, 2.0, 3.0, 4.0]), mask)
    expected = torch.zeros(4, 4)
    expected[0, 2], expected[1, 0], expected[3, 3] = 1.0, 2.0, 4.0
    assert torch.equal(out, expected)


def make_batch(responses, truths):
    n = len(responses)
    mask = torch.zeros(n, 5, dtype=torch.int64)
    for i, r in enumerate(responses):
        mask[i, : min(len(r) + 1, 5)] = 1  # response tokens + EOS
    return Batch.from_dict(
        {"response_mask": mask},
        {"prompt_text": ["p"] * n, "response_text": responses, "ground_truth": truths},
    )


def test_score_batch_captures_exceptions_per_sample():
    def picky(prompt, response, truth):
        if response == "boom":
            raise RuntimeError("cannot score this")
        if response == "nan":
            return float("nan")
        return float(response == truth)

    batch = make_batch(["82", "boom", "7", "nan"], ["82", "1", "8", "1"])
    out, metrics = score_batch(batch, picky)
    assert out["seq_reward"].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert list(out["reward_error"]) == [
        None,
        "RuntimeError: cannot score this",
        None,
        "NonFiniteReward: returned nan",
    ]
    assert out["token_rewards"][0].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert out["token_rewards"].dtype == torch.float32 and out["token_rewards"].shape == (4, 5)
    # The mean is over the samples that were scored: the failed ones carry a placeholder.
    assert metrics == {"reward/mean": 0.5, "reward/num_errors": 2.0}
    # reward.on_error=score: failed samples carry reward.error_score (on their last token too).
    out, metrics = score_batch(batch, picky, error_score=-1.0)
    assert out["seq_reward"].tolist() == [1.0, -1.0, 0.0, -1.0]
    assert out["token_rewards"][1].tolist() == [0.0, 0.0, 0.0, 0.0, -1.0]
    assert metrics == {"reward/mean": 0.5, "reward/num_errors": 2.0}


def test_score_batch_by_name_and_on_an_empty_batch():
    out, metrics = score_batch(make_batch(["82", "83"], ["82", "82"]), "arithmetic")
    assert out["seq_reward"].tolist() == [1.0, 0.0] and metrics["reward/mean"] == 0.5
    empty, metrics = score_batch(make_batch(["x"], ["y"]).slice(0, 0), "arithmetic")
    assert len(empty) == 0 and empty["token_rewards"].shape == (0, 5) and metrics["reward/num_errors"] == 0.0
    with pytest.raises(ValueError, match="pick one of"):
        score_batch(make_batch(["x"], ["y"]), "nonexistent")
