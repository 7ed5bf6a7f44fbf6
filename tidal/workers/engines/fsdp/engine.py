"""FSDP2 engine: one sharded model (+ optimizer and schedule when it trains) over the dp ranks.

Sharding follows torchtitan: `fully_shard` on every transformer block, then on the root (which
then owns the embeddings, final norm and heads). A block's parameters are all-gathered just before
its forward and freed after, so a rank holds one full block at a time.

Every forward and backward issues collectives, so ranks must run the SAME number of micro-batches
even when their shares differ (uneven or empty splits): `plan_micro_batches` agrees on the
maximum and pads with `None` entries, for which callers run a zero-weight placeholder.

Layout of a micro-batch (`layout`, an explicit constructor argument; `choose_layout` is the rule
the roles use): "packed" (packing.py, every sample in one row) when flash-attention-2 can run
it, i.e. on CUDA with `flash_attn` importable and a 16-bit compute dtype: its varlen kernels
attend within each sample at no padding cost. "packed_rows" (packed_rows.py, samples bin-packed
into rows as wide as the longest) everywhere else: sdpa and eager attention see a packed row as
one long sequence with a dense block-diagonal mask, i.e. (sum of lengths)^2 attention work, while
short rows keep that near the sum of the lengths^2 with almost no padding. "padded" (padding.py,
one row per sample) is kept beside them: the plainest layout, and the reference the others are
tested against. All give the same outputs (tests/unit/test_sequence_layouts.py).

Gradients: FSDP averages gradients over ranks, while the losses here are normalised by the global
mini-batch count so that they SUM to the mini-batch loss over ranks and micro-batches
(tidal.algorithms.aggregation). `backward` multiplies by the dp size to undo the average.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from tidal.algorithms.aggregation import GlobalCounts, count_valid
from tidal.config.schema import ModelConfig, OptimConfig
from tidal.kernels.logprobs import token_log_probs
from tidal.resharding.fsdp_source import fsdp_source
from tidal.resharding.sync import WeightSource
from tidal.workers.context import WorkerContext
from tidal.workers.engines.base import LossFn, TrainEngine, TrainSpec
from tidal.workers.engines.fsdp.optim import build_optimizer, build_scheduler
from tidal.workers.engines.fsdp.packed_rows import PackedRowsBatch
from tidal.workers.engines.fsdp.packing import PackedBatch, SequenceBatch, sample_lengths
from tidal.workers.engines.fsdp.padding import PaddedBatch, micro_batch_indices

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PACK_COLUMNS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")
Layout = Literal["packed", "packed_rows", "padded"]
LAYOUTS: dict[str, type[SequenceBatch]] = {
    "packed": PackedBatch,
    "packed_rows": PackedRowsBatch,
    "padded": PaddedBatch,
}


def choose_layout(device: torch.device, compute_dtype: torch.dtype) -> tuple[Layout, str]:
    """(layout, attn_implementation) for a model computing in `compute_dtype` on `device`.

    Packed only where flash-attention-2's varlen kernels run it: CUDA, the `flash_attn` package
    importable, and fp16/bf16 compute (the kernels have no float32 version). Packed rows with
    sdpa otherwise. Config-free for now: it depends on nothing the user sets but the dtype.
    """
    if device.type == "cuda" and compute_dtype in (torch.float16, torch.bfloat16):
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "packed", "flash_attention_2"
    return "packed_rows", "sdpa"


def load_pretrained(
    model: ModelConfig, dtype: torch.dtype, *, causal_lm: bool = True, attn_implementation: str = "sdpa"
) -> nn.Module:
    """A Hugging Face model from the local folder `model.path`, with dropout switched off.

    RL compares log-probs of the same tokens under rollout and training; dropout would make them
    differ (and break bit-exact resume), so every dropout probability is set to 0.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if not os.path.isdir(model.path):
        raise ValueError(f"model.path={model.path!r} is not a folder; point it at a local Hugging Face model")
    config = AutoConfig.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
    for name in ("attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop", "dropout"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    lm = auto.from_pretrained(
        model.path,
        config=config,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=model.trust_remote_code,
    )
    for module in lm.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return lm


def block_types(model: nn.Module) -> set[str]:
    """Class names of the transformer blocks (Hugging Face lists them in `_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    if not names or not any(type(m).__name__ in names for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} does not name its transformer blocks in _no_split_modules; "
            "FSDP needs them to shard per block"
        )
    return names


def _check_plain_lm_head(config: Any) -> None:
    """The kernel computes logits as hidden @ W.T; refuse heads that transform them further."""
    softcap = getattr(config, "final_logit_softcapping", None)
    scales = {name: getattr(config, name, None) for name in ("logit_scale", "logits_scaling")}
    scaled = {name: value for name, value in scales.items() if value not in (None, 1.0)}
    if softcap is not None or scaled:
        raise ValueError(
            f"{config.model_type} transforms its logits (final_logit_softcapping={softcap}, {scaled}); "
            "the log-prob kernel supports plain lm heads only, so this model cannot be trained yet"
        )


class PolicyModel(nn.Module):
    """A causal LM whose forward maps a SequenceBatch to the log-probs of its response tokens.

    Only the base model runs on all tokens; the lm_head is applied by the chunked kernel to the
    predicting positions alone, so [tokens x vocab] logits never exist. Computing it inside
    `forward` keeps the root's (FSDP-gathered) lm_head weight valid while it is used.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        _check_plain_lm_head(lm.config)
        self.lm = lm

    def forward(
        self, batch: SequenceBatch, temperature: float, with_entropy: bool, with_sum_pi_squared: bool = False
    ) -> tuple[torch.Tensor | None, ...]:
        """(log_probs, entropy or None[, sum_pi_squared when asked]) per predicted token."""
        out = self.lm.base_model(**batch.model_inputs())
        hidden = batch.at_predictions(out.last_hidden_state)
        weight = self.lm.get_output_embeddings().weight
        return token_log_probs(
            hidden, weight, batch.targets, temperature, with_entropy, with_sum_pi_squared=with_sum_pi_squared
        )


class FSDPEngine(TrainEngine):
    """Shards `module` over all ranks; owns its optimizer and schedule when `optim` is given.

    `module(batch, **kwargs)` gets a SequenceBatch of `layout` and must return a tuple of
    per-predicted-token tensors ([K] each, or None).
    """

    def __init__(
        self,
        module: nn.Module,
        ctx: WorkerContext,
        *,
        blocks: set[str],
        layout: Layout,
        optim: OptimConfig | None = None,
        total_steps: int = 0,
        param_dtype: torch.dtype | None = None,
    ) -> None:
        if ctx.dp_size != ctx.world_size:
            raise ValueError(
                f"FSDP engine shards over every rank; got dp_size={ctx.dp_size} != {ctx.world_size}"
            )
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not one of {sorted(LAYOUTS)}")
        self.ctx = ctx
        self.device = ctx.device
        self.layout = layout
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        # Master weights stay in their load dtype; `param_dtype` is the compute dtype (mixed precision).
        mp = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None
        )
        module.to(ctx.device)
        for sub in list(module.modules()):
            if type(sub).__name__ in blocks:
                fully_shard(sub, mesh=mesh, mp_policy=mp)
        fully_shard(module, mesh=mesh, mp_policy=mp)
        self.module = module
        self.optimizer = build_optimizer(module.parameters(), optim) if optim else None
        self.scheduler = build_scheduler(self.optimizer, optim, total_steps) if optim else None
        self.grad_clip = optim.grad_clip if optim else None
        self.kind: str | None = None  # set by `for_role`

    @classmethod
    def for_role(cls, spec: TrainSpec, ctx: WorkerContext) -> FSDPEngine:
        """The model a role asks for: a policy LM (float32 master weights, `model.dtype` compute), a
        value model (backbone + seeded value head), or a frozen policy stored in the compute dtype."""
        from tidal.workers.engines.fsdp.value_model import ValueModel

        compute = DTYPES[spec.model.dtype]
        layout, attention = choose_layout(ctx.device, compute)
        frozen = spec.kind == "frozen_policy"
        # A frozen model has no optimizer, so no master copy: it is stored in the compute dtype.
        load_dtype = compute if frozen else torch.float32
        lm = load_pretrained(spec.model, load_dtype, causal_lm=spec.kind != "value", attn_implementation=attention)
        if frozen:
            lm.requires_grad_(False)
        if spec.gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module = ValueModel(lm, seed=spec.seed) if spec.kind == "value" else PolicyModel(lm)
        engine = cls(
            module,
            ctx,
            blocks=block_types(lm),
            layout=layout,
            optim=spec.optim,
            total_steps=spec.total_steps,
            param_dtype=None if frozen or compute == torch.float32 else compute,
        )
        engine.kind = spec.kind
        return engine

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, values: list[float], op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def plan_micro_batches(self, columns: dict[str, torch.Tensor], size: int) -> list[torch.Tensor | None]:
        """Sample indices of this rank's micro-batches, padded with None so that every rank has as many.

        Layouts with rows sort samples by length first when there are several micro-batches, so
        that each micro-batch's rows are about as wide as its samples.
        """
        lengths = sample_lengths(columns["prompt_mask"], columns["response_mask"])
        local = micro_batch_indices(lengths, size, sort_by_length=self.layout != "packed")
        (most,) = self.all_reduce([len(local)], op=dist.ReduceOp.MAX)
        # at least one, so that outputs (and their count) exist even when every share is empty
        return local + [None] * (max(int(most), 1) - len(local))

    def build(self, columns: dict[str, torch.Tensor], index: torch.Tensor | None) -> SequenceBatch:
        """The micro-batch of samples `index` of `columns` in this engine's layout, on this device."""
        layout = LAYOUTS[self.layout]
        if index is None:
            return layout.placeholder(columns["response_ids"].shape[1], self.device)
        return layout.from_padded(*(columns[k][index].to(self.device) for k in PACK_COLUMNS))

    # ------------------------------------------------------------------ compute
    @torch.no_grad()
    def infer(
        self, columns: dict[str, torch.Tensor], micro_batch_size: int, **forward_kwargs: Any
    ) -> list[torch.Tensor | None]:
        """Forward over this rank's samples in micro-batches -> each output as [n, R] float32 on CPU."""
        self.module.eval()
        pieces: list[list[torch.Tensor | None]] = []
        indices: list[torch.Tensor] = []
        for index in self.plan_micro_batches(columns, micro_batch_size):
            batch = self.build(columns, index)
            outputs = self.module(batch, **forward_kwargs)
            # a placeholder unpacks to [0, R], so an empty share still answers with [0, R] columns
            pieces.append([None if o is None else batch.unpack(o).float().cpu() for o in outputs])
            if index is not None:
                indices.append(index)
        order = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
        return [None if col[0] is None else _in_original_order(torch.cat(col), order) for col in zip(*pieces)]

    def global_counts(
        self, columns: dict[str, torch.Tensor], count_masks: tuple[str, ...] = ()
    ) -> GlobalCounts:
        """Counts of response_mask and of `count_masks` over these rows of every rank (one all-reduce)."""
        names = ("response_mask", *count_masks)
        local: list[float] = []
        for name in names:
            counts = count_valid(columns[name])
            local += [counts.num_tokens, counts.num_sequences]
        totals = self.all_reduce(local)
        per_mask = [GlobalCounts(totals[2 * i], totals[2 * i + 1]) for i in range(len(names))]
        return GlobalCounts(
            per_mask[0].num_tokens, per_mask[0].num_sequences, dict(zip(count_masks, per_mask[1:]))
        )

    def train(
        self,
        columns: dict[str, torch.Tensor],
        *,
        num_mini_batches: int,
        micro_batch_size: int,
        epochs: int,
        loss_fn: LossFn,
        count_masks: tuple[str, ...] = (),
        **forward_kwargs: Any,
    ) -> dict[str, float]:
        """`epochs` passes over this rank's share, one optimizer step per mini-batch.

        The share is cut into `num_mini_batches` contiguous mini-batches (global mini-batch k =
        piece k of every rank), each into micro-batches whose gradients accumulate (samples
        sorted by length within the mini-batch for the layouts with rows).
        `loss_fn(outputs, micro_batch, counts)` gets the model outputs as [n, R] tensors, the
        micro-batch's columns and the GLOBAL `GlobalCounts` of the mini-batch (of response_mask, and
        of each column in `count_masks` under `counts.of(name)`), and returns
        (loss, sums, means): `sums` are loss terms that add up over micro-batches and ranks to the
        mini-batch's value; `means` are token means of the micro-batch (weighted by its tokens).
        Returns step sums and token means, plus grad_norm (mean), lr (last) and skipped_steps,
        identical on every rank.
        """
        self.module.train()
        step_sums: list[dict[str, float]] = []
        step_stats: list[dict[str, float]] = []
        token_sums: dict[str, float] = {}
        token_weights: dict[str, float] = {}
        for _ in range(epochs):
            for start, stop in even_bounds(columns["response_ids"].shape[0], num_mini_batches):
                mini = {key: value[start:stop] for key, value in columns.items()}
                counts = self.global_counts(mini, count_masks)
                sums: dict[str, float] = {}
                for index in self.plan_micro_batches(mini, micro_batch_size):
                    batch = self.build(mini, index)
                    outputs = self.module(batch, **forward_kwargs)
                    if batch.is_placeholder:  # nothing to learn from, but the collectives must run
                        self.backward(sum(o.sum() for o in outputs if o is not None) * 0.0)
                        continue
                    micro = {key: value[index].to(self.device) for key, value in mini.items()}
                    unpacked = [None if o is None else batch.unpack(o) for o in outputs]
                    loss, loss_sums, means = loss_fn(unpacked, micro, counts)
                    self.backward(loss)
                    num_tokens = float(micro["response_mask"].sum())
                    for key, value in loss_sums.items():
                        sums[key] = sums.get(key, 0.0) + value
                    for key, value in means.items():
                        token_sums[key] = token_sums.get(key, 0.0) + value * num_tokens
                        token_weights[key] = token_weights.get(key, 0.0) + num_tokens
                step_sums.append(sums)
                step_stats.append(self.step())
        self.module.eval()
        return self.reduce_metrics(step_sums, step_stats, token_sums, token_weights)

    def reduce_metrics(
        self,
        step_sums: list[dict[str, float]],
        step_stats: list[dict[str, float]],
        token_sums: dict[str, float],
        token_weights: dict[str, float],
    ) -> dict[str, float]:
        """One all-reduce for all metrics; the key sets are agreed first (a rank may have had no data)."""
        local_keys = {key for sums in step_sums for key in sums}, set(token_sums)
        gathered: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(gathered, local_keys)
        sum_keys = sorted(set().union(*(g[0] for g in gathered)))
        mean_keys = sorted(set().union(*(g[1] for g in gathered)))
        flat = [sums.get(k, 0.0) for sums in step_sums for k in sum_keys]
        flat += [token_sums.get(k, 0.0) for k in mean_keys] + [token_weights.get(k, 0.0) for k in mean_keys]
        reduced = self.all_reduce(flat) if flat else []
        num_steps = len(step_sums)
        metrics = {}
        for i, key in enumerate(sum_keys):  # the mini-batch value of each step, averaged over steps
            metrics[key] = sum(reduced[s * len(sum_keys) + i] for s in range(num_steps)) / max(num_steps, 1)
        offset = num_steps * len(sum_keys)
        for i, key in enumerate(mean_keys):
            metrics[key] = reduced[offset + i] / max(reduced[offset + len(mean_keys) + i], 1e-8)
        if step_stats:
            metrics["grad_norm"] = sum(s["grad_norm"] for s in step_stats) / len(step_stats)
            metrics["lr"] = step_stats[-1]["lr"]
            metrics["skipped_steps"] = sum(s["skipped_steps"] for s in step_stats)
        return metrics

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss normalised by GLOBAL counts: x dp_size cancels FSDP's gradient average."""
        (loss * self.ctx.dp_size).backward()

    def step(self) -> dict[str, float]:
        """Clip gradients, step optimizer and schedule, clear gradients -> grad_norm, lr (the rate used)."""
        if self.optimizer is None:
            raise RuntimeError("this engine was built without an optimizer (inference only)")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        finite = bool(torch.isfinite(grad_norm))  # the norm is global, so every rank agrees
        if finite:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "lr": float(lr), "skipped_steps": float(not finite)}

    # ------------------------------------------------------------------ weights and checkpoints
    def weight_source(self) -> WeightSource:
        """The policy's FSDP shards under Hugging Face names (no gather, no copy); iterating it instead
        yields full tensors one at a time (a collective: every rank iterates it all)."""
        if not isinstance(self.module, PolicyModel):
            raise ValueError(f"only a policy model's weights go to the rollout, not a {type(self.module).__name__}")

        def full() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in self.full_state_dict():
                yield name.removeprefix("lm."), tensor

        return fsdp_source(self.module, strip_prefix="lm.", gather_full=full)

    def full_state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full tensor) for every state-dict entry, on every rank, one tensor at a time.

        A collective: every rank must consume the whole iterator in the same order. Gathering one
        tensor at a time keeps the peak at one full parameter instead of the whole model.
        """
        for name, value in self.module.state_dict().items():
            yield name, value.full_tensor() if isinstance(value, DTensor) else value

    def save_checkpoint(self, path: str) -> None:
        """Sharded model (+ optimizer) with torch.distributed.checkpoint; schedule and RNG per rank."""
        os.makedirs(path, exist_ok=True)
        # An optimizer that never stepped has no state; DCP would create it with a zero-lr step,
        # which changes AdamW's step count and so the next real update. Save the model only then.
        has_optim_state = self.optimizer is not None and bool(self.optimizer.state)
        if has_optim_state:
            model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
        else:
            state = {"model": get_model_state_dict(self.module)}
        dcp.save(state, checkpoint_id=os.path.join(path, "sharded"))
        local = {
            "world_size": self.ctx.world_size,
            "has_optim_state": has_optim_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "rng": _rng_state(self.device),
        }
        torch.save(local, _rank_file(path, self.ctx.rank))
        dist.barrier()

    def load_checkpoint(self, path: str) -> None:
        rank_file = _rank_file(path, self.ctx.rank)
        if not os.path.exists(rank_file):
            raise ValueError(
                f"checkpoint {path!r} has no state for rank {self.ctx.rank} (missing {rank_file}); "
                "resume with the world size it was saved with"
            )
        local = torch.load(rank_file, weights_only=False)
        if local["world_size"] != self.ctx.world_size:
            raise ValueError(
                f"checkpoint {path!r} was saved by {local['world_size']} ranks, this group has "
                f"{self.ctx.world_size}; resume with the same number of workers"
            )
        sharded = os.path.join(path, "sharded")
        if local["has_optim_state"] and self.optimizer is not None:
            model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=sharded)
            set_state_dict(
                self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
            )
        else:
            state = {"model": get_model_state_dict(self.module)}
            dcp.load(state, checkpoint_id=sharded)
            set_model_state_dict(self.module, state["model"])
        if self.scheduler is not None and local["scheduler"] is not None:
            self.scheduler.load_state_dict(local["scheduler"])
        _set_rng_state(local["rng"], self.device)
        dist.barrier()


def even_bounds(total: int, num_chunks: int) -> list[tuple[int, int]]:
    """[start, stop) of `num_chunks` contiguous near-equal pieces (earlier ones larger, some may be empty)."""
    base, extra = divmod(total, num_chunks)
    bounds, start = [], 0
    for i in range(num_chunks):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _in_original_order(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows computed in sample order `order` ([n] indices) -> rows in the original order."""
    out = torch.empty_like(values)
    out[order] = values
    return out


def _rank_file(path: str, rank: int) -> str:
    return os.path.join(path, f"rank_{rank:05d}.pt")


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
