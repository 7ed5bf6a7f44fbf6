import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

from tidal.tasks.tokenizer import CHARACTERS, SPECIAL_TOKENS, save_char_tokenizer

TEXTS = ["37+45=", "82", "12 * 3 = 36\n", "-8", "<|endoftext|>12<|pad|>", "<|bos|>9-9=0<|endoftext|>"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_char_tokenizer(path)
    # A Qwen2 config beside it is what makes AutoTokenizer choose Qwen2's class (as in a model folder).
    Qwen2Config(
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        intermediate_size=8,
    ).save_pretrained(path)
    return path


def test_both_loading_paths_give_identical_ids(folder):
    auto = AutoTokenizer.from_pretrained(folder)
    plain = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert type(auto).__name__ == "Qwen2Tokenizer"
    assert len(auto) == len(plain) == len(SPECIAL_TOKENS) + len(CHARACTERS)
    assert auto.get_vocab() == plain.get_vocab()
    for text in TEXTS:
        assert auto(text)["input_ids"] == plain(text)["input_ids"], text
        assert auto.decode(auto(text)["input_ids"]) == text
    # Qwen2Tokenizer must not have added its default '<|endoftext|>'-as-unk or any other token.
    assert auto.unk_token is None and auto.get_added_vocab().keys() == set(SPECIAL_TOKENS)


def test_special_token_ids_and_one_token_per_character(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    plain = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert plain.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2]
    ids = tok(CHARACTERS)["input_ids"]
    assert len(ids) == len(CHARACTERS) == len(set(ids))
    assert tok("37+45=")["input_ids"] == [tok.convert_tokens_to_ids(c) for c in "37+45="]
    assert tok.decode(tok("82")["input_ids"] + [tok.eos_token_id], skip_special_tokens=True) == "82"


def test_characters_outside_the_vocab_are_dropped(folder):
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.decode(tok("a7b")["input_ids"]) == "7"
