"""The built-in verifiable task: integer arithmetic prompts such as "37+45=" with answer "82".

Problems are numbered: index i picks the operation (i mod #ops) and the two operands (the rest, read
in base 10**max_digits). Drawing distinct indices with a seeded `random.Random.sample` gives a
deterministic, duplicate-free problem set for any size of space (it never lists the space), and
taking validation and training from one draw makes the two splits disjoint by construction.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from tidal.config.schema import ArithmeticTask

DATA_SOURCE = "arithmetic"


@dataclass(frozen=True)
class Problem:
    prompt: str  # e.g. "37+45="
    answer: str  # e.g. "82" (negative for '-' when b > a: "-8")


def num_problems(task: ArithmeticTask) -> int:
    """How many distinct problems the task can pose."""
    return len(task.operations) * (10**task.max_digits) ** 2


def problem_at(task: ArithmeticTask, index: int) -> Problem:
    ops = task.operations
    op = ops[index % len(ops)]
    base = 10**task.max_digits
    a, b = divmod(index // len(ops), base)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Problem(prompt=task.prompt_template.format(expression=f"{a}{op}{b}"), answer=str(value))


def make_splits(task: ArithmeticTask) -> tuple[list[Problem], list[Problem]]:
    """(train, val), disjoint. Train holds min(num_train, space - num_val) distinct problems:

    when the space is smaller than asked (2-digit addition has 10,000 problems) the train split is
    every remaining problem once; repeating problems would add nothing that more epochs do not.
    """
    space = num_problems(task)
    if task.num_val >= space:
        raise ValueError(
            f"data.task.num_val={task.num_val} leaves no training problems: the task has only {space} "
            f"distinct problems ({task.operations} with max_digits={task.max_digits}); lower num_val "
            "or raise max_digits"
        )
    num_train = min(task.num_train, space - task.num_val)
    # Use a single draw so val and train can never overlap.
    indices = random.Random(task.seed).sample(range(space), task.num_val + num_train)
    problems = [problem_at(task, i) for i in indices]
    return problems[task.num_val :], problems[: task.num_val]


def make_split(task: ArithmeticTask, split: Literal["train", "val"]) -> list[Problem]:
    train, val = make_splits(task)
    if split == "train":
        return train
    if split == "val":
        return val
    raise ValueError(f"split={split!r} is not a split of the arithmetic task; use 'train' or 'val'")
