"""One run per output dir: refusal, overwrite, config fingerprints on resume (no Ray, no model)."""

from __future__ import annotations

import json

import pytest

from tidal.checkpoint.manager import CheckpointManager
from tidal.checkpoint.run_dir import (
    check_output_dir,
    config_fingerprint,
    fingerprinted_config,
    prepare_output_dir,
)
from tidal.config import load_config


def cfg_with(out, *overrides: str):
    return load_config(
        None, ["model.path=/tmp/m", "data.task.type=arithmetic", f"trainer.output_dir={out}", *overrides]
    )


def save_checkpoint(cfg, step: int, run_id: str = "run-a") -> None:
    """What Job.maybe_save_checkpoint writes, minus the roles' weights."""
    manager = CheckpointManager(cfg.trainer.output_dir, keep_last=10, run_id=run_id)
    manager.begin(step)
    manager.finish(
        step, {"step": step, "fingerprint": config_fingerprint(cfg), "config": fingerprinted_config(cfg)}
    )


def test_a_fresh_run_in_an_empty_or_missing_dir_starts(tmp_path):
    check_output_dir(cfg_with(tmp_path / "new"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    check_output_dir(cfg_with(tmp_path / "empty"))


def test_a_fresh_run_over_an_earlier_run_is_refused_with_the_fix(tmp_path):
    cfg = cfg_with(tmp_path)
    save_checkpoint(cfg, 150)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    with pytest.raises(ValueError) as err:
        check_output_dir(cfg)
    text = str(err.value)
    for needle in (
        f"trainer.output_dir={tmp_path}",
        "150",
        "metrics.jsonl with 2 row(s)",
        "trainer.resume=true",
        "trainer.overwrite=true",
    ):
        assert needle in text, needle


def test_metrics_alone_count_as_an_earlier_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(ValueError, match="metrics.jsonl with 1 row"):
        check_output_dir(cfg_with(tmp_path))


def test_resume_and_overwrite_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="pick one"):
        check_output_dir(cfg_with(tmp_path, "trainer.resume=true", "trainer.overwrite=true"))


def test_overwrite_deletes_only_the_runs_files(tmp_path):
    cfg = cfg_with(tmp_path, "trainer.overwrite=true")
    save_checkpoint(cfg, 10)
    for name in ("metrics.jsonl", "metrics.png", "notes.txt"):
        (tmp_path / name).write_text("x\n")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events").write_text("x")
    ray_target = tmp_path / "elsewhere"
    ray_target.mkdir()
    (tmp_path / "ray").symlink_to(ray_target)
    check_output_dir(cfg)  # overwrite: allowed
    run_id = prepare_output_dir(cfg)

    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["elsewhere", "notes.txt", "ray", "run.json"]
    assert json.loads((tmp_path / "run.json").read_text())["run_id"] == run_id
    check_output_dir(cfg_with(tmp_path))  # now empty of runs: a plain fresh run may start


def test_resume_accepts_the_same_config_and_keys_free_on_resume(tmp_path):
    save_checkpoint(cfg_with(tmp_path / "a"), 2, run_id="abc")
    moved = tmp_path / "b"
    (tmp_path / "a").rename(moved)  # a run dir may be moved
    cfg = cfg_with(
        moved,
        "trainer.resume=true",
        "trainer.total_steps=99",
        "trainer.eval_every=3",
        "trainer.num_eval_prompts=4",
        "logging.tensorboard=false",
        "checkpoint.keep_last=7",
    )
    check_output_dir(cfg)
    assert prepare_output_dir(cfg) == "abc"  # the resumed run keeps its run id


def test_resume_refuses_another_config_naming_the_keys(tmp_path):
    save_checkpoint(cfg_with(tmp_path), 2)
    cfg = cfg_with(tmp_path, "trainer.resume=true", "actor.optim.lr=0.5", "trainer.seed=7")
    with pytest.raises(ValueError) as err:
        check_output_dir(cfg)
    text = str(err.value)
    assert "different config" in text and "step_00000002" in text
    assert (
        "actor.optim.lr: checkpoint" in text
        and "now 0.5" in text
        and "trainer.seed: checkpoint 0, now 7" in text
    )
    assert "trainer.resume:" not in text and "trainer.total_steps" not in text


def test_long_values_are_cut_in_the_message(tmp_path):
    save_checkpoint(cfg_with(tmp_path), 2)
    long_path = "/tmp/" + "m" * 200
    with pytest.raises(ValueError) as err:
        check_output_dir(cfg_with(tmp_path, "trainer.resume=true", f"model.path={long_path}"))
    assert "model.path" in str(err.value) and long_path not in str(err.value) and "..." in str(err.value)


def test_resume_refuses_a_checkpoint_without_fingerprint(tmp_path):
    manager = CheckpointManager(tmp_path, run_id="old")
    manager.begin(4)
    manager.finish(4, {"step": 4})
    with pytest.raises(ValueError, match="no config fingerprint"):
        check_output_dir(cfg_with(tmp_path, "trainer.resume=true"))


def test_resume_with_no_checkpoint_is_allowed_and_gets_a_new_run_id(tmp_path):
    cfg = cfg_with(tmp_path, "trainer.resume=true")
    check_output_dir(cfg)
    assert len(prepare_output_dir(cfg)) == 12
