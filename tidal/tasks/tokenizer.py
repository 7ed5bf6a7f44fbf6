"""A character-level tokenizer for the arithmetic task, built offline.

Why it is a `Qwen2Tokenizer`: transformers 5.x maps a folder whose config.json says `qwen2` to
`Qwen2Tokenizer` no matter what `tokenizer_config.json` names (qwen2 is on its list of models with
"incorrect hub tokenizer classes"), and that class rebuilds the tokenizer from the vocab and merges
with its own byte-level pre-tokenizer, dropping whatever pre-tokenizer `tokenizer.json` holds. A
tokenizer built by any other rules would encode differently through `AutoTokenizer` than through
`PreTrainedTokenizerFast(tokenizer_file=...)`. So we build it with Qwen2's own class (a `tokenizers`
byte-level BPE) and a vocab of single characters and no merges: every character is one token, and
both loading paths give the same ids by construction (tests/unit/test_tokenizer.py checks it).

Characters outside `CHARACTERS` have no token and are dropped when encoding; this tokenizer is meant
for the built-in task, real text needs a real tokenizer (e.g. the SmolLM2 build).
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
CHARACTERS = "0123456789+-*= \n"


def build_char_tokenizer() -> Qwen2Tokenizer:
    """Special tokens first (pad=0, bos=1, eos=2), then one token per character of `CHARACTERS`."""
    # Byte-level BPE sees bytes as printable stand-ins (space is 'Ġ', newline 'Ċ'); the vocab must
    # hold those stand-ins, not the raw characters.
    byte_to_char = bytes_to_unicode()
    pieces = [byte_to_char[b] for b in CHARACTERS.encode("ascii")]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *pieces])}
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,  # Qwen2Tokenizer would otherwise add '<|endoftext|>' as an unknown token
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
    )


def save_char_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """Write tokenizer.json + tokenizer_config.json (tokenizer_class=Qwen2Tokenizer) into `directory`."""
    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(str(directory))
    return tokenizer
