"""The programs' actor -> rollout weight sync through the resharder, on 1 and 2 gloo ranks.

Each rank builds the real roles (FSDP2 actor, embedded-engine rollout) and syncs them the way the
worker does (`colocated.hand_over(actor.export_weights(), rollout.load_weights, version)`).
The rollout engine must then hold exactly the actor's full weights (gathered the old way, by
iterating the export), generate exactly as an engine loaded with those weights, and do so again
after the actor's shards change (no stale plan or buffer). One rank moves nothing over a wire:
every byte is copied once, trainer memory to engine memory. A bf16 engine fed by fp32 master
weights gets them cast on the sender (half the bytes on the wire).
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from tidal.config.schema import JobConfig, SamplingConfig
from tidal.resharding.colocated import hand_over
from tidal.resharding.sync import Resharder
from tidal.tasks.tokenizer import save_char_tokenizer
from tidal.workers.context import WorkerContext

pytestmark = pytest.mark.distributed


def _model_dir(path: str, tie: bool) -> str:
    """A tiny Qwen2 whose row counts do not divide by 2 (uneven FSDP shards) or are 1."""
    tokenizer = save_char_tokenizer(path)
    config = transformers.Qwen2Config(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=1,  # k_proj/v_proj: 8 rows
        intermediate_size=40,
        vocab_size=len(tokenizer),  # 19: shards of 10 and 9 rows
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    torch.manual_seed(1)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def _config(model_dir: str, dtype: str) -> JobConfig:
    return JobConfig.model_validate(
        {
            "model": {"path": model_dir, "dtype": dtype},
            "data": {"task": {"type": "arithmetic"}},
            "trainer": {"total_steps": 1, "prompts_per_step": 2},
        }
    )


def _perturb(actor, seed: int) -> None:
    """Change every local shard in place, as an optimizer step does (different on every rank)."""
    gen = torch.Generator().manual_seed(seed * 100 + dist.get_rank())
    with torch.no_grad():
        for param in actor.engine.module.parameters():
            local = param.to_local()
            local.add_(torch.randn(local.shape, generator=gen, dtype=local.dtype) * 0.1)


def _check_rollout_holds(rollout, full: dict[str, torch.Tensor], what: str) -> None:
    engine = rollout.engine
    state = engine.model.state_dict()
    assert set(state) == set(full) | (
        {"lm_head.weight"} if engine.model.config.tie_word_embeddings else set()
    )
    for name, expected in full.items():
        assert torch.equal(state[name], expected.to(state[name].dtype)), (what, name)
    # The fast forward keeps fused copies of q/k/v and gate/up: they must have been re-read.
    from tidal.workers.engines.embedded.engine import EmbeddedEngine

    fresh = EmbeddedEngine(engine.model.name_or_path, dtype=engine.model.dtype)
    fresh.load_weights(full.items())
    prompts = torch.tensor([[3, 4, 5, 16, 6], [0, 0, 7, 17, 8]])
    mask = (prompts != 0).long()
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=5)
    got = engine.generate(prompts, mask, greedy, engine.eos_token_ids)
    want = fresh.generate(prompts, mask, greedy, fresh.eos_token_ids)
    assert torch.equal(got.response_ids, want.response_ids), what
    assert torch.equal(got.log_probs, want.log_probs), what


def _rank_main(rank: int, world: int, store: str, model_dirs: list[tuple[str, str]]) -> None:
    from tidal.workers.roles.actor import ActorRole
    from tidal.workers.roles.rollout import RolloutRole

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    ctx = WorkerContext(
        rank=rank, world_size=world, dp_rank=rank, dp_size=world, device=torch.device("cpu"), backend="gloo"
    )
    for model_dir, dtype in model_dirs:
        what = f"{os.path.basename(model_dir)} {dtype} on {world} ranks"
        cfg = _config(model_dir, dtype)
        actor, rollout = ActorRole(cfg, ctx), RolloutRole(cfg, ctx)
        rollout.resharder = Resharder(verify=True)  # every target rectangle checked against its source
        for version in (1, 2):
            _perturb(actor, seed=version)
            source = actor.export_weights()
            metrics = hand_over(source, rollout.load_weights, version)
            full = dict(actor.export_weights())  # the old way: gather every full tensor
            _check_rollout_holds(rollout, full, f"{what}, sync {version}")
            assert rollout.weights_version == version

            # Bytes: each rank copies its own rows once and receives the others' rows once.
            elem = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            total = sum(p.numel() for p in rollout.engine.model.parameters()) * elem  # tied: once
            own = sum(t.numel() for t in source.tensors.values()) * elem
            assert metrics["weight_sync/local_copy_bytes"] == own, (what, metrics)
            assert metrics["weight_sync/bytes_received"] == total - own, (what, metrics)
            report = rollout.resharder.executor.plan.report
            assert report.total_bytes == report.lower_bound_bytes == (world - 1) * total
            if world == 1:  # one copy, trainer memory -> engine memory: no staging, no wire
                assert metrics["weight_sync/staging_bytes"] == 0 and own == total
            if version == 1:
                executor = rollout.resharder.executor
        assert rollout.resharder.executor is executor, "the plan and executor are kept across syncs"
        dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_actor_to_rollout_sync_through_the_resharder(tmp_path, world):
    model_dirs = [(_model_dir(str(tmp_path / "untied"), tie=False), "float32")]
    if world == 2:
        tied = _model_dir(str(tmp_path / "tied"), tie=True)
        model_dirs += [(tied, "float32"), (tied, "bfloat16")]
    store = f"file://{tmp_path}/rendezvous"
    mp.spawn(_rank_main, args=(world, store, model_dirs), nprocs=world, join=True)
