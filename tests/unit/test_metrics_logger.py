"""metrics.jsonl holds each step once after a resume (no Ray)."""

from __future__ import annotations

import json

from tidal.config.schema import LoggingConfig
from tidal.observability.metrics import MetricsLogger, read_metrics

QUIET = LoggingConfig(tensorboard=False, plot=False, progress_bar=False)


def write_rows(path, steps, tail: str = "") -> None:
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in steps) + tail)


def test_begin_drops_the_abandoned_steps_and_a_torn_line(tmp_path):
    write_rows(tmp_path / "metrics.jsonl", [0, 1, 2, 3, 4], tail='{"step": 5, "x"')
    logger = MetricsLogger(tmp_path, QUIET)
    assert logger.begin(3) == 3  # steps 3, 4 and the torn row
    logger.log(3, {"x": 30})
    logger.close()
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [
        (0, 0),
        (1, 1),
        (2, 2),
        (3, 30),
    ]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_a_start_from_step_0_empties_the_file(tmp_path):
    write_rows(tmp_path / "metrics.jsonl", [0, 1])
    logger = MetricsLogger(tmp_path, QUIET)
    logger.begin(0)
    logger.log(0, {"x": 1})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0]


def test_log_without_begin_starts_at_the_first_step_logged(tmp_path):
    write_rows(tmp_path / "metrics.jsonl", [0, 1, 2])
    logger = MetricsLogger(tmp_path, QUIET)
    logger.log(2, {"x": 9})
    logger.close()
    assert [(r["step"], r["x"]) for r in read_metrics(tmp_path / "metrics.jsonl")] == [(0, 0), (1, 1), (2, 9)]


def test_tensorboard_is_told_to_purge_the_redone_steps(tmp_path, monkeypatch):
    import torch.utils.tensorboard as tb

    seen = {}

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            seen["purge_step"] = purge_step

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tb, "SummaryWriter", Writer)
    (tmp_path / "tensorboard").mkdir()
    logger = MetricsLogger(tmp_path, LoggingConfig(plot=False))
    logger.begin(5)
    logger.close()
    assert seen["purge_step"] == 5
