"""A run interrupted after a checkpoint and resumed ends with the same weights, bit for bit, and
with each step once in metrics.jsonl; a fresh run into a dir holding a run is refused."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tidal.config import load_config
from tidal.controller.run import train
from tidal.observability.metrics import read_metrics


def run(quickstart: Path, model: Path, out: Path, steps: int, resume: bool = False, *extra: str) -> None:
    cfg = load_config(
        quickstart,
        [
            f"model.path={model}",
            f"trainer.output_dir={out}",
            f"trainer.total_steps={steps}",
            f"trainer.resume={str(resume).lower()}",
            "model.build.sft_steps=50",
            "trainer.prompts_per_step=4",
            "rollout.sampling.n=4",
            "actor.mini_batch_prompts=2",  # two optimizer steps per RL step: the scheduler moves too
            "actor.optim.schedule=cosine",
            "actor.optim.warmup_steps=1",
            "trainer.eval_every=0",
            "trainer.num_eval_prompts=8",
            "checkpoint.save_every=2",
            "checkpoint.keep_last=5",
            "logging.progress_bar=false",
            "logging.tensorboard=false",
            "logging.plot=false",
            *extra,
        ],
    )
    train(cfg)


def final_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    target = out / "final.pt"
    dcp_to_torch_save(out / "checkpoints" / f"step_{step:08d}" / "actor" / "sharded", target)
    return torch.load(target, weights_only=False)["model"]


@pytest.mark.slow
@pytest.mark.ray
def test_resumed_run_is_bit_identical(tmp_path, models_dir, quickstart):
    model = models_dir / "quickstart"
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    run(quickstart, model, straight_dir, steps=4)
    # An interruption while saving step 4: the checkpoint of step 2 is the newest complete one, and
    # metrics.jsonl already holds steps 3 and 4, which the resumed run redoes.
    shutil.copytree(
        straight_dir / "checkpoints" / "step_00000002", resumed_dir / "checkpoints" / "step_00000002"
    )
    shutil.copy(straight_dir / "metrics.jsonl", resumed_dir / "metrics.jsonl")

    with pytest.raises(ValueError, match=r"holds an earlier run .*trainer.resume=true"):
        run(quickstart, model, resumed_dir, steps=4)  # a fresh run would mix two runs' files
    with pytest.raises(ValueError, match=r"different config: actor.optim.lr: checkpoint"):
        run(quickstart, model, resumed_dir, 4, True, "actor.optim.lr=0.5")
    run(quickstart, model, resumed_dir, steps=4, resume=True)

    a, b = final_weights(straight_dir, 4), final_weights(resumed_dir, 4)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    start = final_weights(straight_dir, 2)
    assert any(not torch.equal(start[n], a[n]) for n in a), "training did not change the weights"

    straight = read_metrics(straight_dir / "metrics.jsonl")
    resumed = read_metrics(resumed_dir / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]  # steps 3 and 4 once, from the resumed run
    assert resumed[0]["data/train_prompts"] > 0 and "data/train_skipped" in resumed[0]
    assert (
        resumed[3]["resume/step"] == 2
        and resumed[3]["data/train_prompts"] == resumed[0]["data/train_prompts"]
    )
    for key in ("reward/mean", "actor/pg_loss", "actor/grad_norm"):
        assert [r[key] for r in straight[3:]] == [r[key] for r in resumed[3:]], key


@pytest.mark.slow
@pytest.mark.ray
def test_resuming_a_finished_run_says_so(tmp_path, models_dir, quickstart, caplog):
    model = models_dir / "quickstart"
    out = tmp_path / "run"
    run(quickstart, model, out, steps=2)
    before = (out / "metrics.jsonl").read_text()
    with caplog.at_level(logging.INFO, logger="tidal"):
        run(quickstart, model, out, steps=2, resume=True)
    assert "resumed from" in caplog.text and "(step 2)" in caplog.text
    assert "already at step 2 of 2; nothing to train" in caplog.text
    assert (out / "metrics.jsonl").read_text() == before
