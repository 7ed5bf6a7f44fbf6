"""The one way Tidal loads a model's tokenizer: datasets, pre-flight checks and the rollout engine
must all see the same ids for the same text."""

from __future__ import annotations

import json
from pathlib import Path

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
