"""Fused chunked log-prob + entropy kernel vs the naive full-logits path: peak memory and time.

Workload: Qwen2.5-0.5B's lm_head shape (hidden 896, vocab 151,936), `--tokens` tokens, float32
by default, temperature 0.9; forward (log-probs and entropies) then backward of a per-token loss
sum(c1 * log_prob) + 0.01 * sum(c2 * entropy) with random c1, c2, so gradients reach both hidden
and weight. "fused" is `tidal.kernels.token_log_probs`, "naive" is `token_log_probs_reference`
(logits = hidden @ W.T in full, log_softmax, autograd), on the same inputs (same seed).

Each measurement runs in its own subprocess (`--child VARIANT`), fused and naive alternating, so
one variant's freed-but-cached memory cannot hide the other's, and machine load drifts evenly:
- memory: the peak resident set during forward + backward minus the resident set just before
  (inputs already allocated), i.e. what the op itself needs, its gradients included. The peak is
  the kernel's high-water mark (VmHWM in /proc/self/status), reset just before the op by writing
  5 to /proc/self/clear_refs: it sees every page touched, whatever allocated it (torch has no
  allocator statistics on CPU). On CUDA: torch.cuda.max_memory_allocated minus memory_allocated.
- time: wall clock of forward + backward (and process CPU time, which on a shared machine is the
  steadier of the two with one thread). Ratios are of medians over all runs.
The fused child also times its matmuls alone (the same blocked matmuls, no elementwise work):
the floor the kernel can approach, since it does 4 matmuls of 2*T*V*H flops where autograd does 3.

    python benchmarks/logprob_kernel.py                 # 2048 tokens, 3 pairs of children, 1 thread
    python benchmarks/logprob_kernel.py --tokens 1024 --pairs 1

The LAST line of output is one JSON object: mem_ratio, time_ratio, cpu_time_ratio, tokens, ...
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("fused", "naive")


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="tokens (naive peak ~3.6 GiB per 1024)")
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    p.add_argument("--pairs", type=int, default=3, help="fused/naive child pairs, alternating order")
    p.add_argument("--runs", type=int, default=1, help="forward+backward runs inside each child")
    p.add_argument("--chunk-size", type=int, default=None, help="token chunk (default: the kernel's)")
    p.add_argument("--vocab-chunk-size", type=int, default=None, help="vocab block (default: the kernel's)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--check-file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------------------------------- child
def _proc_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


class _PeakMemory:
    """Bytes the enclosed code needed above what was resident (or allocated, on CUDA) before it."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> _PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = _proc_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _proc_kib("VmHWM") * 1024 - self.base


def _matmul_floor(h, w, token_chunk: int, vocab_chunk: int) -> tuple[float, float]:  # noqa: ANN001
    """(wall, cpu) seconds of the fused kernel's four blocked matmuls alone (forward + backward)."""
    import torch

    with torch.no_grad():
        buf = torch.empty(min(token_chunk, h.shape[0]) * min(vocab_chunk, w.shape[0]), dtype=h.dtype)
        grad_h, grad_w = torch.zeros_like(h), torch.zeros_like(w)
        wall, cpu = time.perf_counter(), time.process_time()
        for v0 in range(0, w.shape[0], vocab_chunk):
            wv = w[v0 : v0 + vocab_chunk]
            for t0 in range(0, h.shape[0], token_chunk):
                hc = h[t0 : t0 + token_chunk]
                z = buf[: hc.shape[0] * wv.shape[0]].view(hc.shape[0], wv.shape[0])
                for _ in range(2):  # forward logits, backward recompute
                    torch.mm(hc, wv.t(), out=z)
                grad_h[t0 : t0 + token_chunk].addmm_(z, wv)
                grad_w[v0 : v0 + vocab_chunk].addmm_(z.t(), hc)
        return time.perf_counter() - wall, time.process_time() - cpu


def _child(args: argparse.Namespace) -> None:
    import torch

    from tidal.kernels import token_log_probs, token_log_probs_reference
    from tidal.kernels.logprobs import DEFAULT_CHUNKS

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden, generator=gen).mul_(0.02).to(args.device, dtype)
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(args.device, dtype)
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(args.device)
    c1, c2 = torch.randn(2, args.tokens, generator=gen).to(args.device)
    weight.requires_grad_()
    hidden.requires_grad_()
    fused = args.child == "fused"
    fn = token_log_probs if fused else token_log_probs_reference
    default_tokens, default_vocab = DEFAULT_CHUNKS["cuda" if args.device.startswith("cuda") else "cpu"]
    chunks = (args.chunk_size or default_tokens, args.vocab_chunk_size or default_vocab)
    runs = []
    for _ in range(args.runs):
        hidden.grad = weight.grad = None
        gc.collect()
        with _PeakMemory(args.device) as mem:
            wall, cpu = time.perf_counter(), time.process_time()
            log_probs, entropy = fn(
                hidden, weight, targets, args.temperature, True, chunks[0], vocab_chunk_size=chunks[1]
            )
            ((log_probs * c1).sum() + 0.01 * (entropy * c2).sum()).backward()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        runs.append({"wall_s": wall, "cpu_s": cpu, "peak_bytes": mem.peak})
    out = {"variant": args.child, "runs": runs, "process_peak_bytes": _proc_kib("VmHWM") * 1024}
    torch.save(
        {"log_probs": log_probs.detach().cpu(), "entropy": entropy.detach().cpu(),
         "grad_hidden": hidden.grad.float().cpu(), "grad_weight_head": weight.grad[:4096].float().cpu(),
         "grad_weight_norm": weight.grad.float().norm().item()},
        args.check_file,
    )  # fmt: skip
    if fused and not args.device.startswith("cuda"):
        out["matmul_floor_s"] = _matmul_floor(hidden.detach(), weight.detach(), *chunks)
    out["chunks"] = chunks
    print(json.dumps(out))


# --------------------------------------------------------------------------------------- parent
def _run_child(args: argparse.Namespace, variant: str, check_file: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--check-file", check_file]
    for name in ("tokens", "hidden", "vocab", "dtype", "temperature", "threads", "runs", "device"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    for name in ("chunk_size", "vocab_chunk_size"):
        if getattr(args, name) is not None:
            cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _agreement(fused_file: str, naive_file: str) -> dict:
    import torch

    f, n = torch.load(fused_file), torch.load(naive_file)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

    return {
        "max_abs_log_prob": (f["log_probs"] - n["log_probs"]).abs().max().item(),
        "max_abs_entropy": (f["entropy"] - n["entropy"]).abs().max().item(),
        "rel_grad_hidden": rel(f["grad_hidden"], n["grad_hidden"]),
        "rel_grad_weight_rows_0_4096": rel(f["grad_weight_head"], n["grad_weight_head"]),
        "grad_weight_norm": [f["grad_weight_norm"], n["grad_weight_norm"]],
    }


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.child:
        _child(args)
        return
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        files = {v: os.path.join(tmp, f"{v}.pt") for v in VARIANTS}
        for pair in range(args.pairs):
            for variant in VARIANTS if pair % 2 == 0 else VARIANTS[::-1]:
                out = _run_child(args, variant, files[variant])
                results[variant].append(out)
                run = out["runs"][-1]
                print(
                    f"pair {pair} {variant:5s}: {run['wall_s']:7.2f} s wall {run['cpu_s']:7.2f} s cpu, "
                    f"peak +{run['peak_bytes'] / 2**30:.2f} GiB",
                    flush=True,
                )
        agreement = _agreement(files["fused"], files["naive"])

    def runs(variant: str, key: str) -> list[float]:
        return [r[key] for out in results[variant] for r in out["runs"]]

    med = {v: {k: statistics.median(runs(v, k)) for k in ("wall_s", "cpu_s")} for v in VARIANTS}
    peak = {v: max(runs(v, "peak_bytes")) for v in VARIANTS}
    process_peak = {v: max(out["process_peak_bytes"] for out in results[v]) for v in VARIANTS}
    floors = [out["matmul_floor_s"] for out in results["fused"] if "matmul_floor_s" in out]
    floor_cpu = statistics.median(f[1] for f in floors) if floors else None
    summary = {
        "mem_ratio": round(peak["fused"] / peak["naive"], 4),
        "time_ratio": round(med["fused"]["wall_s"] / med["naive"]["wall_s"], 3),
        "cpu_time_ratio": round(med["fused"]["cpu_s"] / med["naive"]["cpu_s"], 3),
        "tokens": args.tokens,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "device": args.device,
        "threads": args.threads,
        "temperature": args.temperature,
        "chunks": results["fused"][0]["chunks"],
        "fused_peak_gib": round(peak["fused"] / 2**30, 3),
        "naive_peak_gib": round(peak["naive"] / 2**30, 3),
        "fused_process_peak_gib": round(process_peak["fused"] / 2**30, 3),
        "naive_process_peak_gib": round(process_peak["naive"] / 2**30, 3),
        "fused_wall_s": [round(x, 3) for x in runs("fused", "wall_s")],
        "naive_wall_s": [round(x, 3) for x in runs("naive", "wall_s")],
        "fused_cpu_s": [round(x, 3) for x in runs("fused", "cpu_s")],
        "naive_cpu_s": [round(x, 3) for x in runs("naive", "cpu_s")],
        "fused_matmul_floor_wall_cpu_s": [[round(x, 3) for x in f] for f in floors],
        "fused_cpu_over_matmul_floor": round(med["fused"]["cpu_s"] / floor_cpu, 3) if floor_cpu else None,
        "agreement": agreement,
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print(
        f"fused/naive: memory {summary['mem_ratio']:.3f} ({summary['fused_peak_gib']} vs "
        f"{summary['naive_peak_gib']} GiB above the inputs), wall time {summary['time_ratio']:.3f}, "
        f"cpu time {summary['cpu_time_ratio']:.3f}"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
