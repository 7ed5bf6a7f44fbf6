"""FSDP2 actor (and critic) on 2 gloo ranks: equal a single-process update; resume bit for bit.

Also: the packed and padded layouts give the same outputs and update through the engine (with
length-sorted micro-batches), and the on-policy update (no old_log_probs column) gives the same
weights as one with precomputed old log-probs.

One spawn of 2 processes runs all checks: starting a process (importing torch and transformers)
costs more than the checks themselves. The ranks rendezvous through a file store (no port to
collide on). An assertion in a rank surfaces through `torch.multiprocessing.spawn`, which then
stops the other rank; a short process-group timeout bounds any hang.
"""

from __future__ import annotations

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from tidal.algorithms import KL_ESTIMATORS, POLICY_LOSSES, aggregate_loss, value_loss
from tidal.config.schema import JobConfig, ModelConfig, OptimConfig
from tidal.dataflow.batch import Batch
from tidal.workers.context import WorkerContext

pytestmark = pytest.mark.distributed

WORLD = 2
P, R, VOCAB = 5, 4, 32
LR, TEMPERATURE = 1e-2, 0.8


def _config(model_dir: str, total_steps: int) -> JobConfig:
    return JobConfig.model_validate(
        {
            "model": {"path": model_dir},
            "data": {"task": {"type": "arithmetic"}},
            "trainer": {"total_steps": total_steps, "prompts_per_step": 2},
            "rollout": {"sampling": {"n": 4, "temperature": TEMPERATURE}},
            "reference": {"enable": True, "micro_batch_size_per_rank": 3},
            "actor": {
                "mini_batch_prompts": 1,  # 2 mini-batches (optimizer steps) per update
                "micro_batch_size_per_rank": 1,  # uneven micro-batch counts across ranks
                "epochs": 2,
                "entropy_coeff": 0.01,
                "use_kl_loss": True,
                "kl_loss_coef": 0.1,
                # eps above rounding noise: Adam divides by sqrt(v), so a gradient that is ~0 in
                # exact arithmetic (e.g. the k_proj bias) would turn its rounding noise into a step.
                "optim": {"lr": LR, "eps": 1e-5, "warmup_steps": 1, "schedule": "cosine", "grad_clip": 1.0},
            },
        }
    )


def _expected_lr(step: int, total: int) -> float:
    """Warm-up of one step, then cosine to 0 over the remaining steps (written out independently)."""
    return LR if step == 0 else LR * 0.5 * (1 + math.cos(math.pi * (step - 1) / (total - 1)))


def _data(num_samples: int, seed: int) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, P + 1, (num_samples,), generator=gen)
    response_lens = torch.randint(1, R + 1, (num_samples,), generator=gen)
    prompt_mask = (torch.arange(P) >= P - prompt_lens[:, None]).long()
    response_mask = (torch.arange(R) < response_lens[:, None]).long()
    return Batch.from_dict(
        {
            "prompt_ids": torch.randint(1, VOCAB, (num_samples, P), generator=gen) * prompt_mask,
            "prompt_mask": prompt_mask,
            "response_ids": torch.randint(1, VOCAB, (num_samples, R), generator=gen) * response_mask,
            "response_mask": response_mask,
            "advantages": torch.randn(num_samples, R, generator=gen) * response_mask,
        }
    )


def _spawn(fn, tmp_path, *args) -> None:
    mp.spawn(fn, args=(f"file://{tmp_path}/rendezvous", *args), nprocs=WORLD, join=True)


def _init(rank: int, init_method: str) -> WorkerContext:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    return WorkerContext(rank, WORLD, rank, WORLD, torch.device("cpu"), "gloo")


def _all_gather_batches(local: Batch) -> Batch:
    parts: list[Batch | None] = [None] * WORLD
    dist.all_gather_object(parts, local)
    return Batch.concat(parts)


# ------------------------------------------------------------------ single-process reference


def _padded_log_probs(model, data: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([data["prompt_ids"], data["response_ids"]], 1)
    mask = torch.cat([data["prompt_mask"], data["response_mask"]], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float() / TEMPERATURE
    log_probs = torch.log_softmax(logits[:, P - 1 : -1], -1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, data["response_ids"][..., None]).squeeze(-1), entropy


def _reference_update(model_dir: str, cfg: JobConfig, data: Batch, minis: list[list[int]], total_steps: int):
    """Plain HF model + AdamW on each whole mini-batch: what the 2-rank update must reproduce."""
    actor = cfg.actor
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optim = torch.optim.AdamW(
        model.parameters(),
        lr=LR,
        betas=actor.optim.betas,
        eps=actor.optim.eps,
        weight_decay=actor.optim.weight_decay,
    )
    kl_fn, loss_fn = KL_ESTIMATORS.get(actor.kl_loss_type), POLICY_LOSSES.get(actor.policy_loss)
    losses, step = [], 0
    for _ in range(actor.epochs):
        for idx in minis:
            mb = data.index(idx)
            mask = mb["response_mask"]
            log_probs, entropy = _padded_log_probs(model, mb)
            pg_loss, _ = loss_fn(log_probs, mb["old_log_probs"], mb["advantages"], mask, config=actor)
            loss = (
                pg_loss
                - actor.entropy_coeff * aggregate_loss(entropy, mask, actor.loss_agg_mode)
                + actor.kl_loss_coef
                * aggregate_loss(kl_fn(log_probs, mb["ref_log_probs"]), mask, actor.loss_agg_mode)
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), actor.optim.grad_clip)
            for group in optim.param_groups:
                group["lr"] = _expected_lr(step, total_steps)
            optim.step()
            optim.zero_grad()
            losses.append(float(pg_loss))
            step += 1
    return model.state_dict(), sum(losses) / len(losses)


# ------------------------------------------------------------------ check 1: equivalence


def _check_equivalence(rank: int, ctx: WorkerContext, model_dir: str) -> None:
    from tidal.workers.roles.actor import ActorRole
    from tidal.workers.roles.reference import ReferenceRole

    cfg = _config(model_dir, total_steps=3)
    actor, reference = ActorRole(cfg, ctx), ReferenceRole(cfg, ctx)
    data = _data(7, seed=1)
    shares = data.split(WORLD)  # 4 and 3 samples, as the controller's DP split
    local = shares[rank]
    local = local.union(actor.compute_log_probs(local)).union(reference.compute_ref_log_probs(local))
    metrics = actor.update(local)
    exported = dict(actor.export_weights())  # every rank gets full tensors

    # metrics are identical on every rank
    all_metrics: list[dict | None] = [None] * WORLD
    dist.all_gather_object(all_metrics, metrics)
    assert all_metrics[0] == all_metrics[1]
    for key in ("actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy", "actor/grad_norm"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["actor/lr"] == pytest.approx(_expected_lr(3, 12))

    full = _all_gather_batches(local)
    if rank == 0:
        # log-probs before the update: packed FSDP == padded single process; reference == actor
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            expected_lp, expected_entropy = _padded_log_probs(model, full)
        mask = full["response_mask"].bool()
        torch.testing.assert_close(full["old_log_probs"][mask], expected_lp[mask], rtol=0, atol=1e-5)
        torch.testing.assert_close(full["entropy"][mask], expected_entropy[mask], rtol=0, atol=1e-5)
        torch.testing.assert_close(full["ref_log_probs"], full["old_log_probs"], rtol=0, atol=1e-6)
        assert (full["old_log_probs"][~mask] == 0).all()
        # global mini-batch k = piece k of every rank's share
        minis = [[0, 1, 4, 5], [2, 3, 6]]
        expected, pg_loss = _reference_update(model_dir, cfg, full, minis, total_steps=12)
        assert set(exported) == set(expected)
        moved = 0.0
        for name, tensor in expected.items():
            torch.testing.assert_close(exported[name], tensor, rtol=1e-4, atol=2e-5, msg=name)
            moved = max(moved, float((tensor - model.state_dict()[name]).abs().max()))
        assert moved > 1e-3  # the update really changed the weights
        assert metrics["actor/pg_loss"] == pytest.approx(pg_loss, rel=1e-4, abs=1e-6)

    # fewer samples than ranks: rank 1 holds an empty share and must not hang
    tiny = _data(1, seed=5).split(WORLD)[rank]
    out = actor.compute_log_probs(tiny)
    assert out["old_log_probs"].shape == (len(tiny), R)
    tiny = tiny.union(out).union(reference.compute_ref_log_probs(tiny))
    tiny_metrics = actor.update(tiny)
    dist.all_gather_object(all_metrics, tiny_metrics)
    assert all_metrics[0] == all_metrics[1]
    # the optimal token baselines ask the log-prob pass for sum_v pi(v)^2 too (only they do)
    algorithm = cfg.algorithm.model_copy(update={"advantage_estimator": "optimal_token_baseline"})
    actor.cfg = cfg.model_copy(update={"algorithm": algorithm})
    with_squares = actor.compute_log_probs(local)
    assert "sum_pi_squared" not in out and with_squares["sum_pi_squared"].shape == (len(local), R)
    valid = local["response_mask"].bool()
    squares, chosen = with_squares["sum_pi_squared"][valid], with_squares["old_log_probs"][valid].exp()
    assert (squares >= chosen.square() - 1e-6).all() and (squares <= 1 + 1e-6).all()
    assert (with_squares["sum_pi_squared"][~valid] == 0).all()
    actor.cfg = cfg


# ------------------------------------------------------------------ check 2: checkpoint resume


def _local_state(actor) -> dict[str, torch.Tensor]:
    """This rank's shards of the weights and of every AdamW state tensor, copied."""
    state = {f"param/{n}": p.to_local().clone() for n, p in actor.engine.module.named_parameters()}
    for i, param in enumerate(actor.engine.module.parameters()):
        for key, value in actor.engine.optimizer.state[param].items():
            value = value.to_local() if hasattr(value, "to_local") else value
            state[f"optim/{i}/{key}"] = value.clone()
    return state


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _check_resume(rank: int, ctx: WorkerContext, model_dir: str, ckpt_dir: str) -> None:
    from tidal.workers.roles.actor import ActorRole

    cfg = _config(model_dir, total_steps=3)
    cfg.actor.use_kl_loss = False
    first, second = (_data(7, seed=s).split(WORLD)[rank] for s in (2, 3))

    def with_log_probs(actor, batch):
        return batch.union(actor.compute_log_probs(batch))

    uninterrupted = ActorRole(cfg, ctx)
    uninterrupted.update(with_log_probs(uninterrupted, first))
    uninterrupted.save_checkpoint(ckpt_dir)
    at_save = _local_state(uninterrupted)
    rng_at_save = torch.get_rng_state()
    uninterrupted.update(with_log_probs(uninterrupted, second))
    final = _local_state(uninterrupted)

    torch.rand(3)  # move the RNG: loading must restore it
    resumed = ActorRole(cfg, ctx)
    resumed.load_checkpoint(ckpt_dir)
    _assert_bit_identical(_local_state(resumed), at_save)
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    assert resumed.engine.scheduler.last_epoch == uninterrupted.engine.scheduler.last_epoch - 4
    resumed.update(with_log_probs(resumed, second))
    _assert_bit_identical(_local_state(resumed), final)


# ------------------------------------------------------------------ check 3: critic


def _reference_values(value_model, data: Batch) -> torch.Tensor:
    """Padded forward of the backbone; the value of response token j is read at the token before it."""
    ids = torch.cat([data["prompt_ids"], data["response_ids"]], 1)
    mask = torch.cat([data["prompt_mask"], data["response_mask"]], 1)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    hidden = value_model.backbone(
        input_ids=ids, attention_mask=mask, position_ids=positions
    ).last_hidden_state
    return value_model.value_head(hidden[:, P - 1 : -1]).squeeze(-1)


def _check_critic(rank: int, ctx: WorkerContext, model_dir: str) -> None:
    from tidal.workers.engines.fsdp import ValueModel, load_pretrained
    from tidal.workers.roles.critic import CriticRole

    cfg = _config(model_dir, total_steps=1)
    cfg.critic.micro_batch_size_per_rank = 2
    cfg.critic.gradient_checkpointing = True  # recomputation must not change the gradient
    cfg.critic.optim.lr, cfg.critic.optim.eps = 1e-3, 1e-5
    critic = CriticRole(cfg, ctx)
    data = _data(5, seed=4)
    local = data.split(WORLD)[rank]
    local = local.union(critic.compute_values(local))
    local["returns"] = local["advantages"] + 0.5 * local["response_mask"]
    metrics = critic.update(local)
    weights = dict(critic.engine.full_state_dict())
    full = _all_gather_batches(local)
    if rank == 0:
        model = ValueModel(load_pretrained(cfg.model, torch.float32, causal_lm=False), seed=cfg.trainer.seed)
        mask = full["response_mask"]
        with torch.no_grad():
            torch.testing.assert_close(
                full["values"] * mask, _reference_values(model, full) * mask, atol=1e-5, rtol=0
            )
        optim = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-5, weight_decay=0.01)
        loss, _ = value_loss(
            _reference_values(model, full), full["values"], full["returns"], mask, cfg.critic.cliprange_value
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.critic.optim.grad_clip)
        optim.step()
        assert metrics["critic/vf_loss"] == pytest.approx(float(loss), rel=1e-5)
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=2e-5, msg=name)


# ------------------------------------------------------------------ check 4: layouts in the engine


def _check_layouts(rank: int, ctx: WorkerContext, model_dir: str) -> None:
    """Packed, packed-rows and padded engines: same log-probs, entropies and update (rows sort micro-batches)."""
    from tidal.workers.engines.fsdp import FSDPEngine, PolicyModel, block_types, load_pretrained

    data = _data(9, seed=6)
    for key in ("response_ids", "response_mask", "advantages"):  # sample 1 has an empty response
        data[key][1] = 0
    local = data.split(WORLD)[rank]  # 5 and 4 samples: 3 and 2 micro-batches of 2
    columns = {key: local[key] for key in ("prompt_ids", "prompt_mask", "response_ids", "response_mask")}
    columns["advantages"] = local["advantages"]

    def loss_fn(outputs, micro, counts):
        log_probs, entropy = outputs
        loss = -((log_probs * micro["advantages"]).sum() + 0.1 * (entropy * micro["response_mask"]).sum())
        loss = loss / counts.num_tokens
        return loss, {"loss": float(loss.detach())}, {}

    results = {}
    for layout in ("packed", "packed_rows", "padded"):
        lm = load_pretrained(ModelConfig(path=model_dir), torch.float32)
        optim = OptimConfig(lr=LR, eps=1e-5)
        engine = FSDPEngine(
            PolicyModel(lm), ctx, blocks=block_types(lm), layout=layout, optim=optim, total_steps=1
        )
        log_probs, entropy = engine.infer(columns, 2, temperature=TEMPERATURE, with_entropy=True)
        metrics = engine.train(
            columns,
            num_mini_batches=1,
            micro_batch_size=2,
            epochs=1,
            loss_fn=loss_fn,
            temperature=TEMPERATURE,
            with_entropy=True,
        )
        results[layout] = log_probs, entropy, metrics, dict(engine.full_state_dict())
    (lp_a, ent_a, metrics_a, weights_a), *others = results.values()
    mask = local["response_mask"].bool()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        expected_lp, expected_entropy = _padded_log_probs(model, local)
    for log_probs, entropy, _, _ in results.values():  # in the original sample order
        torch.testing.assert_close(log_probs[mask], expected_lp[mask], rtol=0, atol=1e-5)
        torch.testing.assert_close(entropy[mask], expected_entropy[mask], rtol=0, atol=1e-5)
        assert (log_probs[~mask] == 0).all()
    moved = 0.0
    for _, _, metrics_b, weights_b in others:
        assert metrics_a["loss"] == pytest.approx(metrics_b["loss"], rel=1e-5)
        for name, tensor in weights_a.items():
            torch.testing.assert_close(weights_b[name], tensor, rtol=1e-4, atol=2e-5, msg=name)
            moved = max(moved, float((tensor - model.state_dict()[name.removeprefix("lm.")]).abs().max()))
    assert moved > 1e-3


# ------------------------------------------------------------------ check 5: on-policy update


def _check_on_policy(rank: int, ctx: WorkerContext, model_dir: str) -> None:
    from tidal.workers.roles.actor import ActorRole

    cfg = _config(model_dir, total_steps=1)
    cfg.actor.mini_batch_prompts, cfg.actor.epochs = None, 1  # one optimizer step per sample
    cfg.actor.use_kl_loss = False
    cfg.actor.micro_batch_size_per_rank = 2
    local = _data(7, seed=7).split(WORLD)[rank]
    precomputed, on_policy = ActorRole(cfg, ctx), ActorRole(cfg, ctx)
    metrics = precomputed.update(local.union(precomputed.compute_log_probs(local)))
    assert "old_log_probs" not in local
    on_policy_metrics = on_policy.update(local)
    assert on_policy_metrics["actor/ppo_kl"] == 0.0
    for key, value in metrics.items():
        assert on_policy_metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    initial = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    moved = 0.0
    for (name, expected), (_, got) in zip(precomputed.export_weights(), on_policy.export_weights()):
        assert torch.equal(got, expected), name
        moved = max(moved, float((got - initial[name]).abs().max()))
    assert moved > 1e-3

    on_policy.cfg.actor.epochs = 2  # a second pass would need the pre-update log-probs
    with pytest.raises(ValueError, match="old_log_probs"):
        on_policy.update(local)


# ------------------------------------------------------------------ the test


def _rank_main(rank: int, init_method: str, model_dir: str, ckpt_dir: str) -> None:
    ctx = _init(rank, init_method)
    _check_equivalence(rank, ctx, model_dir)
    _check_critic(rank, ctx, model_dir)
    _check_resume(rank, ctx, model_dir, ckpt_dir)
    _check_layouts(rank, ctx, model_dir)
    _check_on_policy(rank, ctx, model_dir)
    dist.destroy_process_group()


def test_fsdp_roles_match_single_process_and_resume_bit_identically(model_dir, tmp_path):
    ckpt_dir = os.path.join(tmp_path, "ckpt")
    _spawn(_rank_main, tmp_path, model_dir, ckpt_dir)
    assert os.path.exists(os.path.join(ckpt_dir, "rank_00001.pt"))
