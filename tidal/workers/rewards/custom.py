"""User reward functions named by a spec string instead of a registry name.

`reward.function` (or a component of `algorithm.reward_combination`) may be

- a registered name: `arithmetic`, `math_verify` (tidal/workers/rewards/registry.py);
- `my_pkg.my_module:my_fn`: a function of an importable module;
- `path/to/file.py:my_fn`: a function of a Python file. The config check makes the path absolute
  (relative to the current directory), so every process finds the same file.

The function is `fn(prompt: str, response: str, ground_truth: str) -> float`; the config check
loads it on the driver and checks that it takes three positional arguments
(`check_reward_function`), with an error naming the file or module, the function and what is wrong.

How the Ray workers get it. Workers are other processes, so the driver never ships the function
object: a scoring task receives the spec string and resolves it itself (`resolve_reward_function`,
cached per process). That works wherever the worker can see the code:

- a file is loaded from its absolute path, which exists on every process of a one-machine cluster;
  on other machines the job's runtime environment (`reward_runtime_env`, passed to `ray.init` when
  the job starts or joins the cluster) has shipped the file as a `py_modules` entry, and the worker
  finds it by name on its import path;
- a module is imported by name: installed packages are there anyway; a package elsewhere is shipped
  by the job's runtime environment (`py_modules`, which uploads it) and, for a cluster this process
  had joined before the job started (a job-level runtime environment then cannot be applied), the
  scoring tasks also run with its root directory on PYTHONPATH (`reward_task_runtime_env`; that
  directory is local to this machine).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

from tidal.workers.rewards.registry import RewardFn

SIGNATURE = "fn(prompt: str, response: str, ground_truth: str) -> float"


def is_custom_spec(spec: str) -> bool:
    """A 'module:function' or 'file.py:function' spec (registered names have no colon)."""
    return ":" in spec


def split_spec(spec: str) -> tuple[str, str]:
    """(module or file path, function name); raises ValueError when either part is missing."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ValueError(
            f"{spec!r} is not a reward function spec: write 'my_pkg.my_module:my_fn' or "
            "'path/to/file.py:my_fn' (the function's name after the colon)"
        )
    return target.strip(), name.strip()


def is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def absolute_spec(spec: str, base: str | Path | None = None) -> str:
    """The spec with a file path made absolute (relative to `base`, default the current directory);
    module specs and registered names are returned unchanged."""
    if not is_custom_spec(spec):
        return spec
    target, name = split_spec(spec)
    if not is_file_target(target):
        return spec
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = Path(base if base is not None else os.getcwd()) / path
    return f"{os.path.normpath(path)}:{name}"


def label(spec: str) -> str:
    """A short name for metrics and messages: the registered name, or the function's name."""
    return split_spec(spec)[1] if is_custom_spec(spec) else spec


# ------------------------------------------------------------------------------------ loading


def _module_name_for_file(path: str) -> str:
    digest = hashlib.sha1(path.encode()).hexdigest()[:12]
    stem = "".join(c if c.isalnum() else "_" for c in Path(path).stem)
    return f"tidal_user_reward_{stem}_{digest}"


def _find_shipped_file(path: str) -> str | None:
    """Where the job's runtime environment put `path` on a machine that lacks it: py_modules
    unpacks a file into a directory on the worker's import path."""
    name = os.path.basename(path)
    for entry in sys.path:
        candidate = os.path.join(entry or ".", name)
        if os.path.isfile(candidate):
            return candidate
    return None


def _load_file(path: str) -> ModuleType:
    """Execute the file as a module of its own (registered in sys.modules, so pickling and
    dataclasses inside it work); a file that raises on import raises here."""
    module_name = _module_name_for_file(path)
    if module_name in sys.modules:
        return sys.modules[module_name]
    location = path if os.path.isfile(path) else _find_shipped_file(path)
    if location is None:
        raise FileNotFoundError(f"file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(module_name, location)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _callables(module: ModuleType) -> list[str]:
    return sorted(
        name for name, value in vars(module).items() if callable(value) and not name.startswith("_")
    )


def _where(target: str) -> str:
    return f"file {target}" if is_file_target(target) else f"module {target}"


def load_custom(spec: str) -> RewardFn:
    """The function a 'module:fn' / 'file.py:fn' spec names, with errors that say what is wrong."""
    target, name = split_spec(spec)
    if is_file_target(target):
        if not target.endswith(".py"):
            raise ValueError(f"{target} is not a Python file; give a path ending in .py")
        try:
            module = _load_file(target)
        except FileNotFoundError:
            raise ValueError(
                f"file {target} does not exist (a relative path is taken from the directory tidal runs in)"
            ) from None
        except Exception as err:  # noqa: BLE001 - shown to the user with its type
            raise ValueError(f"loading file {target} raised {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:  # noqa: BLE001
            raise ValueError(
                f"cannot import module {target}: {type(err).__name__}: {err}; make it importable "
                "(pip install -e your package, or put its directory on PYTHONPATH) or give a file "
                "path instead ('path/to/file.py:my_fn')"
            ) from err
    if not hasattr(module, name):
        found = _callables(module)
        close = difflib.get_close_matches(name, found, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"{_where(target)} has no function {name!r}; {hint}its callables: {found}")
    fn = getattr(module, name)
    if not callable(fn):
        raise ValueError(f"{name!r} in {_where(target)} is a {type(fn).__name__}, not a function")
    return fn


@functools.cache
def resolve_reward_function(spec: str) -> RewardFn:
    """A registered name or a custom spec -> the function (loaded once per process)."""
    if is_custom_spec(spec):
        return load_custom(spec)
    from tidal.workers.rewards import REWARD_FUNCTIONS

    return REWARD_FUNCTIONS.get(spec)


def check_signature(fn: Any, where: str) -> None:
    """Raise ValueError unless `fn` can be called as fn(prompt, response, ground_truth)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        signature.bind("prompt", "response", "ground_truth")
    except TypeError as err:
        raise ValueError(
            f"{where}: {getattr(fn, '__name__', fn)}{signature} cannot be called with 3 positional "
            f"arguments ({err}); a reward function is {SIGNATURE}"
        ) from None


def check_reward_function(spec: str) -> None:
    """Load a custom spec on the driver and check its signature; ValueError with the details."""
    target, name = split_spec(spec)
    fn = load_custom(spec)
    check_signature(fn, f"function {name!r} in {_where(target)}")
    if is_file_target(target):
        _check_not_shadowing(target)


def _check_not_shadowing(path: str) -> None:
    """The runtime environment puts the file on every worker's import path under its own name, so
    a file named like an importable module (math.py, random.py) would replace that module there."""
    stem = Path(path).stem
    try:
        found = importlib.util.find_spec(stem)
    except (ImportError, ValueError):
        return
    if found is not None and found.origin is not None and not _same_file(found.origin, path):
        raise ValueError(
            f"file {path} is named like the module {stem!r} ({found.origin}); it is shipped to the Ray "
            "workers on their import path, where it would replace that module: rename the file"
        )


def _same_file(found: str, path: str) -> bool:
    """`found` is `path` itself, or the copy of it the runtime environment shipped (same name and bytes)."""
    if os.path.realpath(found) == os.path.realpath(path):
        return True
    if os.path.basename(found) != os.path.basename(path):
        return False
    if not os.path.isfile(path):  # a machine without the original: found is the shipped copy
        return True
    try:
        return Path(found).read_bytes() == Path(path).read_bytes()
    except OSError:
        return False


# -------------------------------------------------------------------------- runtime environments


def reward_specs(cfg: Any) -> list[str]:
    """The reward functions a job scores with: reward.function, or the combination's components."""
    combination = cfg.algorithm.reward_combination
    return list(combination.components) if combination is not None else [cfg.reward.function]


def _installed(path: str) -> bool:
    """Inside the interpreter's own library or site-packages: importable on every worker."""
    roots = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    real = os.path.realpath(path)
    return any(real.startswith(os.path.realpath(root) + os.sep) for root in roots)


def _module_location(target: str) -> tuple[str, str] | None:
    """(what to ship: the top-level package dir or single-file module, its root dir on sys.path)
    for a module outside the installed packages and outside tidal; None when nothing to ship."""
    top = target.split(".")[0]
    if top == "tidal":
        return None
    found = importlib.util.find_spec(top)
    if found is None:
        return None
    if found.submodule_search_locations:
        locations = list(found.submodule_search_locations)
        if len(locations) != 1:  # a namespace package spread over directories: cannot ship it
            return None
        path = locations[0]
    elif found.origin and found.origin.endswith(".py"):
        path = found.origin
    else:
        return None
    if _installed(path):
        return None
    return path, os.path.dirname(path)


def reward_runtime_env(cfg: Any) -> dict | None:
    """Ray's job-level runtime environment that ships the job's custom reward code to the workers
    (`py_modules`: uploaded, so it works on a remote cluster too); None when nothing is custom."""
    modules: list[str] = []
    for spec in reward_specs(cfg):
        if not is_custom_spec(spec):
            continue
        target, _ = split_spec(spec)
        if is_file_target(target):
            path = absolute_spec(spec).rpartition(":")[0]
            if os.path.isfile(path):
                modules.append(path)
        else:
            location = _module_location(target)
            if location is not None:
                modules.append(location[0])
    modules = list(dict.fromkeys(modules))
    return {"py_modules": modules} if modules else None


def reward_task_runtime_env(spec: str) -> dict | None:
    """The runtime environment for the tasks scoring `spec`: a module outside the installed packages
    gets its root directory on PYTHONPATH, which works on a cluster this process joined before the
    job (so the job's own runtime environment was not applied). Files need nothing: they are loaded
    by absolute path, or found where the job's runtime environment shipped them."""
    if not is_custom_spec(spec):
        return None
    target, _ = split_spec(spec)
    if is_file_target(target):
        return None
    location = _module_location(target)
    if location is None:
        return None
    return {"env_vars": {"PYTHONPATH": location[1]}}
