"""Build a small Qwen2 model for the arithmetic task, offline and deterministically.

Same `TinyQwen2Build` (and task) -> bit-identical folder: the initial weights come from a seeded
generator, the optional supervised warm-up draws its batches from a seeded generator, and nothing
time- or path-dependent is written. The warm-up exists so that RL starts from a policy that is
sometimes right: with a reward of 0 on every sample, group-relative advantages are all zero and
nothing is learnt.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from tidal.config.schema import ArithmeticTask, TinyQwen2Build
from tidal.tasks.arithmetic import Problem, make_split
from tidal.tasks.tokenizer import build_char_tokenizer

MAX_POSITIONS = 2048
IGNORE_INDEX = -100
# The warm-up's stopping probe (when model.build.sft_target_accuracy is set): its size keeps the
# accuracy's standard error near 3 points; every 10 steps costs ~5% of the warm-up's time.
PROBE_SIZE = 256
PROBE_EVERY = 10

log = logging.getLogger(__name__)


def tiny_qwen2_config(build: TinyQwen2Build, tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=build.hidden_size,
        intermediate_size=build.intermediate_size,
        num_hidden_layers=build.num_layers,
        num_attention_heads=build.num_heads,
        num_key_value_heads=build.num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        # Untied: every consumer (weight export, resharding, the log-prob kernel) then sees an
        # explicit `lm_head.weight`; with a vocab of ~20 the extra parameters cost nothing.
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
        dtype="float32",
    )


def build_tiny_qwen2(build: TinyQwen2Build, task: ArithmeticTask | None, out_dir: str | Path) -> None:
    """Write config, safetensors weights and the character tokenizer into `out_dir`."""
    if build.sft_steps > 0 and task is None:
        raise ValueError(
            f"model.build.sft_steps={build.sft_steps} needs the arithmetic task to train on, but "
            "data.task is not set; set data.task.type=arithmetic or model.build.sft_steps=0"
        )
    tokenizer = build_char_tokenizer()
    # fork_rng: building must not disturb (or depend on) the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(build.seed)
        model = Qwen2ForCausalLM(tiny_qwen2_config(build, tokenizer))
    if build.sft_steps > 0:
        sft_warmup(model, tokenizer, make_split(task, "train"), build)
    model.eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


# ------------------------------------------------------------------------------ supervised warm-up


def encode_problems(
    tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `prompt answer EOS` rows: (input_ids, attention_mask, labels on answer + EOS)."""
    rows, labels = [], []
    for problem in problems:
        prompt = tokenizer.encode(problem.prompt, add_special_tokens=False)
        answer = tokenizer.encode(problem.answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels)):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        target[i, : len(row)] = torch.tensor(label)
    return input_ids, mask, target


def sft_warmup(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    build: TinyQwen2Build,
) -> list[float]:
    """AdamW steps of cross-entropy on answer tokens + EOS; returns the loss of every step taken.

    Without `build.sft_target_accuracy`: `build.sft_steps` steps, the learning rate ramping up over
    the first 10% then following a cosine down to 10% of `build.sft_lr`.

    With it: a stop at the first probe (every PROBE_EVERY steps) where greedy exact match on
    PROBE_SIZE training problems held out of the warm-up reaches the target, `sft_steps` being the
    cap, at a constant rate after the ramp (no anneal towards a cap that is never reached). Why a
    target rather than a step count: 2-digit addition is learnt in a sharp transition (the units
    digit, a mod-10 table, comes last) whose step moves by hundreds of steps with the seed and even
    with the float summation order of the thread count, so a fixed count lands either before it (RL
    then cannot help: the model lacks the mechanism, measured flat or falling) or past it (nothing
    left to learn). Stopping on a measured accuracy lands inside it, where RL helps at once.

    Batches are drawn with replacement from a generator seeded by `build.seed`: reproducible for a
    given thread count and independent of the global RNG.
    """
    target = build.sft_target_accuracy
    probe: Sequence[Problem] = ()
    if target is not None:
        probe_size = min(PROBE_SIZE, len(problems) // 4)
        if probe_size == 0:
            raise ValueError(
                f"model.build.sft_target_accuracy={target} needs training problems to hold out as a "
                f"probe, but the task has only {len(problems)}; raise data.task.num_train or unset "
                "model.build.sft_target_accuracy"
            )
        problems, probe = problems[:-probe_size], problems[-probe_size:]
    input_ids, mask, target_ids = encode_problems(tokenizer, problems)
    generator = torch.Generator().manual_seed(build.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=build.sft_lr)
    factor = partial(lr_factor, total=build.sft_steps, final=1.0 if target is not None else 0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses: list[float] = []
    accuracy = None
    for step in range(build.sft_steps):
        model.train()
        idx = torch.randint(len(problems), (build.sft_batch_size,), generator=generator)
        width = int(mask[idx].sum(dim=1).max())  # trim the batch to its longest row
        out = model(
            input_ids=input_ids[idx, :width], attention_mask=mask[idx, :width], labels=target_ids[idx, :width]
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(out.loss.detach().item())
        if target is not None and (step + 1) % PROBE_EVERY == 0:
            accuracy = greedy_exact_match(model, tokenizer, probe)
            if accuracy >= target:
                break
    model.eval()
    if target is not None:
        log.info(
            "SFT warm-up: %d steps, greedy exact match %.3f on %d held-out training problems (target %.2f)",
            len(losses),
            accuracy if accuracy is not None else float("nan"),
            len(probe),
            target,
        )
    return losses


def lr_factor(step: int, total: int, warmup_fraction: float = 0.1, final: float = 0.1) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear ramp, then cosine to `final`."""
    warmup = max(1, round(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def greedy_exact_match(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    problems: Sequence[Problem],
    max_new_tokens: int = 8,
    batch_size: int = 256,
) -> float:
    """Fraction of problems whose greedy completion, up to EOS, is exactly the answer.

    A plain decoding loop (no KV cache; prompts are a few tokens) with left padding and position
    ids that count real tokens only, the layout the RL stack uses.
    """
    model.eval()
    correct = 0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        generated = []
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            token = logits.argmax(dim=-1)
            generated.append(token)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
        tokens = torch.stack(generated, dim=1).tolist()
        for problem, row in zip(chunk, tokens):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            else:
                continue  # never stopped: not an exact answer
            correct += tokenizer.decode(row) == problem.answer
    return correct / len(problems)
