"""The Triton log-prob kernels: interpreted on CPU (CI), compiled on a GPU machine.

The cases live in triton_kernel_cases.py and run in a child pytest, because Triton fixes at its
first import whether kernels compile or run in its interpreter (see that file's docstring).
Skipped, with the reason, where the triton package is not installed.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CASES = Path(__file__).with_name("triton_kernel_cases.py")
needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install triton); the Triton kernel cases cannot run",
)


def _run_cases(interpret: bool) -> None:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "", "-rs", str(CASES)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    report = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout and " failed" not in done.stdout, report


@needs_triton
def test_triton_kernels_under_the_interpreter():
    _run_cases(interpret=True)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernels_compiled_on_gpu():
    _run_cases(interpret=False)
