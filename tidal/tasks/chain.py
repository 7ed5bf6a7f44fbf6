"""A long-tailed variant of the arithmetic task: chained sums, answered step by step.

A problem adds a chain of single digits, "3+5+9+2=", and the answer carries the running sum
through every operand: "8+9=17+2=19" (the first addition's result, then "+operand=new sum" for
each further term). Exact match on the whole chain is the reward (`arithmetic`: the response has
no whitespace, so its first word is all of it).

Why: response length grows with the chain (1-2 tokens for one addition, about 5 more per further
term), and the number of additions is drawn from a lognormal, `ceil(exp(N(0, sigma)))`
capped at `max_additions`: with sigma=1, half the problems are one addition, a quarter two, and
about 3% run to 8-10 (responses of 35-46 tokens against a median of 2-6). That is the shape of
real RL rollouts (most answers short, a few very long) and what an asynchronous trainer is meant
to absorb: a synchronous step waits for its longest sample.

Problems are drawn from a seeded `random.Random` (with replacement); a hash of the prompt puts
every prompt on one side, train or validation, so the splits are disjoint. The model for it is the quickstart's tiny Qwen2 with its
supervised warm-up run on these problems (`build_chain_model`); the rows are written as jsonl for
`data.train_files` / `data.val_files`.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tidal.config.schema import TinyQwen2Build
from tidal.tasks.arithmetic import Problem


@dataclass(frozen=True)
class ChainTask:
    """Sizes of the chained-sum task; `sigma` sets how heavy the tail of chain lengths is."""

    num_train: int = 20000
    num_val: int = 256
    max_additions: int = 10
    sigma: float = 1.0
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.max_additions < 1:
            raise ValueError(f"ChainTask.max_additions={self.max_additions} must be >= 1")
        if self.sigma < 0:
            raise ValueError(f"ChainTask.sigma={self.sigma} must be >= 0 (0: every chain is one addition)")
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(
                f"ChainTask needs num_train and num_val >= 1, got {self.num_train}, {self.num_val}"
            )


def chain_answer(operands: Sequence[int]) -> str:
    """The answer to (3, 5, 9, 2) is "8+9=17+2=19": the first sum, then "+operand=running sum" per further term."""
    if len(operands) < 2:
        raise ValueError(f"a chain needs at least two operands, got {list(operands)}")
    total = operands[0] + operands[1]
    parts = [str(total)]
    for value in operands[2:]:
        total += value
        parts.append(f"+{value}={total}")
    return "".join(parts)


def draw_num_additions(rng: random.Random, task: ChainTask) -> int:
    """ceil(lognormal(0, sigma)), at most max_additions (sigma 0: always one)."""
    return min(task.max_additions, math.ceil(math.exp(rng.gauss(0.0, task.sigma))))


def is_held_out(task: ChainTask, prompt: str) -> bool:
    """Whether a prompt belongs to the validation side: 1 in 10 of all prompts, fixed by a hash."""
    return random.Random(f"{task.seed}:{prompt}").random() < 0.1  # str seeds hash with sha512: stable


def make_chain_splits(task: ChainTask) -> tuple[list[Problem], list[Problem]]:
    """(train, val), deterministic in `task`, disjoint by prompt.

    Draws are with replacement (a one-addition chain has only 100 prompts; insisting on distinct
    problems would thin out exactly the short end of the distribution); every prompt belongs to
    one side (`is_held_out`), so no validation prompt is ever trained on.
    """
    rng = random.Random(task.seed)
    train: list[Problem] = []
    val: list[Problem] = []
    while len(train) < task.num_train or len(val) < task.num_val:
        operands = [rng.randrange(10) for _ in range(draw_num_additions(rng, task) + 1)]
        prompt = "+".join(map(str, operands)) + "="
        side, size = (val, task.num_val) if is_held_out(task, prompt) else (train, task.num_train)
        if len(side) < size:
            side.append(Problem(prompt=prompt, answer=chain_answer(operands)))
    return train, val


def write_jsonl(problems: Sequence[Problem], path: Path) -> Path:
    """Rows in the format `data.train_files` reads: prompt + reward_model.ground_truth."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for p in problems:
            out.write(json.dumps({"prompt": p.prompt, "reward_model": {"ground_truth": p.answer}}) + "\n")
    return path


def response_tokens(problem: Problem) -> int:
    """Tokens of the right answer, EOS included (one token per character)."""
    return len(problem.answer) + 1


def build_chain_model(
    build: TinyQwen2Build, task: ChainTask, out_dir: Path, max_sft_additions: int = 3
) -> dict[str, float]:
    """The tiny Qwen2 warmed up (`build.sft_steps` fixed steps) on the chain task's training split.

    The warm-up sees only chains of at most `max_sft_additions` additions: a batch is padded to its
    longest row, and with the full tail nearly every batch of 64 holds a 60-token row (~4 s a step
    on 2 busy cores instead of ~1 s). The model learns the format and the short chains; RL then
    meets the long ones, mostly wrong at first, as real rollouts are.

    Reuses the quickstart builder's pieces; skips the work when `out_dir` already holds a model
    built from the same (build, task). Returns the warm-up's greedy exact match on 64 training
    problems (with answers up to 48 tokens) and its final loss.
    """
    import torch

    from tidal.tasks.tiny_model import greedy_exact_match, sft_warmup, tiny_qwen2_config
    from tidal.tasks.tokenizer import build_char_tokenizer

    if build.sft_target_accuracy is not None:
        raise ValueError(
            "build_chain_model runs a fixed number of warm-up steps; leave sft_target_accuracy unset"
        )
    marker = out_dir / "chain_build.json"
    key = {
        "build": build.model_dump(mode="json"),
        "task": asdict(task),
        "max_sft_additions": max_sft_additions,
    }
    if marker.is_file() and json.loads(marker.read_text())["key"] == key:
        return json.loads(marker.read_text())["report"]
    train, _ = make_chain_splits(task)
    tokenizer = build_char_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(build.seed)
        from transformers import Qwen2ForCausalLM

        model = Qwen2ForCausalLM(tiny_qwen2_config(build, tokenizer))
    # A small probe: greedy decoding without a KV cache over 48 tokens costs ~1 s per problem on 2 cores.
    probe = train[-64:]
    short = [p for p in train[:-64] if p.answer.count("=") < max_sft_additions]
    losses = sft_warmup(model, tokenizer, short, build)
    accuracy = greedy_exact_match(model, tokenizer, probe, max_new_tokens=48)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    report = {
        "sft_steps": len(losses),
        "sft_final_loss": losses[-1] if losses else float("nan"),
        "sft_accuracy": accuracy,
    }
    marker.write_text(json.dumps({"key": key, "report": report}))
    return report
