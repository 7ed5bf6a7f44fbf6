"""A rollout worker killed in the middle of a free-schedule streaming run: the runner restarts the
rollout pool, issues the requests it had in flight again and finishes the run.

The ledger is the audit: every step trained a whole batch of whole groups, and no sample was trained
twice (a request whose group reached the store before the death is kept, not issued again)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import ray
from tiny_job import QUIET, TWO_POOLS, tiny_model

from tidal.config import load_config
from tidal.controller.job import Job
from tidal.controller.run import train
from tidal.observability.metrics import read_metrics

pytestmark = pytest.mark.ray

STEPS = 4
GROUPS, N = 4, 4  # prompts per step, samples per prompt
KILL_AFTER_STEP = 2


def overrides(model: Path, out: Path) -> list[str]:
    return [
        *tiny_model(model),
        "data.task.type=arithmetic",
        "data.task.max_digits=1",
        "data.task.num_train=200",
        "data.task.num_val=4",
        *TWO_POOLS,
        f"rollout.sampling.n={N}",
        "rollout.sampling.max_new_tokens=4",
        f"trainer.prompts_per_step={GROUPS}",
        f"trainer.total_steps={STEPS}",
        "trainer.num_eval_prompts=4",
        "trainer.eval_every=0",  # evaluations only before the first step and after the last
        f"trainer.output_dir={out}",
        *QUIET,
        "trainer.mode=streaming",
        "trainer.max_staleness=1",
        "trainer.streaming.ledger=true",
        "trainer.streaming.wait_timeout_s=60",
    ]


def kill_rollout_after(jobs: list[Job], ledger: Path, step: int, killed: list[str]) -> None:
    """Once the ledger holds step `step` (its batch taken, more requests in flight), kill the rollout
    pool's worker, as a crash would."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if jobs and ledger.exists() and len(ledger.read_text().splitlines()) >= step:
            worker = jobs[0].cluster.group_of("rollout").workers[0]
            ray.kill(worker, no_restart=True)
            killed.append(f"after step {step}")
            return
        time.sleep(0.05)


def test_killed_rollout_worker_is_restarted_and_nothing_is_lost_or_trained_twice(
    tmp_path, monkeypatch, caplog
):
    out = tmp_path / "run"
    jobs: list[Job] = []
    start = Job.start.__func__

    def start_and_keep(cls, *args, **kwargs):  # the test's way to the job's rollout worker
        jobs.append(start(cls, *args, **kwargs))
        return jobs[-1]

    monkeypatch.setattr(Job, "start", classmethod(start_and_keep))
    killed: list[str] = []
    killer = threading.Thread(
        target=kill_rollout_after,
        args=(jobs, out / "streaming_ledger.jsonl", KILL_AFTER_STEP, killed),
        daemon=True,
    )
    killer.start()
    with caplog.at_level(logging.WARNING, logger="tidal"):
        train(load_config(None, overrides(tmp_path / "model", out)))
    killer.join(timeout=5)
    assert killed, "the rollout worker was never killed: the test shows nothing"

    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert rows[-1]["streaming/rollout_restarts"] >= 1
    assert rows[1]["streaming/rollout_restarts"] == 0
    assert "val/reward" in rows[-1]  # the restarted pool serves the final evaluation too
    restarts = [r.getMessage() for r in caplog.records if "restarted in" in r.getMessage()]
    assert restarts and "rollout rank 0" in " ".join(r.getMessage() for r in caplog.records)

    ledger = [json.loads(line) for line in (out / "streaming_ledger.jsonl").read_text().splitlines()]
    assert [e["step"] for e in ledger] == list(range(1, STEPS + 1))
    trained = [sid for e in ledger for sid in e["trained"]]
    assert len(trained) == len(set(trained)), Counter(trained).most_common(3)  # no sample twice
    for e in ledger:
        assert len(e["trained"]) == GROUPS * N  # no step trained less than its batch
        groups = Counter(sid.split("/")[0] for sid in e["trained"])
        assert set(groups.values()) == {N}  # whole groups only
