"""`reference.model_path`: the reference slot holds another model (KDRL's teacher), so the KL term
pulls the student towards it from the first step (with the initial policy as reference, it is 0
until the policy moves). Two tiny models share the task's tokenizer; about 20 s."""

from __future__ import annotations

import pytest
from tiny_job import ONE_WORKER, QUIET

from tidal.config import load_config
from tidal.config.schema import DataConfig, ModelConfig
from tidal.controller.run import train
from tidal.observability.metrics import read_metrics
from tidal.tasks.prepare import prepare_model

pytestmark = pytest.mark.ray

TINY = {"type": "tiny_qwen2", "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128}


def test_kdrl_teacher_in_the_reference_slot(tmp_path):
    teacher = ModelConfig(path=str(tmp_path / "teacher"), build={**TINY, "hidden_size": 96, "seed": 7})
    prepare_model(teacher, DataConfig(task={"type": "arithmetic", "max_digits": 1}))
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"model.path={tmp_path / 'student'}",
            *(f"model.build.{key}={value}" for key, value in TINY.items()),
            "model.build.hidden_size=64",
            "data.task.type=arithmetic",
            "data.task.max_digits=1",
            "data.task.num_train=200",
            "data.task.num_val=8",
            *ONE_WORKER,
            "rollout.sampling.n=2",
            "rollout.sampling.max_new_tokens=4",
            "trainer.prompts_per_step=2",
            "trainer.total_steps=1",
            "trainer.eval_every=0",
            "trainer.num_eval_prompts=2",
            f"trainer.output_dir={out}",
            *QUIET,
            "actor.use_kl_loss=true",
            "actor.kl_loss_type=mse",  # KDRL's k2 estimator
            "actor.kl_loss_coef=0.005",
            f"reference.model_path={teacher.path}",
        ],
    )
    train(cfg)
    step = read_metrics(out / "metrics.jsonl")[-1]
    assert step["step"] == 1
    # Before any update the student is its initial weights: only a different teacher gives a KL.
    assert step["actor/kl_loss"] > 1e-3, step["actor/kl_loss"]


def test_reference_model_with_another_vocabulary_stops_before_any_process(tmp_path, model_dir):
    cfg = load_config(
        None,
        [
            f"model.path={tmp_path / 'student'}",
            *(f"model.build.{key}={value}" for key, value in TINY.items()),
            "model.build.hidden_size=64",
            "data.task.type=arithmetic",
            "actor.use_kl_loss=true",
            f"reference.model_path={model_dir}",  # tests/conftest.py's model: vocabulary of 32
            f"trainer.output_dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(ValueError, match=r"reference.model_path=.* has vocab_size=32 but model.path has"):
        train(cfg)
