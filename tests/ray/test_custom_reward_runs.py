"""User reward functions in a real run (tiny model, session cluster, ~25 s each):

1. a reward combination of a function in a .py file of a temp dir (not on the driver's sys.path) and
   one given as 'pkg.mod:fn' of a package outside the installed ones: both are found in the Ray
   workers; the file's function raises on every third call, and those samples are counted, logged
   once and dropped from the loss;
2. a function that always raises stops the run with a RewardFailureError naming the share, the
   limit, the first error and the fix.
"""

from __future__ import annotations

import logging
import textwrap

import pytest
from tiny_job import ONE_WORKER, QUIET, tiny_model

from tidal.config import load_config
from tidal.controller.run import train
from tidal.observability.metrics import read_metrics
from tidal.workers.rewards.scorer import RewardFailureError

pytestmark = pytest.mark.ray

FLAKY = """
CALLS = [0]


def flaky(prompt, response, ground_truth):
    CALLS[0] += 1
    if CALLS[0] % 3 == 0:
        return 1 / 0
    return float(len(response.strip()) > 0)
"""

RULES = """
def exact(prompt, response, ground_truth):
    return float(response.strip().startswith(ground_truth))
"""

BROKEN = """
def broken(prompt, response, ground_truth):
    raise KeyError(ground_truth)
"""


def job(tmp_path, *overrides: str) -> list[str]:
    return [
        *tiny_model(tmp_path / "model", num_layers=1, hidden_size=32, intermediate_size=64),
        "data.task.type=arithmetic",
        "data.task.max_digits=1",
        "data.task.num_val=4",
        *ONE_WORKER,
        "rollout.sampling.n=3",
        "rollout.sampling.max_new_tokens=3",
        "trainer.prompts_per_step=4",
        "trainer.total_steps=2",
        f"trainer.output_dir={tmp_path / 'run'}",
        *QUIET,
        *overrides,
    ]


def test_file_and_module_reward_functions_run_in_the_workers_and_failures_leave_the_loss(
    tmp_path, monkeypatch, caplog
):
    code = tmp_path / "user_code"
    (code / "ray_job_rewards").mkdir(parents=True)
    (code / "ray_job_rewards" / "__init__.py").write_text("")
    (code / "ray_job_rewards" / "rules.py").write_text(textwrap.dedent(RULES))
    (code / "flaky_reward.py").write_text(textwrap.dedent(FLAKY))
    monkeypatch.syspath_prepend(str(code))  # the package is importable on the driver only
    cfg = load_config(
        None,
        job(
            tmp_path,
            "algorithm.reward_combination={type: weighted_sum, components: "
            f"['{code}/flaky_reward.py:flaky', 'ray_job_rewards.rules:exact']}}",
        ),
    )
    with caplog.at_level(logging.WARNING, logger="tidal.workers.rewards.scorer"):
        train(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    steps = [row for row in rows if row.get("step", 0) >= 1 and "reward/num_errors" in row]
    assert [row["step"] for row in steps] == [1, 2]
    num_errors = sum(row["reward/num_errors"] for row in steps)
    assert num_errors >= 4  # every third of the 2 x 12 calls (and of the validation calls)
    for row in steps:
        assert row["reward/error_share"] == pytest.approx(row["reward/num_errors"] / 12)
        assert row["reward/num_dropped"] >= row["reward/num_errors"]  # + lone survivors of a group
        assert 0 <= row["reward/exact/mean"] <= 1 and 0 <= row["reward/flaky/mean"] <= 1
    warnings = [r.getMessage() for r in caplog.records if "first of its kind" in r.getMessage()]
    assert warnings == [
        "reward function flaky raised ZeroDivisionError: division by zero (first of its kind; later "
        "ones are counted in reward/num_errors)" + warnings[0].split("reward/num_errors)")[1]
    ]
    assert "sample: prompt=" in warnings[0]


def test_a_reward_function_that_always_fails_stops_the_run(tmp_path, monkeypatch):
    (tmp_path / "broken_reward.py").write_text(textwrap.dedent(BROKEN))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, job(tmp_path, "reward.function=broken_reward.py:broken"))
    assert cfg.reward.function == f"{tmp_path}/broken_reward.py:broken"
    with pytest.raises(RewardFailureError) as err:
        train(cfg)
    message = str(err.value)
    assert "100% of this step's sample rewards failed (12 of 12)" in message
    assert "reward.max_error_share=0.5" in message and "reward function broken raised KeyError" in message
    assert "Fix the reward function" in message
