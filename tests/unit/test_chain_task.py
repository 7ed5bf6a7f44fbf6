"""The chained-sum task (tidal/tasks/chain.py): answers, splits, the length tail, the reward."""

from __future__ import annotations

import json
import statistics

import pytest

from tidal.tasks.chain import ChainTask, chain_answer, make_chain_splits, response_tokens, write_jsonl
from tidal.workers.rewards.arithmetic import arithmetic_reward


def test_chain_answer_carries_the_running_sum():
    assert chain_answer([3, 5]) == "8"
    assert chain_answer([3, 5, 9, 2]) == "8+9=17+2=19"
    with pytest.raises(ValueError, match="two operands"):
        chain_answer([3])


def test_splits_are_deterministic_disjoint_and_right():
    task = ChainTask(num_train=2000, num_val=200)
    train, val = make_chain_splits(task)
    assert (train, val) == make_chain_splits(task)
    assert len(train) == 2000 and len(val) == 200
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    for p in train[:200]:
        operands = [int(x) for x in p.prompt.rstrip("=").split("+")]
        assert p.answer.split("=")[-1] == str(sum(operands))
        assert p.answer == chain_answer(operands)


def test_response_lengths_are_long_tailed():
    train, _ = make_chain_splits(ChainTask(num_train=5000, num_val=10))
    lengths = sorted(response_tokens(p) for p in train)
    median, p99 = statistics.median(lengths), lengths[int(0.99 * len(lengths))]
    assert median <= 8 and p99 >= 4 * median
    assert max(lengths) <= 48  # 10 additions of single digits, EOS included
    short_only, _ = make_chain_splits(ChainTask(num_train=500, num_val=10, sigma=0.0))
    assert {p.answer.count("=") for p in short_only} == {0}  # sigma 0: one addition each


def test_reward_matches_the_whole_chain(tmp_path):
    assert arithmetic_reward("3+5+9+2=", "8+9=17+2=19", "8+9=17+2=19") == 1.0
    assert arithmetic_reward("3+5+9+2=", "8+9=17+2=18", "8+9=17+2=19") == 0.0
    assert arithmetic_reward("3+5+9+2=", "8", "8+9=17+2=19") == 0.0
    train, _ = make_chain_splits(ChainTask(num_train=3, num_val=1))
    rows = [json.loads(line) for line in write_jsonl(train, tmp_path / "t.jsonl").read_text().splitlines()]
    assert rows[0] == {"prompt": train[0].prompt, "reward_model": {"ground_truth": train[0].answer}}


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="max_additions"):
        ChainTask(max_additions=0)
    with pytest.raises(ValueError, match="sigma"):
        ChainTask(sigma=-1.0)
