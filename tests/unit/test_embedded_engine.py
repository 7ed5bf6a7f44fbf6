"""The embedded engine against transformers' own generate, on tiny random Llama-family models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tidal.config.schema import SamplingConfig
from tidal.dataflow.tokenizer import load_tokenizer
from tidal.workers.engines.embedded.engine import EmbeddedEngine
from tidal.workers.engines.embedded.linear import packing_available

PAD, EOS, VOCAB = 0, 1, 40
CHARS = "0123456789+-*= abcdefghijklmnopqrstuv"  # ids 2..39
ENGINE_VARIANTS = [
    pytest.param({"impl": "fast", "pack_weights": True}, id="fast-packed"),
    pytest.param({"impl": "fast", "pack_weights": False}, id="fast-flinear"),
    pytest.param({"impl": "hf"}, id="hf-forward"),
]


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": PAD, "<eos>": EOS, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def build_model_dir(
    path: Path, arch: str = "qwen2", seed: int = 0, tie: bool = False, eos_boost: float = 3.0
) -> Path:
    """A 2-layer random model whose <eos> is likely enough that greedy rows stop at different steps."""
    config_cls = {
        "qwen2": transformers.Qwen2Config,
        "llama": transformers.LlamaConfig,
        "qwen3": transformers.Qwen3Config,  # adds per-head q/k norms
    }[arch]
    config = config_cls(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=VOCAB,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
        tie_word_embeddings=tie,
        # Larger than HF's default 0.02 so attention is far from uniform and positions matter:
        # a wrong position id then changes the greedy tokens.
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= eos_boost
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def left_padded_prompts(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths) + 1  # one column of padding in every row: the engine trims it
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(width)[None] >= width - torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(2, VOCAB, (len(lengths), width), generator=g) * mask + PAD * (1 - mask)
    return ids, mask


def hf_greedy(path: Path, ids: torch.Tensor, mask: torch.Tensor, max_new: int) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new, pad_token_id=PAD
        )
    return out[:, ids.shape[1] :]


GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=12)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core runner OpenMP threads waiting
    # for a busy core made each generate call 10-100x slower.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("qwen2"))


@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
@pytest.mark.parametrize("variant", ENGINE_VARIANTS)
def test_greedy_matches_hf_generate_token_for_token(tmp_path: Path, arch: str, variant: dict) -> None:
    if variant.get("pack_weights") and not packing_available(torch.float32):
        pytest.skip("this torch build has no oneDNN linear ops")
    path = build_model_dir(tmp_path, arch)
    ids, mask = left_padded_prompts([3, 7, 1, 5, 7, 2, 4, 6])
    expected = hf_greedy(path, ids, mask, GREEDY.max_new_tokens)
    engine = EmbeddedEngine(path, **variant)
    out = engine.generate(ids, mask, GREEDY, engine.eos_token_ids)

    lengths = out.response_mask.sum(-1)
    # The case must exercise both endings: some rows stop on EOS, some run to max_new_tokens.
    assert (lengths < GREEDY.max_new_tokens).any() and (lengths == GREEDY.max_new_tokens).any()
    width = out.response_ids.shape[1]
    assert width == int(lengths.max())
    for row in range(len(ids)):
        n = int(lengths[row])
        assert out.response_ids[row, :n].tolist() == expected[row, :n].tolist(), f"row {row}"
        assert out.response_mask[row].tolist() == [1] * n + [0] * (width - n)
        assert (out.response_ids[row, n:] == engine.pad_token_id).all()
        if n < GREEDY.max_new_tokens:
            assert int(out.response_ids[row, n - 1]) == EOS  # the stop token is part of the response
            assert EOS not in out.response_ids[row, : n - 1].tolist()
    assert out.log_probs.dtype == torch.float32 and (out.log_probs[out.response_mask == 0] == 0).all()
    assert (out.log_probs[out.response_mask == 1] <= 0).all()


def test_fan_out_equals_repeated_rows_and_chunking_changes_nothing(model_dir: Path) -> None:
    ids, mask = left_padded_prompts([4, 2, 6])
    engine = EmbeddedEngine(model_dir)
    once = engine.generate(ids, mask, GREEDY, engine.eos_token_ids)
    fanned = engine.generate(ids, mask, GREEDY, engine.eos_token_ids, num_samples=3)
    assert torch.equal(fanned.response_ids, once.response_ids.repeat_interleave(3, 0))
    torch.testing.assert_close(fanned.log_probs, once.log_probs.repeat_interleave(3, 0))
    small = EmbeddedEngine(model_dir, max_batch_size=2)  # 1 prompt x 3 samples... per chunk
    chunked = small.generate(ids, mask, GREEDY, small.eos_token_ids, num_samples=3)
    assert torch.equal(chunked.response_ids, fanned.response_ids)


def test_sampling_is_reproducible_per_seed_and_fast_path_matches_reference(model_dir: Path) -> None:
    ids, mask = left_padded_prompts([4, 2, 6, 5])
    sampling = SamplingConfig(temperature=0.9, top_k=10, top_p=0.95, max_new_tokens=10)
    fast = EmbeddedEngine(model_dir, impl="fast", pack_weights=packing_available(torch.float32))
    ref = EmbeddedEngine(model_dir, impl="hf")

    def run(engine: EmbeddedEngine, seed: int):
        return engine.generate(
            ids, mask, sampling, engine.eos_token_ids, seed, 4
        )

    a, b, c, r = run(fast, 5), run(fast, 5), run(fast, 6), run(ref, 5)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.response_ids, c.response_ids)
    # Same random stream, logits equal up to float rounding: same draws, same log-probs.
    assert torch.equal(a.response_ids, r.response_ids)
    torch.testing.assert_close(a.log_probs, r.log_probs, atol=1e-4, rtol=0)


def test_stop_token_ids_are_the_complete_stop_set(model_dir: Path) -> None:
    ids, mask = left_padded_prompts([4, 2, 6, 5])
    engine = EmbeddedEngine(model_dir)
    free = engine.generate(ids, mask, GREEDY, [])  # no stop token: every row runs to the end
    assert free.response_mask.all() and free.response_ids.shape[1] == GREEDY.max_new_tokens
    stop = int(free.response_ids[0, 2])
    stopped = engine.generate(ids, mask, GREEDY, [stop])
    first = free.response_ids[0].tolist().index(stop)
    assert int(stopped.response_mask[0].sum()) == first + 1


@pytest.mark.parametrize("variant", ENGINE_VARIANTS)
@pytest.mark.parametrize("tie", [False, True])
def test_load_weights_changes_outputs_and_equals_a_fresh_engine(
    tmp_path: Path, tie: bool, variant: dict
) -> None:
    if variant.get("pack_weights") and not packing_available(torch.float32):
        pytest.skip("this torch build has no oneDNN linear ops")
    old_dir = build_model_dir(tmp_path / "old", seed=0, tie=tie)
    new_dir = build_model_dir(tmp_path / "new", seed=1, tie=tie)
    ids, mask = left_padded_prompts([4, 2, 6, 5, 3])
    engine = EmbeddedEngine(old_dir, **variant)
    before = engine.generate(ids, mask, GREEDY, engine.eos_token_ids)

    new_state = AutoModelForCausalLM.from_pretrained(new_dir).state_dict()
    if tie:  # a trainer may send the tied matrix under either name; send only lm_head's
        new_state.pop("model.embed_tokens.weight")
    assert engine.load_weights(new_state.items()) == len(new_state)
    after = engine.generate(ids, mask, GREEDY, engine.eos_token_ids)
    fresh = EmbeddedEngine(new_dir, **variant)
    expected = fresh.generate(ids, mask, GREEDY, fresh.eos_token_ids)

    assert not torch.equal(before.response_ids, after.response_ids)
    assert torch.equal(after.response_ids, expected.response_ids)
    torch.testing.assert_close(after.log_probs, expected.log_probs, atol=1e-5, rtol=0)
    if tie:
        assert torch.equal(engine.model.model.embed_tokens.weight, new_state["lm_head.weight"])


def test_load_weights_rejects_unknown_names_and_wrong_shapes(model_dir: Path) -> None:
    engine = EmbeddedEngine(model_dir)
    with pytest.raises(ValueError, match="not a parameter"):
        engine.load_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))])


def test_rejects_right_padded_prompts_and_handles_empty_input(model_dir: Path) -> None:
    engine = EmbeddedEngine(model_dir)
    ids, mask = left_padded_prompts([4, 2])
    with pytest.raises(ValueError, match="LEFT-padded"):
        engine.generate(ids.flip(1), mask.flip(1), GREEDY, engine.eos_token_ids)
    out = engine.generate(ids[:0], mask[:0], GREEDY, engine.eos_token_ids, num_samples=4)
    assert out.response_ids.shape == (0, 0) and out.log_probs.dtype == torch.float32


def test_generic_fast_tokenizer_loads_as_saved(model_dir: Path) -> None:
    # transformers' AutoTokenizer would map this qwen2 folder to Qwen2Tokenizer and drop spaces.
    tokenizer = load_tokenizer(model_dir)
    text = " 12 + 3 = 15 "
    assert tokenizer(text)["input_ids"] == char_tokenizer()(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (EOS, PAD)
