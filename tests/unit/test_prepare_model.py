import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tidal.config.schema import ArithmeticTask, DataConfig, ModelConfig, TinyQwen2Build
from tidal.tasks import prepare
from tidal.tasks.prepare import MARKER, prepare_model

BUILD = TinyQwen2Build(
    num_layers=1,
    hidden_size=32,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=32,
    sft_steps=2,
    sft_batch_size=4,
)
DATA = DataConfig(task=ArithmeticTask(num_train=50, num_val=8))


def test_builds_once_then_reuses(tmp_path):
    cfg = ModelConfig(path=str(tmp_path / "models" / "tiny"), build=BUILD)
    path = prepare_model(cfg, DATA)
    assert (path / "config.json").is_file() and (path / MARKER).is_file()
    assert json.loads((path / MARKER).read_text())["build"]["sft_steps"] == 2
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert prepare_model(cfg, DATA) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == ["tiny"]  # no temporary folder left behind
    # Without a build, the same folder is just used.
    assert prepare_model(ModelConfig(path=str(path)), None) == path


def test_a_folder_built_from_another_config_is_not_reused(tmp_path):
    path = tmp_path / "tiny"
    prepare_model(ModelConfig(path=str(path), build=BUILD), DATA)
    with pytest.raises(ValueError, match="different model.build"):
        prepare_model(ModelConfig(path=str(path), build=BUILD.model_copy(update={"sft_steps": 3})), DATA)
    other_task = DataConfig(task=ArithmeticTask(num_train=50, num_val=8, seed=5))
    with pytest.raises(ValueError, match="different model.build"):
        prepare_model(ModelConfig(path=str(path), build=BUILD), other_task)


def test_user_mistakes_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="model.path=.*does not exist and model.build is not set"):
        prepare_model(ModelConfig(path=str(tmp_path / "missing")), DATA)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not built by tidal"):
        prepare_model(ModelConfig(path=str(foreign), build=BUILD), DATA)
    with pytest.raises(ValueError, match="sft_steps=2 needs"):
        prepare_model(ModelConfig(path=str(tmp_path / "x"), build=BUILD), DataConfig(train_files=["a.jsonl"]))
    assert not (tmp_path / "x").exists()


def test_an_empty_folder_is_built_into(tmp_path):
    (tmp_path / "empty").mkdir()
    path = prepare_model(ModelConfig(path=str(tmp_path / "empty"), build=BUILD), DATA)
    assert (path / MARKER).is_file()


def test_racing_builders_both_succeed(tmp_path, monkeypatch):
    # Hold both builders until each has started, so that both really build and one rename loses.
    barrier = threading.Barrier(2, timeout=60)
    real_build = prepare._build

    def build_after_both_started(*args):
        barrier.wait()
        real_build(*args)

    monkeypatch.setattr(prepare, "_build", build_after_both_started)
    cfg = ModelConfig(path=str(tmp_path / "raced"), build=BUILD)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: prepare_model(cfg, DATA), range(2)))
    assert paths[0] == paths[1] and (paths[0] / MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["raced"]
