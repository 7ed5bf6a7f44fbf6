"""Make sure `model.path` holds a model before anything loads it, building it when asked.

A built folder is complete exactly when its marker file exists: the marker is written last, into a
temporary sibling folder that is then renamed onto `model.path` in one `os.replace`. A crash leaves
only a temporary folder behind, and two processes that race both build, one rename wins and the
loser adopts the winner's folder when its marker matches. The marker holds a digest of everything
the build depends on, so a folder built from another configuration is never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tidal.config.schema import DataConfig, ModelConfig, SmolLM2Build, TinyQwen2Build

MARKER = ".tidal_built"
# Bump when a builder changes what it writes, so folders built by older code are not reused.
BUILD_FORMAT = 1


def build_fingerprint(model_cfg: ModelConfig, data_cfg: DataConfig | None) -> dict[str, Any]:
    """Everything the built folder depends on (the task only matters when the build trains on it)."""
    build = model_cfg.build
    assert build is not None
    task = data_cfg.task if data_cfg is not None else None
    uses_task = isinstance(build, TinyQwen2Build) and build.sft_steps > 0
    return {
        "format": BUILD_FORMAT,
        "build": build.model_dump(mode="json", exclude_none=True),  # a new unset option keeps old digests
        "task": task.model_dump(mode="json") if uses_task and task is not None else None,
    }


def _digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def read_marker_digest(path: Path) -> str | None:
    marker = path / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())["digest"]


def check_model_folder(model_cfg: ModelConfig, data_cfg: DataConfig | None) -> bool:
    """True when `model.path` holds the model to use, False when `model.build` will build it there;
    raises ValueError (naming the fix) when it can be neither. Reads only; builds nothing."""
    path = Path(model_cfg.path).expanduser()
    build = model_cfg.build
    if build is None:
        if (path / "config.json").is_file():
            return True
        what = "does not exist" if not path.exists() else "is not a Hugging Face model folder (no config.json there)"
        raise ValueError(
            f"model.path={model_cfg.path!r} {what} and model.build is not set; point model.path at a "
            "model folder, or set model.build.type=tiny_qwen2 (or smollm2_gguf) to build one at that path"
        )
    fingerprint = build_fingerprint(model_cfg, data_cfg)
    found = read_marker_digest(path)
    if found == _digest(fingerprint):
        return True
    if found is not None:
        raise ValueError(
            f"model.path={model_cfg.path!r} was built from a different model.build/data.task than this "
            f"job's ({fingerprint}); delete that folder to rebuild it, or set model.path to a new folder"
        )
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(
            f"model.path={model_cfg.path!r} exists but was not built by tidal (no {MARKER} marker); "
            "remove model.build to use it as it is, or set model.path to a new or empty folder"
        )
    return False


def prepare_model(model_cfg: ModelConfig, data_cfg: DataConfig | None) -> Path:
    """Return the model folder, building it first when `model.build` is set and it is not built yet."""
    path = Path(model_cfg.path).expanduser()
    if check_model_folder(model_cfg, data_cfg):
        return path
    fingerprint = build_fingerprint(model_cfg, data_cfg)
    digest = _digest(fingerprint)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.building-", dir=path.parent))
    try:
        _build(model_cfg, data_cfg, tmp)
        (tmp / MARKER).write_text(json.dumps({"digest": digest, **fingerprint}, sort_keys=True, indent=1))
        tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is not
        try:
            os.replace(tmp, path)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError:
            if read_marker_digest(path) != digest:
                raise
            # Another process finished the same build first: use its folder.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def model_vocab_size(folder: Path) -> Any:
    """vocab_size from the model folder's config.json (a multimodal model's text_config's); None if absent."""
    config = json.loads((folder / "config.json").read_text())
    return config.get("vocab_size", config.get("text_config", {}).get("vocab_size"))


def check_reference_model(reference_path: str, model_path: Path | None) -> None:
    """A separate reference (reference.model_path) must be a model folder whose vocabulary is the
    policy's: KL terms compare the two models' log-probs token id by token id. `model_path` None
    (a policy still to be built, so no config to compare yet): the folder is checked alone."""
    ref = Path(reference_path).expanduser()
    if not (ref / "config.json").is_file():
        raise ValueError(
            f"reference.model_path={reference_path!r} is not a Hugging Face model folder (no config.json "
            "there); point it at the teacher model's local folder, or remove it to use model.path"
        )
    if model_path is None:
        return
    sizes = {"reference.model_path": model_vocab_size(ref), "model.path": model_vocab_size(model_path)}
    if sizes["reference.model_path"] != sizes["model.path"]:
        raise ValueError(
            f"reference.model_path={reference_path!r} has vocab_size={sizes['reference.model_path']} but "
            f"model.path has {sizes['model.path']}; KL terms need one vocabulary (the same tokenizer), so "
            "pick a reference of the policy's model family or remove reference.model_path"
        )


def _build(model_cfg: ModelConfig, data_cfg: DataConfig | None, out_dir: Path) -> None:
    build = model_cfg.build
    # Imports are local: building pulls in torch/transformers, reading the marker must not.
    if isinstance(build, TinyQwen2Build):
        from tidal.tasks.tiny_model import build_tiny_qwen2

        build_tiny_qwen2(build, data_cfg.task if data_cfg is not None else None, out_dir)
    elif isinstance(build, SmolLM2Build):
        from tidal.tasks.smollm2 import convert_smollm2

        convert_smollm2(out_dir)
    else:
        raise TypeError(f"model.build={build!r} has no builder; known types: tiny_qwen2, smollm2_gguf")
