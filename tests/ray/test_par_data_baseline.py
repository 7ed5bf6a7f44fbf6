"""PAR with the data baseline in a real run: the references come from a `reference` column of the
train files and are scored, no greedy response is generated (two GRPO steps of a tiny model, ~20 s).

Every reference is a right answer, so r_ref = 1 for every prompt: the mean reference reward is
exactly 1 (a greedy response of the untrained model would score about 0), and every shaped reward
is sigmoid(r - 1) <= 0.5 because the arithmetic reward is at most 1.
"""

from __future__ import annotations

import json

import pytest
from tiny_job import ONE_WORKER, QUIET, tiny_model

from tidal.config import load_config
from tidal.controller.run import train
from tidal.observability.metrics import read_metrics

pytestmark = pytest.mark.ray


def write_rows(path, problems, with_references):
    with path.open("w") as f:
        for i, (a, b) in enumerate(problems):
            row = {"prompt": f"{a}+{b}=", "reward_model": {"ground_truth": str(a + b)}}
            if with_references:
                # A string or a list of strings: M = 1 or 2 references, so the step's batch is ragged.
                row["reference"] = str(a + b) if i % 2 else [str(a + b), f"{a + b} "]
            f.write(json.dumps(row) + "\n")
    return path


def test_par_scores_the_datas_reference_responses(tmp_path):
    train_file = write_rows(tmp_path / "train.jsonl", [(a, b) for a in range(4) for b in range(3)], True)
    val_file = write_rows(tmp_path / "val.jsonl", [(5, 4), (6, 3)], False)  # val rows need no reference
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            *tiny_model(tmp_path / "model", num_layers=1, hidden_size=32, intermediate_size=64),
            f"data.train_files=[{train_file}]",
            f"data.val_files=[{val_file}]",
            "data.reference_response_key=reference",
            *ONE_WORKER,
            "reward.function=arithmetic",
            "rollout.sampling.n=2",
            "rollout.sampling.max_new_tokens=3",
            "trainer.prompts_per_step=4",
            "trainer.total_steps=2",
            f"trainer.output_dir={out}",
            *QUIET,
            "algorithm.reward_shaping=[{type: par, baseline: data}]",
        ],
    )
    train(cfg)
    rows = read_metrics(out / "metrics.jsonl")[1:]
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert row["shaping/par_ref_reward_mean"] == 1.0  # the data's references, all right answers
        assert row["baseline_reward/mean"] == 1.0 and row["baseline_reward/num_errors"] == 0
        assert 0 < row["shaping/par_mean"] <= 0.5  # sigmoid(r - 1) with r <= 1
        assert row["reward/num_errors"] == 0
