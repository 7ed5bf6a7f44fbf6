import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

from tidal.config.schema import ArithmeticTask, TinyQwen2Build
from tidal.tasks.arithmetic import make_split
from tidal.tasks.tiny_model import build_tiny_qwen2, encode_problems, sft_warmup, tiny_qwen2_config
from tidal.tasks.tokenizer import build_char_tokenizer

SMALL = dict(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128)
TASK = ArithmeticTask(num_train=500, num_val=16)


def folder_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_same_config_builds_a_bit_identical_folder_that_loads(tmp_path):
    build = TinyQwen2Build(**SMALL, sft_steps=3, sft_batch_size=8)
    torch.manual_seed(123)
    build_tiny_qwen2(build, TASK, tmp_path / "a")
    torch.manual_seed(456)  # the build must not depend on the caller's RNG
    build_tiny_qwen2(build, TASK, tmp_path / "b")
    files = folder_bytes(tmp_path / "a")
    assert files == folder_bytes(tmp_path / "b")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files.keys()

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 2
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    logits = model(torch.tensor([tok("37+45=")["input_ids"]])).logits
    assert logits.shape == (1, 6, len(tok)) and torch.isfinite(logits).all()

    build_tiny_qwen2(build.model_copy(update={"seed": 1}), TASK, tmp_path / "c")
    assert folder_bytes(tmp_path / "c")["model.safetensors"] != files["model.safetensors"]


def test_sft_trains_only_on_answer_and_eos_and_lowers_the_loss():
    tok = build_char_tokenizer()
    problems = make_split(TASK, "train")
    ids, mask, labels = encode_problems(tok, problems[:2])
    for row in range(2):
        prompt_len = len(problems[row].prompt)
        answer = labels[row][labels[row] != -100].tolist()
        assert answer == tok(problems[row].answer)["input_ids"] + [tok.eos_token_id]
        assert (labels[row, :prompt_len] == -100).all() and ids[
            row, prompt_len - 1
        ] == tok.convert_tokens_to_ids("=")
        assert mask[row].sum() == prompt_len + len(answer)

    build = TinyQwen2Build(**SMALL, sft_steps=40, sft_batch_size=32, sft_lr=3e-3)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(build, tok))
    losses = sft_warmup(model, tok, problems, build)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5  # measured: 2.67 -> 1.69
