"""Preference pairs through FSDP2 on 2 gloo ranks: the DPO update equals a single-process update on
the whole batch (uneven shares, one pair per micro-batch, chosen and rejected of different widths),
the reference scores pairs like a plain forward, and evaluation reports the same loss as the update
computed before it stepped.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from tidal.algorithms import PREFERENCE_LOSSES
from tidal.config.schema import JobConfig
from tidal.dataflow.batch import Batch
from tidal.workers.context import WorkerContext

pytestmark = pytest.mark.distributed

WORLD = 2
P, RC, RR, VOCAB = 5, 4, 3, 32
LR, BETA = 1e-2, 0.5


def _config(model_dir: str) -> JobConfig:
    return JobConfig.model_validate(
        {
            "model": {"path": model_dir},
            "data": {"task": {"type": "arithmetic"}},
            "algorithm": {"preference": {"type": "dpo", "beta": BETA}},
            "trainer": {"total_steps": 4, "prompts_per_step": 5},
            "reference": {"micro_batch_size_per_rank": 3},
            "actor": {
                "micro_batch_size_per_rank": 2,  # one pair (two sequences) per micro-batch
                "optim": {"lr": LR, "eps": 1e-5, "grad_clip": 1.0},
            },
        }
    )


def _pairs(num_pairs: int, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)

    def right_padded(width: int) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.randint(1, width + 1, (num_pairs,), generator=gen)
        mask = (torch.arange(width) < lengths[:, None]).long()
        return torch.randint(1, VOCAB, (num_pairs, width), generator=gen) * mask, mask

    prompt_lens = torch.randint(1, P + 1, (num_pairs,), generator=gen)
    prompt_mask = (torch.arange(P) >= P - prompt_lens[:, None]).long()
    chosen_ids, chosen_mask = right_padded(RC)
    rejected_ids, rejected_mask = right_padded(RR)
    return Batch.from_dict(
        {
            "prompt_ids": torch.randint(1, VOCAB, (num_pairs, P), generator=gen) * prompt_mask,
            "prompt_mask": prompt_mask,
            "chosen_ids": chosen_ids,
            "chosen_mask": chosen_mask,
            "rejected_ids": rejected_ids,
            "rejected_mask": rejected_mask,
        }
    )


def _log_probs(model, data: Batch, response: str) -> torch.Tensor:
    """Plain padded forward: token log-probs [n, R] of `response` ("chosen" / "rejected")."""
    ids = torch.cat([data["prompt_ids"], data[f"{response}_ids"]], 1)
    mask = torch.cat([data["prompt_mask"], data[f"{response}_mask"]], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()
    log_probs = torch.log_softmax(logits[:, P - 1 : -1], -1)
    token = log_probs.gather(-1, data[f"{response}_ids"][..., None]).squeeze(-1)
    return token * data[f"{response}_mask"]


def _gather(local: Batch) -> Batch:
    parts: list[Batch | None] = [None] * WORLD
    dist.all_gather_object(parts, local)
    return Batch.concat(parts)


def _rank_main(rank: int, init_method: str, model_dir: str) -> None:
    from tidal.workers.roles.actor import ActorRole
    from tidal.workers.roles.preference import PairReferenceRole

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    ctx = WorkerContext(rank, WORLD, rank, WORLD, torch.device("cpu"), "gloo")
    cfg = _config(model_dir)
    actor, reference = ActorRole(cfg, ctx), PairReferenceRole(cfg, ctx)
    data = _pairs(5, seed=3)
    local = data.split(WORLD)[rank]  # 3 and 2 pairs, as the controller's DP split
    local = local.union(reference.compute_pair_ref_log_probs(local))
    before = actor.evaluate_preference(local)
    metrics = actor.update_preference(local)
    exported = dict(actor.export_weights())

    gathered: list[dict | None] = [None] * WORLD
    dist.all_gather_object(gathered, metrics)
    assert gathered[0] == gathered[1]  # metrics agree on every rank
    full = _gather(local)
    if rank == 0:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            ref_chosen, ref_rejected = _log_probs(model, full, "chosen"), _log_probs(model, full, "rejected")
        torch.testing.assert_close(full["ref_chosen_log_probs"], ref_chosen, rtol=0, atol=1e-5)
        torch.testing.assert_close(full["ref_rejected_log_probs"], ref_rejected, rtol=0, atol=1e-5)

        optim = torch.optim.AdamW(
            model.parameters(), lr=LR, eps=1e-5, weight_decay=cfg.actor.optim.weight_decay
        )
        loss, expected = PREFERENCE_LOSSES.get("dpo")(
            _log_probs(model, full, "chosen"),
            full["chosen_mask"],
            _log_probs(model, full, "rejected"),
            full["rejected_mask"],
            ref_chosen_log_probs=ref_chosen,
            ref_rejected_log_probs=ref_rejected,
            beta=BETA,
        )
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        assert metrics["actor/loss"] == pytest.approx(float(loss), rel=1e-5)
        assert before["val/loss"] == pytest.approx(float(loss), rel=1e-5)  # eval = the same loss, no step
        assert metrics["actor/grad_norm"] == pytest.approx(float(grad_norm), rel=1e-4)
        for key, value in expected.items():
            assert metrics[f"actor/{key}"] == pytest.approx(value, abs=1e-6), key
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=2e-5, msg=name)

    # REDI stage 1 (SFT on chosen) runs through the engine's own train on the same pairs
    sft = actor.update_preference(local, sft=True)
    assert sft["actor/sft_stage"] == 1.0 and sft["actor/loss"] > 0
    # fewer pairs than ranks: rank 1 holds an empty share and must not hang
    tiny = _pairs(1, seed=5).split(WORLD)[rank]
    tiny = tiny.union(reference.compute_pair_ref_log_probs(tiny))
    tiny_metrics = actor.update_preference(tiny)
    dist.all_gather_object(gathered, tiny_metrics)
    assert gathered[0] == gathered[1]
    dist.destroy_process_group()


def test_dpo_update_on_two_ranks_equals_a_single_process_update(model_dir, tmp_path):
    mp.spawn(_rank_main, args=(f"file://{tmp_path}/rendezvous", model_dir), nprocs=WORLD, join=True)
