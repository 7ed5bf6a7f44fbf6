"""The TRL side: Hugging Face TRL's GRPOTrainer on the benchmark workload, timed per step.

TRL drives its own training loop, so we time it from the inside:
- a `TrainerCallback` takes the wall clock from `on_step_begin` to `on_step_end`; with
  gradient_accumulation_steps=1 that window holds one whole RL step (generation, reward, loss,
  backward, optimizer step) and leaves out only the data loader's fetch of 64 prompt strings and
  the logging after the step;
- generation is timed by wrapping `generate` on the model instance we hand to the trainer. On one
  CPU process without DeepSpeed, TRL's `unwrap_model_for_generation` yields that same instance, so
  every generation call goes through the wrapper. The wrapper counts, per completion, the tokens up
  to and including the first EOS (what TRL's completion mask keeps, and what Tidal's response_mask
  counts), so both sides report generated tokens per second of generation.

The callback can also run a hook after each TRL step: the benchmark uses it to run one Tidal step
there, so the two sides alternate step by step and share the machine's slow and fast moments.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _workload import Workload
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from tidal.config.schema import JobConfig


@dataclass
class TrlTimings:
    step_s: list[float] = field(default_factory=list)
    gen_s: list[float] = field(default_factory=list)
    gen_tokens: list[int] = field(default_factory=list)  # completion tokens (EOS included) per call
    gen_sequences: list[int] = field(default_factory=list)
    prompts: list[list[str]] = field(default_factory=list)  # unique prompts of each generation call
    num_threads: list[int] = field(default_factory=list)  # torch threads seen inside each step


def completion_lengths(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Tokens per row up to and including the first EOS; the whole row when there is none."""
    is_eos = completion_ids == eos_token_id
    width = completion_ids.shape[1]
    first = torch.where(
        is_eos.any(dim=1),
        is_eos.int().argmax(dim=1) + 1,
        torch.full_like(is_eos[:, 0], width, dtype=torch.long),
    )
    return first


def time_generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, timings: TrlTimings) -> None:
    """Replace `model.generate` on this instance with a timed, token-counting wrapper."""
    original = model.generate
    eos = tokenizer.eos_token_id

    def timed_generate(*args, **kwargs):
        input_ids = kwargs["input_ids"]  # TRL calls generate(**inputs, generation_config=...)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        timings.gen_s.append(time.perf_counter() - start)
        completions = out[:, input_ids.shape[1] :]
        timings.gen_tokens.append(int(completion_lengths(completions, eos).sum()))
        timings.gen_sequences.append(int(completions.shape[0]))
        texts = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        timings.prompts.append(list(dict.fromkeys(texts)))  # unique, in order (TRL repeats each 8x)
        return out

    model.generate = timed_generate


class StepTimer(TrainerCallback):
    """Wall clock per optimizer step; optionally runs `between_steps(step_index)` after each."""

    def __init__(self, timings: TrlTimings, between_steps: Callable[[int], None] | None = None):
        self.timings = timings
        self.between_steps = between_steps
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.timings.step_s.append(time.perf_counter() - self._start)
        self.timings.num_threads.append(torch.get_num_threads())
        if self.between_steps is not None:
            self.between_steps(len(self.timings.step_s) - 1)


def make_reward_fn(rule: Callable[[str, str, str], float]) -> Callable[..., list[float]]:
    """TRL's reward-function signature around `rule(prompt, response_text, ground_truth)`.

    The benchmark passes Tidal's own `arithmetic` reward, so both sides score by one rule. TRL
    hands over completions decoded without special tokens and cut after the first EOS (Tidal's
    response_text), and the dataset's extra columns (here `answer`) as keyword lists.
    """

    def arithmetic_exact_match(
        prompts: list[str], completions: list[str], answer: list[str], **kwargs
    ) -> list[float]:
        return [rule(p, c, a) for p, c, a in zip(prompts, completions, answer, strict=True)]

    return arithmetic_exact_match


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer in {model_dir} lacks pad or eos (pad={tokenizer.pad_token_id}, eos={tokenizer.eos_token_id})"
        )
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            f"tokenizer in {model_dir} uses one id for pad and eos; completion lengths would be wrong"
        )
    return tokenizer


def build_trainer(
    model_dir: Path,
    pairs: list[tuple[str, str]],
    reward_fn: Callable[..., list[float]],
    workload: Workload,
    cfg: JobConfig,
    output_dir: Path,
    timer: StepTimer,
):
    """A GRPOTrainer set to the workload: fp32, no gradient checkpointing, one optimizer step per batch."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    time_generate(model, tokenizer, timer.timings)
    dataset = Dataset.from_dict({"prompt": [p for p, _ in pairs], "answer": [a for _, a in pairs]})
    optim = cfg.actor.optim
    args = GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=workload.samples_per_step,  # TRL counts completions, not prompts
        num_generations=workload.samples_per_prompt,
        max_completion_length=workload.max_new_tokens,
        temperature=workload.temperature,
        top_p=1.0,
        top_k=0,
        beta=0.0,  # no reference model
        num_iterations=1,
        gradient_accumulation_steps=1,
        epsilon=cfg.actor.clip_ratio_low,
        epsilon_high=cfg.actor.clip_ratio_high,
        loss_type="dapo",  # token mean over the batch, as Tidal's loss_agg_mode=token-mean
        scale_rewards="group" if cfg.algorithm.norm_adv_by_std_in_grpo else "none",
        learning_rate=optim.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        adam_epsilon=optim.eps,
        max_grad_norm=optim.grad_clip,
        bf16=False,  # TRL 1.16 defaults to bf16 mixed precision, also on CPU
        fp16=False,
        gradient_checkpointing=False,  # and to gradient checkpointing
        use_cpu=True,
        shuffle_dataset=False,  # consume prompts in list order, as Tidal with data.shuffle=false
        max_steps=workload.total_steps,
        seed=workload.seed,
        report_to="none",
        save_strategy="no",
        logging_steps=workload.total_steps,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_fn,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    # With tqdm off, Trainer prints every log dict; our table reports what we need.
    trainer.remove_callback(PrinterCallback)
    return trainer
