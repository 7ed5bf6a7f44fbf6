"""Fixtures shared across test folders."""

from __future__ import annotations

import pytest
import torch
import transformers


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Qwen2 (2 layers, hidden 64, vocab 32) saved as a Hugging Face folder."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=32,
    )
    path = tmp_path_factory.mktemp("tiny_qwen2")
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)
