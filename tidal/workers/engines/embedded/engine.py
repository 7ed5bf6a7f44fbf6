"""The embedded rollout engine: batched sampling from a Hugging Face causal LM, in this process.

No server, no second copy of the weights: the engine holds the HF model and decodes with a KV
cache. Prompts arrive left-padded; every row decodes until it emits a stop token or reaches
`max_new_tokens`, and finished rows are dropped from the batch so they cost nothing afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar

import torch
from transformers import AutoModelForCausalLM

from tidal.config.schema import JobConfig, SamplingConfig
from tidal.dataflow.tokenizer import eos_token_ids, load_tokenizer, pad_token_id
from tidal.workers.engines.base import Generation, RolloutEngine
from tidal.workers.engines.embedded.forward import FastForward, HFForward
from tidal.workers.engines.embedded.linear import packing_available
from tidal.workers.engines.embedded.sampling import sample_next

if TYPE_CHECKING:
    from tidal.workers.context import WorkerContext
    from tidal.workers.engines.embedded.continuous import ContinuousBatcher

Impl = Literal["auto", "fast", "hf"]
T = TypeVar("T")


class EmbeddedEngine(RolloutEngine):
    def __init__(
        self,
        model_path: str | Path,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        max_batch_size: int = 256,
        impl: Impl = "auto",
        pack_weights: bool | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        """Load the model and tokenizer from a local HF folder.

        impl: "fast" is the lean Llama-family path, "hf" the model's own forward (the reference);
        "auto" takes "fast" when it covers the model. pack_weights (fast path only): prepack the
        projections for oneDNN; None = on for CPU models of hidden size >= 256 when this torch
        build supports it.
        """
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size} must be >= 1")
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.eos_token_ids = eos_token_ids(self.tokenizer, self.model.generation_config)
        self.pad_token_id = pad_token_id(self.tokenizer, self.eos_token_ids)
        self.impl = self._choose_impl(impl)
        if pack_weights is None:
            # Below hidden size 256 oneDNN's per-call overhead outweighs its faster GEMM (measured).
            pack_weights = (
                self.device.type == "cpu"
                and self.model.config.hidden_size >= 256
                and packing_available(torch_dtype)
            )
        if pack_weights and not (self.device.type == "cpu" and packing_available(torch_dtype)):
            raise ValueError(
                f"pack_weights=True needs a CPU device and oneDNN linear ops for {torch_dtype} "
                f"(device={self.device}); leave pack_weights unset to choose automatically"
            )
        self.forward: FastForward | HFForward = (
            FastForward(self.model, packed=pack_weights) if self.impl == "fast" else HFForward(self.model)
        )
        # Finished rows leave the batch and the KV cache at once; False keeps decoding them (their
        # tokens are discarded). Switchable so the two can be compared: with rows ending at
        # different steps, compacting measured ~20% faster (64 rows, 4-layer hidden-256 model).
        self.compact_finished = True

    @classmethod
    def from_config(cls, cfg: JobConfig, ctx: WorkerContext) -> EmbeddedEngine:
        return cls(
            cfg.model.path,
            dtype=cfg.model.dtype,
            device=ctx.device,
            max_batch_size=cfg.rollout.max_batch_size,
            trust_remote_code=cfg.model.trust_remote_code,
        )

    def continuous(self, version: int) -> ContinuousBatcher:
        from tidal.workers.engines.embedded.continuous import ContinuousBatcher

        return ContinuousBatcher(self, version=version)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        sampling: SamplingConfig,
        stop_token_ids: Sequence[int],
        seed: int | None = None,
        num_samples: int = 1,
    ) -> Generation:
        """Sample `num_samples` responses for each row of the left-padded prompts [N,P].

        Output rows are interleaved (prompt 0's samples, then prompt 1's, ...), N*num_samples in
        all. Each prompt is prefilled once and its KV cache fanned out to its samples.
        `stop_token_ids` is the complete stop set (the role passes `eos_token_ids` + its extras);
        the stop token is part of the response. `sampling.n` is not read: pass `num_samples`.
        R is the longest response in the batch.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} must be >= 1")
        self._check_prompts(prompt_ids, prompt_mask)
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device).bool()
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=self.device)
        prompts_per_chunk = max(1, self.max_batch_size // num_samples)
        pieces = [
            self._generate_chunk(
                prompt_ids[i : i + prompts_per_chunk],
                prompt_mask[i : i + prompts_per_chunk],
                num_samples,
                sampling,
                stops,
                generator,
            )
            for i in range(0, prompt_ids.shape[0], prompts_per_chunk)
        ]
        if not pieces:
            empty = torch.empty(0, 0, dtype=torch.long)
            return Generation(empty, empty.clone(), torch.empty(0, 0, dtype=torch.float32))
        width = max(p.response_ids.shape[1] for p in pieces)
        return Generation(
            torch.cat([_pad_right(p.response_ids, width, self.pad_token_id) for p in pieces]),
            torch.cat([_pad_right(p.response_mask, width, 0) for p in pieces]),
            torch.cat([_pad_right(p.log_probs, width, 0.0) for p in pieces]),
        )

    def _generate_chunk(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        num_samples: int,
        sampling: SamplingConfig,
        stops: torch.Tensor,
        generator: torch.Generator | None,
    ) -> Generation:
        # Columns that are padding in every row change nothing; drop them before the prefill.
        first_real = int(mask.any(dim=0).long().argmax())
        ids, mask = ids[:, first_real:], mask[:, first_real:]
        max_new = sampling.max_new_tokens
        # Positions count real tokens only, so left padding does not shift them.
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        forward = self.forward
        logits = forward.prefill(ids, mask, positions, max_len=ids.shape[1] + max_new)
        next_pos = mask.long().sum(-1)
        if num_samples > 1:
            fan_out = torch.arange(ids.shape[0], device=self.device).repeat_interleave(num_samples)
            forward.keep(fan_out)
            logits, next_pos = logits[fan_out], next_pos[fan_out]

        batch = logits.shape[0]
        out_ids = torch.full((batch, max_new), self.pad_token_id, dtype=torch.long, device=self.device)
        out_lp = torch.zeros(batch, max_new, dtype=torch.float32, device=self.device)
        lengths = torch.full((batch,), max_new, dtype=torch.long, device=self.device)
        rows = torch.arange(batch, device=self.device)  # original row of each row still in the batch
        live = torch.ones(batch, dtype=torch.bool, device=self.device)  # only False when not compacting
        for step in range(max_new):
            tokens, log_probs = sample_next(
                logits, sampling.temperature, sampling.top_k, sampling.top_p, generator
            )
            out_ids[rows[live], step] = tokens[live]
            out_lp[rows[live], step] = log_probs[live]
            done = torch.isin(tokens, stops) & live
            lengths[rows[done]] = step + 1
            if step == max_new - 1:
                break
            if done.any():
                # Compaction costs one copy of the cache; masking costs every later step.
                live &= ~done
                if not live.any():
                    break
                if self.compact_finished:
                    keep = live.nonzero().squeeze(-1)
                    forward.keep(keep)
                    rows, tokens, next_pos, live = rows[keep], tokens[keep], next_pos[keep], live[keep]
            logits = forward.decode(tokens, next_pos)
            next_pos = next_pos + 1

        width = int(lengths.max())
        response_mask = (torch.arange(width, device=self.device)[None] < lengths[:, None]).long()
        out_ids = out_ids[:, :width].masked_fill(response_mask == 0, self.pad_token_id)
        out_lp = out_lp[:, :width] * response_mask
        return Generation(out_ids.cpu(), response_mask.cpu(), out_lp.cpu())

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy HF-named tensors into the model in place; returns how many were copied.

        Partial updates are fine (buckets arrive one at a time). With tied embeddings both
        `lm_head.weight` and `model.embed_tokens.weight` name the same storage, so either works.
        """
        targets = self.model.state_dict(keep_vars=True)
        count = 0
        for name, tensor in named_tensors:
            if name not in targets:
                raise ValueError(
                    f"weight {name!r} is not a parameter of the rollout model "
                    f"({type(self.model).__name__}); send Hugging Face names such as {next(iter(targets))!r}"
                )
            target = targets[name]
            if target.shape != tensor.shape:
                raise ValueError(
                    f"weight {name!r} has shape {tuple(tensor.shape)} but the rollout model expects "
                    f"{tuple(target.shape)}; the actor and rollout must load the same architecture"
                )
            target.copy_(tensor)
            count += 1
        self.forward.refresh()
        return count

    @torch.no_grad()
    def write_weights(self, write: Callable[[dict[str, torch.Tensor]], T]) -> T:
        """Let `write` fill the model's parameters in place, then re-read what the forward keeps
        fused or packed; returns what `write` returns.

        `write` gets the parameters by Hugging Face name (tied ones once, under their first name):
        a resharder writes the trainer's shards straight into them, with no staging copy.
        """
        result = write(dict(self.model.named_parameters()))
        self.forward.refresh()
        return result

    # ------------------------------------------------------------------ helpers

    def _choose_impl(self, impl: Impl) -> Literal["fast", "hf"]:
        if impl not in ("auto", "fast", "hf"):
            raise ValueError(f"impl={impl!r} is not one of 'auto', 'fast', 'hf'")
        reason = FastForward.unsupported(self.model)
        if impl == "auto":
            return "hf" if reason else "fast"
        if impl == "fast" and reason:
            raise ValueError(f"impl='fast' cannot run this model ({reason}); use impl='auto' or 'hf'")
        return impl

    @staticmethod
    def _check_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> None:
        if prompt_ids.dim() != 2 or prompt_ids.shape != prompt_mask.shape:
            raise ValueError(
                f"prompt_ids {tuple(prompt_ids.shape)} and prompt_mask {tuple(prompt_mask.shape)} "
                "must both be [N,P]"
            )
        if prompt_ids.shape[0] == 0:
            return
        if prompt_ids.shape[1] == 0 or not bool(prompt_mask[:, -1].all()):
            raise ValueError(
                "prompts must be LEFT-padded and non-empty: every row's last column must be a real "
                "token (prompt_mask[:, -1] == 1); pad prompts on the left"
            )


def _pad_right(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    if x.shape[1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)
