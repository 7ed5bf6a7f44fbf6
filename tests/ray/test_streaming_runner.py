"""The streaming runner, free schedule, on a tiny model: rollout and training on separate pools, DAPO
dynamic sampling and decoupled PPO (truncated IS) on, weights pushed mid-generation.

The ledger is the audit: no sample is trained twice, none is both trained and refused, every trained
sample respects the staleness bound, and filtered samples gave their budget back."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import Counter
from pathlib import Path

import pytest
from tiny_job import QUIET, TWO_POOLS, WARM_ARITHMETIC, tiny_model

from tidal.config import load_config
from tidal.controller.run import train
from tidal.observability.metrics import read_metrics

pytestmark = pytest.mark.ray

STEPS = 4
ETA = 1


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("streaming") / "model"


def overrides(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        *tiny_model(model),
        *WARM_ARITHMETIC,
        *TWO_POOLS,
        "rollout.sampling.n=4",
        "rollout.sampling.max_new_tokens=4",
        "trainer.prompts_per_step=4",
        f"trainer.total_steps={STEPS}",
        "trainer.num_eval_prompts=4",
        "trainer.eval_every=2",
        f"trainer.output_dir={out}",
        *QUIET,
        "trainer.mode=streaming",
        f"trainer.max_staleness={ETA}",
        "trainer.streaming.ledger=true",
        "actor.optim.lr=1e-3",
        "algorithm.off_policy={type: tis, threshold: 2.0}",
        *extra,
    ]


def read_ledger(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "streaming_ledger.jsonl").read_text().splitlines()]


def test_free_streaming_run_trains_each_sample_once_within_the_bound(tmp_path, model_dir):
    out = tmp_path / "run"
    train(
        load_config(
            None,
            overrides(model_dir, out, "algorithm.dynamic_sampling={type: zero_variance, max_rounds: 50}"),
        )
    )
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    steps = rows[1:]
    for row in steps:
        assert row["dynamic_sampling/kept_groups"] == 4
        assert row["streaming/staleness_max"] <= ETA
        assert sum(row[f"streaming/staleness_hist/{lag}"] for lag in range(ETA + 1)) >= 16
        assert 0.0 <= row["streaming/rollout_busy_ratio"] <= 1.0
        assert row["weight_sync/bytes"] == row["weight_sync/lower_bound_bytes"] > 0
        assert "off_policy/is_mean" in row and row["actor/grad_norm"] > 0
    assert "val/reward" in rows[-1] and "val/reward" in rows[2]

    ledger = read_ledger(out)
    assert [e["step"] for e in ledger] == list(range(1, STEPS + 1))
    trained = [sid for e in ledger for sid in e["trained"]]
    refused = {sid for e in ledger for sid in e["stale"]}
    dropped = {sid for e in ledger for sid in e["dropped"]}
    assert len(trained) == len(set(trained)), Counter(trained).most_common(3)  # no sample twice
    assert not (set(trained) & (refused | dropped))
    for e in ledger:
        groups = Counter(sid.split("/")[0] for sid in e["trained"])
        assert set(groups.values()) == {4}  # whole groups only
    filtered = steps[-1]["streaming/filtered"]
    assert filtered == len(dropped) and steps[-1]["streaming/budget_returned"] >= filtered


def test_free_streaming_resume_neither_loses_nor_repeats_a_sample(tmp_path, model_dir):
    """A kill after the step-2 checkpoint, with groups generated ahead in the store and requests in
    flight: the resumed run trains what the store held, re-issues what was in flight, repeats nothing."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    train(load_config(None, overrides(model_dir, first, "checkpoint.save_every=2", "checkpoint.keep_last=3")))
    step2 = first / "checkpoints" / "step_00000002"
    shutil.copytree(step2, resumed / "checkpoints" / step2.name)
    for name in ("metrics.jsonl", "streaming_ledger.jsonl"):  # the later rows are dropped on resume
        shutil.copy(first / name, resumed / name)
    train(
        load_config(
            None,
            overrides(
                model_dir, resumed, "checkpoint.save_every=2", "checkpoint.keep_last=3", "trainer.resume=true"
            ),
        )
    )

    before, after = read_ledger(first), read_ledger(resumed)
    assert [e["step"] for e in after] == [1, 2, 3, 4] and after[:2] == before[:2]
    trained = [sid for e in after for sid in e["trained"]]
    assert len(trained) == len(set(trained))
    state = pickle.loads((step2 / "stream.pkl").read_bytes())
    waiting = [sid for sid, _, _, consumed in state["store"]["index"]["samples"] if "train" not in consumed]
    assert waiting, "nothing was generated ahead at the checkpoint: the test shows nothing"
    later = {sid for e in after[2:] for sid in e["trained"] + e["stale"] + e["dropped"]}
    assert set(waiting) <= later  # every sample the store held at the checkpoint was used after it
    rows = read_metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and rows[3]["resume/step"] == 2
