"""The one way Tidal loads a model's tokenizer: datasets, pre-flight checks and the rollout engine
must all see the same ids for the same text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast


def load_tokenizer(model_path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved with the model, honouring a generic `tokenizers` backend.

    transformers 5 maps a folder whose config says e.g. qwen2 to that model's tokenizer class,
    which ignores a custom pre-tokenizer saved in tokenizer.json (a character tokenizer then loses
    spaces and gains an unknown <|endoftext|> id). A tokenizer saved as the generic fast class is
    therefore loaded as exactly that.
    """
    config_file = Path(model_path) / "tokenizer_config.json"
    if config_file.is_file():
        saved = json.loads(config_file.read_text())
        if saved.get("tokenizer_class") in ("PreTrainedTokenizerFast", "TokenizersBackend"):
            return PreTrainedTokenizerFast.from_pretrained(str(model_path))
    return AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=trust_remote_code)


def eos_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the generation config's (HF's rule)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(int(i) for i in (configured if isinstance(configured, list) else [configured]))
    return sorted(ids)


def pad_token_id(tokenizer: PreTrainedTokenizerBase, eos_ids: list[int]) -> int:
    """The id that pads responses: the tokenizer's pad token, else the first EOS (masks make the
    value irrelevant; padding with EOS is the usual convention)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if eos_ids:
        return eos_ids[0]
    raise ValueError(
        "the tokenizer has neither a pad nor an EOS token; set pad_token in tokenizer_config.json"
    )
