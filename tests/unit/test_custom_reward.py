"""User reward functions as 'pkg.mod:fn' or 'path/file.py:fn': loaded and checked at config time with
errors naming the file or module and the function, file paths stored absolute, and the runtime
environments that ship the code to the Ray workers. No Ray here (tests/ray/test_custom_reward.py)."""

from __future__ import annotations

import copy
import sys
import textwrap

import pytest
import torch

from tidal.config import ConfigError, config_from_dict
from tidal.config.loader import apply_overrides
from tidal.dataflow.batch import Batch
from tidal.workers.rewards import custom
from tidal.workers.rewards.scorer import score_batch

BASE = {"model": {"path": "/tmp/m"}, "data": {"task": {"type": "arithmetic"}}}

GOOD = """
def length_bonus(prompt, response, ground_truth):
    return float(response.strip() == ground_truth) + 0.1 * len(response)


def two_args(prompt, response):
    return 0.0


def star_args(*args):
    return 1.0


def needs_keyword(prompt, response, ground_truth, *, scale):
    return scale


NOT_A_FUNCTION = 3
"""


def one_sample(response: str, truth: str) -> Batch:
    return Batch.from_dict(
        {"response_mask": torch.ones(1, 2)},
        {"prompt_text": ["p"], "response_text": [response], "ground_truth": [truth]},
    )


def cfg_with(*overrides: str):
    return config_from_dict(apply_overrides(copy.deepcopy(BASE), list(overrides)))


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        cfg_with(*overrides)
    return str(err.value)


def test_a_file_spec_is_checked_and_stored_absolute(tmp_path, monkeypatch):
    write(tmp_path / "rewards" / "mine.py", GOOD)
    monkeypatch.chdir(tmp_path)
    cfg = cfg_with("reward.function=rewards/mine.py:length_bonus")
    assert cfg.reward.function == f"{tmp_path}/rewards/mine.py:length_bonus"
    assert "mine" not in sys.modules  # loaded under a private name, nothing put on sys.path
    # *args takes the three arguments too.
    assert cfg_with("reward.function=rewards/mine.py:star_args").reward.function.endswith(":star_args")
    fn = custom.resolve_reward_function(cfg.reward.function)
    out, _ = score_batch(one_sample("82", "82"), cfg.reward.function)
    assert out["seq_reward"].tolist() == [pytest.approx(fn("p", "82", "82"))] == [pytest.approx(1.2)]


def test_a_module_spec_and_custom_combination_components(tmp_path, monkeypatch):
    write(tmp_path / "my_rewards" / "__init__.py", "")
    write(tmp_path / "my_rewards" / "rules.py", GOOD)
    write(tmp_path / "other.py", GOOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for name in ("my_rewards", "my_rewards.rules"):  # this test's own package, never an earlier import
        monkeypatch.delitem(sys.modules, name, raising=False)
    cfg = cfg_with("reward.function=my_rewards.rules:length_bonus")
    assert cfg.reward.function == "my_rewards.rules:length_bonus"
    cfg = cfg_with(
        "algorithm.reward_combination={type: weighted_sum, "
        "components: [arithmetic, 'my_rewards.rules:star_args', 'other.py:length_bonus']}"
    )
    assert cfg.algorithm.reward_combination.components == [
        "arithmetic",
        "my_rewards.rules:star_args",
        f"{tmp_path}/other.py:length_bonus",
    ]
    # The job-level runtime env ships the package and the file; the tasks get the package's root.
    assert custom.reward_runtime_env(cfg) == {
        "py_modules": [str(tmp_path / "my_rewards"), f"{tmp_path}/other.py"]
    }
    assert custom.reward_task_runtime_env("my_rewards.rules:star_args") == {
        "env_vars": {"PYTHONPATH": str(tmp_path)}
    }
    assert custom.reward_task_runtime_env(f"{tmp_path}/other.py:length_bonus") is None
    # Registered names, installed modules and tidal itself need nothing shipped.
    assert custom.reward_runtime_env(cfg_with("reward.function=arithmetic")) is None
    assert custom.reward_task_runtime_env("json:dumps") is None
    assert custom.reward_task_runtime_env("tidal.workers.rewards.arithmetic:arithmetic_reward") is None
    assert (
        custom.label("my_rewards.rules:star_args") == "star_args"
        and custom.label("arithmetic") == "arithmetic"
    )


def test_config_errors_name_the_file_or_module_the_function_and_the_problem(tmp_path, monkeypatch):
    good = write(tmp_path / "good.py", GOOD)
    write(tmp_path / "broken.py", "import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)

    message = config_error("reward.function=missing.py:fn")
    assert (
        f"file {tmp_path}/missing.py does not exist" in message
        and "reward.function='missing.py:fn'" in message
    )

    message = config_error("reward.function=broken.py:fn")
    assert (
        "loading file" in message and "ModuleNotFoundError" in message and "no_such_dependency_xyz" in message
    )

    message = config_error("reward.function=no_such_pkg_xyz.mod:fn")
    assert "cannot import module no_such_pkg_xyz.mod: ModuleNotFoundError" in message

    message = config_error("reward.function=good.py:length_bonsu")
    assert f"file {good} has no function 'length_bonsu'" in message
    assert "did you mean 'length_bonus'?" in message and "'two_args'" in message

    message = config_error("reward.function=good.py:NOT_A_FUNCTION")
    assert "'NOT_A_FUNCTION' in file" in message and "is a int, not a function" in message

    message = config_error("reward.function=good.py:two_args")
    assert "two_args(prompt, response) cannot be called with 3 positional arguments" in message
    assert custom.SIGNATURE in message

    message = config_error("reward.function=good.py:needs_keyword")
    assert "missing a required argument: 'scale'" in message

    with pytest.raises(ValueError, match="is not a reward function spec"):
        custom.split_spec("good.py:")

    message = config_error(
        "algorithm.reward_combination={type: min, components: [arithmetic, 'good.py:two_args']}"
    )
    assert "algorithm.reward_combination.components.1='good.py:two_args'" in message

    # A registered name is still checked against the registry.
    assert "did you mean 'arithmetic'?" in config_error("reward.function=arithmetc")


def test_a_file_named_like_a_module_is_refused(tmp_path, monkeypatch):
    write(tmp_path / "json.py", GOOD)
    monkeypatch.chdir(tmp_path)
    message = config_error("reward.function=json.py:length_bonus")
    assert "named like the module 'json'" in message and "rename the file" in message


def test_a_worker_without_the_file_finds_the_copy_the_runtime_env_shipped(tmp_path, monkeypatch):
    """On another machine the absolute path is missing; py_modules put the file on the import path."""
    shipped = tmp_path / "ray_pkg_abc"
    write(shipped / "far_away_reward.py", GOOD)
    monkeypatch.syspath_prepend(str(shipped))
    fn = custom.load_custom("/nonexistent/dir/far_away_reward.py:length_bonus")
    assert fn("p", "1", "1") == pytest.approx(1.1)
