"""The built-in verifiable task: integer arithmetic prompts such as "37+45=" with answer "82".

Problems are numbered: index i picks the operation (i mod #ops) and the two operands (the rest, read
in base 10**max_digits). Drawing distinct indices with a seeded `random.Random.sample` gives a
deterministic, duplicate-free problem set for any size of space (it never lists the space), and
taking validation and training from one draw makes the two splits disjoint by construction.

For offline preference training, `make_pairs` pairs each problem's answer with a near miss (one
digit changed), deterministically.
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


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str  # the right answer
    rejected: str  # a wrong answer one digit away from it


def wrong_answer(problem: Problem, seed: int) -> str:
    """The answer with one digit changed: a near miss, deterministic in (seed, prompt).

    Near misses make the pair hard in the right way: chosen and rejected share everything but one
    token, so the preference is about arithmetic, not about length or format. The leading digit
    never becomes 0 (that would be a formatting error, "082", rather than a wrong number).
    """
    rng = random.Random(f"{seed}:{problem.prompt}")  # str seeds hash with sha512: stable across runs
    sign, digits = ("-", problem.answer[1:]) if problem.answer.startswith("-") else ("", problem.answer)
    position = rng.randrange(len(digits))
    lowest = 1 if position == 0 and len(digits) > 1 else 0
    choices = [d for d in "0123456789"[lowest:] if d != digits[position]]
    if sign and len(digits) == 1:
        choices.remove("0")  # "-0" is not a number anyone writes
    digits = digits[:position] + rng.choice(choices) + digits[position + 1 :]
    return sign + digits


def make_pairs(task: ArithmeticTask, split: Literal["train", "val"]) -> list[PreferencePair]:
    """One (right, wrong) answer pair per problem of `split`, deterministic for the task's seed."""
    return [PreferencePair(p.prompt, p.answer, wrong_answer(p, task.seed)) for p in make_split(task, split)]
