"""Offline preference training from config, through run.train: DPO learns the arithmetic pairs (its
training accuracy and margin rise from exactly 0, the policy starting equal to the reference);
SimPO trains on pair files without reference or rollout; REDI runs its SFT stage, then its loss; a
resumed DPO run ends bit-identical to a straight one. Tiny model (about 60 s for the five jobs)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_job import ONE_WORKER, QUIET, tiny_model
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tidal.config import load_config
from tidal.config.schema import ArithmeticTask
from tidal.controller.run import train
from tidal.observability.metrics import read_metrics
from tidal.tasks.arithmetic import make_pairs

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tmp_path_factory.mktemp("preference") / "model"


def run(model_path, out, *overrides: str) -> list[dict]:
    cfg = load_config(
        None,
        [
            *tiny_model(model_path),
            *ONE_WORKER,
            "trainer.prompts_per_step=16",
            f"trainer.output_dir={out}",
            *QUIET,
            *overrides,
        ],
    )
    train(cfg)
    return read_metrics(out / "metrics.jsonl")


TASK = ["data.task.type=arithmetic", "data.task.max_digits=1", "data.task.num_val=8"]


def test_dpo_learns_the_arithmetic_pairs(model_path, tmp_path):
    rows = run(
        model_path,
        tmp_path / "dpo",
        *TASK,
        "data.task.num_train=16",  # every step sees the same 16 pairs
        "algorithm.preference.type=dpo",
        "algorithm.preference.beta=0.5",
        "actor.optim.lr=3e-3",
        "trainer.total_steps=5",
    )
    evaluation, *steps = rows
    assert evaluation["step"] == 0
    assert evaluation["val/loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference
    assert "val/reward" in evaluation  # the task's greedy held-out accuracy, through the rollout
    assert [row["step"] for row in steps] == [1, 2, 3, 4, 5]
    first, last = steps[0], steps[-1]
    assert first["actor/preference/margin"] == 0 and first["actor/preference/accuracy"] == 0
    assert last["actor/preference/margin"] > 0.5  # measured: 1.56 after 4 updates
    assert last["actor/preference/accuracy"] >= 0.9  # measured: 1.0 from the third step
    assert last["actor/loss"] < first["actor/loss"]
    assert last["actor/grad_norm"] > 0 and last["actor/lr"] == pytest.approx(3e-3)
    assert {"val/loss", "val/preference/accuracy", "val/preference/margin", "val/reward"} <= set(last)


def test_simpo_trains_on_pair_files_without_reference_or_rollout(model_path, tmp_path):
    task = ArithmeticTask(max_digits=1, num_train=32, num_val=8)
    files = {}
    for split in ("train", "val"):
        files[split] = tmp_path / f"{split}.jsonl"
        with files[split].open("w") as f:
            for pair in make_pairs(task, split):
                f.write(
                    json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected})
                    + "\n"
                )
            f.write(json.dumps({"prompt": "1+1=", "chosen": "2"}) + "\n")  # counted and skipped
    rows = run(
        model_path,
        tmp_path / "simpo",
        f"data.train_files=[{files['train']}]",
        f"data.val_files=[{files['val']}]",
        "algorithm.preference.type=simpo",
        "algorithm.preference.gamma=0.2",
        "trainer.total_steps=1",
    )
    assert [row["step"] for row in rows] == [0, 1]
    assert not any("val/reward" in row for row in rows)  # no rollout without a task
    step = rows[-1]
    assert step["actor/sft_stage"] == 0 and step["actor/grad_norm"] > 0
    assert 0 <= step["actor/preference/accuracy"] <= 1 and "val/preference/margin" in step


def test_redi_runs_its_sft_stage_then_its_loss(model_path, tmp_path):
    rows = run(
        model_path,
        tmp_path / "redi",
        *TASK,
        "data.task.num_train=32",
        "algorithm.preference.type=redi",
        "algorithm.preference.sft_steps=1",
        "algorithm.preference.alpha=0.5",
        "trainer.total_steps=2",
    )
    stage_one, stage_two = rows[-2:]
    assert (stage_one["step"], stage_one["actor/sft_stage"]) == (1, 1)
    assert "actor/preference/accuracy" not in stage_one and stage_one["actor/loss"] > 0
    assert (stage_two["step"], stage_two["actor/sft_stage"]) == (2, 0)
    assert "actor/preference/chosen_log_prob" in stage_two and "actor/preference/margin" in stage_two


def _weights(out, step: int) -> dict:
    target = out / f"step{step}.pt"
    dcp_to_torch_save(out / "checkpoints" / f"step_{step:08d}" / "actor" / "sharded", target)
    return torch.load(target, weights_only=False)["model"]


def test_a_resumed_dpo_run_is_bit_identical(model_path, tmp_path):
    """Interrupted after step 2 and resumed: same weights and metrics as the straight run (the pair
    loader's shuffled order, the optimizer and the schedule all come back)."""
    common = (
        *TASK,
        "data.task.num_train=64",
        "algorithm.preference.type=dpo",
        "actor.optim.lr=1e-3",
        "actor.optim.schedule=cosine",
        "actor.optim.warmup_steps=1",
        "trainer.total_steps=4",
        "trainer.eval_every=0",
        "checkpoint.save_every=2",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(model_path, straight, *common)
    shutil.copytree(straight / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    kept = (straight / "metrics.jsonl").read_text().splitlines()[:3]  # steps 0-2 were logged
    (resumed / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    rows = run(model_path, resumed, *common, "trainer.resume=true")

    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4]
    a, b = _weights(straight, 4), _weights(resumed, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    start = _weights(straight, 2)
    assert any(not torch.equal(start[name], a[name]) for name in a), "training did not change the weights"
    straight_rows = read_metrics(straight / "metrics.jsonl")
    for key in ("actor/loss", "actor/preference/margin", "actor/grad_norm", "actor/lr"):
        assert [r[key] for r in straight_rows[3:]] == [r[key] for r in rows[3:]], key
