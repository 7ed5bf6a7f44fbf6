"""The GRPO step workload both sides run: one model build, one task, one prompt list.

Everything here is shared so that the Tidal and TRL sides cannot drift apart: the sizes, the
learning rate and optimizer settings and the prompts in the order they are consumed. (The reward
rule is shared too: the TRL side calls Tidal's own `arithmetic` reward function.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tidal.config.schema import ArithmeticTask, TinyQwen2Build
from tidal.tasks.arithmetic import make_split


@dataclass(frozen=True)
class Workload:
    """Sizes fixed by the benchmark's definition; `steps`/`warmup` come from the command line."""

    steps: int = 5
    warmup: int = 2
    prompts_per_step: int = 8
    samples_per_prompt: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    # Optimizer: Tidal's defaults (AdamW, constant schedule, weight decay 0.01, clip 1.0); the TRL
    # side is configured to the same values instead of its own defaults.
    lr: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    clip_ratio: float = 0.2
    num_threads: int = 2
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    def describe(self) -> dict[str, Any]:
        return asdict(self) | {
            "model": MODEL_BUILD.model_dump(),
            "task": TASK.model_dump(),
            "dtype": "float32",
        }


# sft_steps=0, as the benchmark is defined: an untrained policy. With a 19-token vocabulary it
# samples EOS roughly once in 19 tokens, so responses average ~14 of the 32-token budget (both
# sides report their mean length); no supervised warm-up keeps the model build instant.
MODEL_BUILD = TinyQwen2Build(
    num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=688, sft_steps=0
)
TASK = ArithmeticTask(max_digits=2, operations=["+"])


def step_prompts(workload: Workload) -> list[tuple[str, str]]:
    """(prompt, answer) pairs in consumption order: step i uses rows [i*P, (i+1)*P).

    Tidal reads the training split unshuffled (data.shuffle=false) and TRL reads this list
    unshuffled (shuffle_dataset=False), so step i sees the same 8 prompts on both sides; the
    benchmark checks that at run time.
    """
    train = make_split(TASK, "train")
    needed = workload.total_steps * workload.prompts_per_step
    if needed > len(train):
        raise ValueError(f"--steps asks for {needed} prompts but the task has {len(train)}; lower --steps")
    return [(p.prompt, p.answer) for p in train[:needed]]
