import operator

import pytest

from tidal.config.schema import ArithmeticTask
from tidal.tasks.arithmetic import make_split, make_splits, num_problems, problem_at

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def solve(prompt: str) -> str:
    """Independent oracle: split at the operator after the first digit (operands are non-negative)."""
    body = prompt.removesuffix("=")
    i = next(i for i, c in enumerate(body) if i > 0 and c in OPS)
    return str(OPS[body[i]](int(body[:i]), int(body[i + 1 :])))


def test_answers_are_correct_for_every_operation():
    task = ArithmeticTask(max_digits=3, operations=["+", "-", "*"], num_train=500, num_val=50, seed=7)
    train, val = make_splits(task)
    for problem in train + val:
        assert problem.prompt.endswith("=")
        assert problem.answer == solve(problem.prompt)
    assert {p.prompt[1:].lstrip("0123456789")[0] for p in train} == {"+", "-", "*"}
    assert any(p.answer.startswith("-") for p in train)  # subtraction may go negative


def test_splits_are_deterministic_distinct_and_disjoint():
    task = ArithmeticTask(num_train=3000, num_val=200, seed=3)
    train, val = make_splits(task)
    assert (train, val) == make_splits(task)
    assert len(train) == 3000 and len(val) == 200
    assert len({p.prompt for p in train}) == 3000 and len({p.prompt for p in val}) == 200
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    other_train, _ = make_splits(task.model_copy(update={"seed": 4}))
    assert other_train != train
    assert make_split(task, "val") == val


def test_train_is_capped_by_the_size_of_the_space():
    # 1-digit addition has 100 problems: 10 go to val, the other 90 (each once) to train.
    task = ArithmeticTask(max_digits=1, num_train=1000, num_val=10)
    train, val = make_splits(task)
    assert num_problems(task) == 100
    assert len(train) == 90 and len({p.prompt for p in train + val}) == 100


def test_problem_numbering_covers_operands_and_operations():
    task = ArithmeticTask(max_digits=2, operations=["+", "*"])
    assert problem_at(task, 0).prompt == "0+0="
    assert problem_at(task, 1).prompt == "0*0="
    last = problem_at(task, num_problems(task) - 1)
    assert last.prompt == "99*99=" and last.answer == "9801"


def test_too_many_val_problems_is_a_user_error():
    with pytest.raises(ValueError, match="num_val=100"):
        make_splits(ArithmeticTask(max_digits=1, num_val=100))
    with pytest.raises(ValueError, match="split='test'"):
        make_split(ArithmeticTask(), "test")
