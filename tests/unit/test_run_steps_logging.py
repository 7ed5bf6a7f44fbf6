"""The step loop's rows: the data report with the first row, resume/step, each step once (fake job, no Ray)."""

from __future__ import annotations

from types import SimpleNamespace

from tidal.config import load_config
from tidal.config.schema import LoggingConfig
from tidal.controller.loop import run_steps
from tidal.observability.metrics import MetricsLogger, read_metrics

REPORT = {"data/train_prompts": 90, "data/train_skipped": 3}


def fake_job(out, restored: int, total: int = 4):
    cfg = load_config(
        None,
        [
            "model.path=/tmp/m",
            "data.task.type=arithmetic",
            f"trainer.total_steps={total}",
            "logging.progress_bar=false",
        ],
    )
    return SimpleNamespace(
        cfg=cfg,
        restore_latest_checkpoint=lambda: restored,
        logger=MetricsLogger(out, LoggingConfig(tensorboard=False, plot=False, progress_bar=False)),
        data=SimpleNamespace(report=dict(REPORT)),
        state=SimpleNamespace(version=0),
        weight_sync=SimpleNamespace(push=lambda version: {}),
        maybe_save_checkpoint=lambda step: None,
    )


def step_fn(job, step):
    return {"reward/mean": float(step)}


def test_a_fresh_run_logs_the_data_report_in_row_0_only(tmp_path):
    job = fake_job(tmp_path, restored=0)
    run_steps(job, step_fn, evaluate=lambda job: {"val/reward": 0.5})
    job.logger.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0]["data/train_prompts"] == 90 and rows[0]["data/train_skipped"] == 3
    assert all("data/train_prompts" not in r and "resume/step" not in r for r in rows[1:])


def test_a_resumed_run_drops_abandoned_rows_and_marks_the_resume(tmp_path):
    first = fake_job(tmp_path, restored=0)
    run_steps(first, step_fn, evaluate=lambda job: {})
    first.logger.close()  # steps 0-4 logged; say the checkpoint of step 2 is the newest that survived
    job = fake_job(tmp_path, restored=2)
    run_steps(job, step_fn, evaluate=lambda job: {})
    job.logger.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[3]["resume/step"] == 2 and rows[3]["data/train_prompts"] == 90
    assert "resume/step" not in rows[4] and "data/train_prompts" not in rows[4]
