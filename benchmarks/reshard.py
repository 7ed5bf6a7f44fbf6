"""Weight-sync resharding on gloo: Tidal's planner + executor vs. two baselines, 0.6B-shaped model.

Model: Qwen3-0.6B's shape (28 layers, hidden 1024, 16 heads, 8 KV groups, head_dim 128, FFN 3072,
vocab 151936, tied embeddings, q/k norms; 596M parameters; Qwen2.5-0.5B's 14 heads do not split
over TP=4), bfloat16, random values: a hash of each element's position, so every process fills
its own shard without the full model. Scenarios (colocated = every process holds a trainer shard
and a rollout shard, HybridFlow style):
  tp4pp2_to_tp2      Megatron TP=4 x PP=2 (8 processes) -> vLLM TP=2 x 4 engines on the same 8
  tp2_to_tp4         Megatron TP=2 x DP=2 (4 processes) -> vLLM TP=4 on the same 4
  tp2_to_tp4_disagg  (optional) Megatron TP=2 on processes 0-1 -> vLLM TP=4 on processes 2-5
  *_aligned          (optional) the colocated scenarios with engine ranks placed by
                     `aligned_colocated` (tidal/resharding/alignment.py) instead of rank order
Methods, interleaved over --reps repetitions in one process group (medians reported):
  tidal        the cached plan run by `ReshardExecutor` over `TorchP2PTransport` (--pairs per rep);
  gather_full  verl's way: per Megatron parameter, broadcast over the pipeline group, all-gather
               over the TP group, full Hugging Face tensors on every process, reslice;
  broadcast    process 0 holds the full Hugging Face model (untimed), broadcasts it in buckets.
Tidal's targets are checked against the formula, the baselines' against Tidal's (checksums).
Bandwidth, measured right before each Tidal sync: the transport alone moves the plan's
device-to-device byte matrix in --chunk-mb messages (no plan, packing or copies) between buffers
written beforehand (no first-touch faults), all at once and in as many even rounds as the plan has
buckets; the faster counts. bandwidth = largest per-process bytes (max of sent, received) / that
time, so time_ratio = median of tidal time / raw time: what the engine adds to the wire. Here the
"wire" is loopback TCP, i.e. memory copies on the same 2 cores, so the plan's colocated local copies
(which a GPU does in HBM at no cost to the link) compete with it: `time_ratio_with_local_copies`
divides by the raw exchange run with this device's local-copy bytes memcpy'd meanwhile. All
processes share 2 cores here, so one link alone runs
faster than any link of a busy pattern: `time_ratio_vs_pair` uses that uncontended 0 -> 1 rate.
Peak extra memory: the larger of the staging buffer and the resident-set growth during a sync
(VmHWM reset through /proc/self/clear_refs, minus VmRSS before), largest over processes.

    python benchmarks/reshard.py                      # both required scenarios
    python benchmarks/reshard.py --scenarios tp2_to_tp4 --reps 5 --bucket-mb 32
    python benchmarks/reshard.py --scenarios tp2_to_tp4 --no-baselines   # quick: Tidal vs the wire

Each scenario also reports `tidal_parts_s`: where a sync's time goes on the busiest process (local
copies, packing, unpacking, posting to the transport, waiting for it); helpers live beside this
file (_reshard_measure.py: synthetic weights and timing; _reshard_baselines.py: the baselines).

The last line is one JSON object (top-level figures: the first scenario; all under "scenarios").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _reshard_baselines import GatherFull, broadcast_from_rank0, dst_index
from _reshard_measure import build, make_tensors, pair_bandwidth, raw_exchange_s, timed, traffic

from tidal.resharding.alignment import aligned_colocated
from tidal.resharding.executor import ReshardExecutor
from tidal.resharding.layout import ParallelLayout
from tidal.resharding.planner import Placement, get_plan
from tidal.resharding.spec import ModelSpec
from tidal.resharding.transports import TorchP2PTransport
from tidal.resharding.verify import checksum

SPEC = ModelSpec(
    num_layers=28,
    hidden_size=1024,
    num_heads=16,
    num_kv_heads=8,
    head_dim=128,
    ffn_size=3072,
    vocab_size=151936,
    tie_embeddings=True,
    qk_norm=True,
    dtype="bfloat16",
)
SCENARIOS = {
    "tp4pp2_to_tp2": (ParallelLayout.megatron(tp=4, pp=2), ParallelLayout.vllm(tp=2, dp=4), "colocated"),
    "tp2_to_tp4": (ParallelLayout.megatron(tp=2, dp=2), ParallelLayout.vllm(tp=4), "colocated"),
    "tp2_to_tp4_disagg": (ParallelLayout.megatron(tp=2), ParallelLayout.vllm(tp=4), "disaggregated"),
    "tp2_to_tp4_aligned": (ParallelLayout.megatron(tp=2, dp=2), ParallelLayout.vllm(tp=4), "aligned"),
    "tp4pp2_to_tp2_aligned": (
        ParallelLayout.megatron(tp=4, pp=2),
        ParallelLayout.vllm(tp=2, dp=4),
        "aligned",
    ),
}
PARTS = ("local_copy_s", "pack_s", "unpack_s", "post_s", "wait_s")
_T0 = time.perf_counter()


def log(rank: int, name: str, what: str) -> None:
    if rank == 0:
        print(f"[{time.perf_counter() - _T0:6.1f}s] {name}: {what}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- driver


def worker(rank: int, world: int, name: str, opts: dict, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{opts['store']}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=15),
    )
    src, dst, mode = SCENARIOS[name]
    bucket = opts["bucket_mb"] << 20
    start = time.perf_counter()
    if mode == "aligned":
        placement = aligned_colocated(SPEC, src, dst)
    else:
        make = Placement.colocated if mode == "colocated" else Placement.disaggregated
        placement = make(src.world_size, dst.world_size)
    plan = get_plan(SPEC, src, dst, placement, bucket)
    plan_s = time.perf_counter() - start
    transport = TorchP2PTransport()
    executor = ReshardExecutor(plan, transport)
    sources = {r: make_tensors(SPEC, src, r) for r in executor.src_ranks}
    targets = executor.allocate_targets()
    index = dst_index(SPEC, dst, executor.dst_ranks)
    with_baselines = not opts["no_baselines"]
    colocated = mode in ("colocated", "aligned")
    gather = GatherFull(SPEC, src, rank, index) if colocated and with_baselines else None
    full = make_tensors(SPEC, ParallelLayout.hf(), 0) if rank == 0 and with_baselines else None
    out, into = traffic(plan, rank)
    chunk = opts["chunk_mb"] << 20
    raw_exchange_s(transport, out, into, chunk, 1)  # warm-up: connections, first-touch pages
    log(rank, name, "set up")

    # Correctness first (untimed): Tidal against the formula, then checksums for the baselines.
    stats = executor.sync(sources, targets, verify=True)
    for r in executor.dst_ranks:
        for t in dst.rank_tensors(SPEC, r):
            assert torch.equal(targets[r][t.name], build(SPEC, t)), (name, r, t.name)
    sums = {(r, n): int(checksum(v)) for r, ts in targets.items() for n, v in ts.items()}
    log(rank, name, "checked Tidal's targets against the formula")
    baselines = {}
    if with_baselines:
        baselines["broadcast"] = lambda: broadcast_from_rank0(SPEC, full, index, targets, bucket)
    if gather is not None:
        baselines["gather_full"] = lambda: gather(sources[rank], targets)

    def run(method: str, fn, check: bool):
        for ts in targets.values():
            for v in ts.values():
                v.zero_()
        result = []
        runs[method].append(timed(lambda: result.append(fn())))
        if check:
            bad = [k for k, v in sums.items() if int(checksum(targets[k[0]][k[1]])) != v]
            assert not bad, (name, method, bad[:3])
        return result[0]

    # Interleaved, so the machine's load hits every method and the raw exchange alike: per
    # repetition, --pairs of (raw exchange, Tidal sync) back to back, then each baseline once.
    runs: dict[str, list[tuple[float, int]]] = defaultdict(list)
    raw, raw_local, pair, parts = [], [], [], []
    local_bytes = sum(m.num_bytes for m in plan.device_ops(rank).local_copies)
    for _ in range(opts["reps"]):
        pair.append(pair_bandwidth(transport, 64 << 20))
        for i in range(opts["pairs"]):
            # The better of all at once and in as many rounds as the plan has buckets; then the
            # same with this device's local-copy bytes copied meanwhile (the memory-bound box's bound).
            one_shot = raw_exchange_s(transport, out, into, chunk, 1)
            raw.append(min(one_shot, raw_exchange_s(transport, out, into, chunk, plan.report.num_buckets)))
            raw_local.append(raw_exchange_s(transport, out, into, chunk, 1, local_bytes))
            sync = run("tidal", lambda: executor.sync(sources, targets), check=i == opts["pairs"] - 1)
            parts.append({k: getattr(sync, k) for k in PARTS})
        log(rank, name, f"tidal {runs['tidal'][-1][0]:.2f}s, raw exchange {raw[-1]:.2f}s")
        for method, fn in baselines.items():
            run(method, fn, check=True)
            log(rank, name, f"{method} {runs[method][-1][0]:.2f}s")

    def total(x: float, op=dist.ReduceOp.SUM) -> float:
        t = torch.tensor([float(x)], dtype=torch.float64)
        dist.all_reduce(t, op=op)
        return float(t)

    lower = plan.report.lower_bound_bytes
    largest = total(max(stats.bytes_sent, stats.bytes_received), dist.ReduceOp.MAX)
    peak = {m: total(max(p for _, p in r), dist.ReduceOp.MAX) for m, r in runs.items()}
    times = {m: statistics.median(t for t, _ in r) for m, r in runs.items()}
    result = {
        "scenario": name,
        "mode": mode,
        "processes": world,
        "src": repr(src),
        "dst": repr(dst),
        "bucket_bytes": bucket,
        "plan_s": plan_s,
        "bandwidth_bytes_per_s": largest / statistics.median(raw),
        "raw_exchange_s": raw,
        "pair_bandwidth_bytes_per_s": statistics.median(pair),
        "lower_bound_bytes": lower,
        "tidal_bytes": total(stats.bytes_received),
        "largest_rank_bytes": largest,
        "time_lower_bound_s": statistics.median(raw),
        "time_bound_with_local_copies_s": statistics.median(raw_local),
        "tidal_time_s": times["tidal"],
        "tidal_times_s": [t for t, _ in runs["tidal"]],
        # Per part of a sync: the median over syncs on each process, then the largest process.
        "tidal_parts_s": {k: total(statistics.median(p[k] for p in parts), dist.ReduceOp.MAX) for k in PARTS},
        "peak_extra_bytes": max(peak["tidal"], total(executor.staging_bytes, dist.ReduceOp.MAX)),
        "peak_extra_rss_bytes": peak["tidal"],
        "staging_bytes": total(executor.staging_bytes, dist.ReduceOp.MAX),
    }
    # An aligned placement can leave nothing to send (lower == 0): byte ratios are then None, and
    # so is time_ratio (no wire to compare with); the bound with local copies still applies.
    result["bytes_ratio"] = _ratio(result["tidal_bytes"], lower)
    # Per repetition: this rep's sync against this rep's raw exchange; the median of those ratios.
    result["time_ratio"] = (
        statistics.median(t / r for (t, _), r in zip(runs["tidal"], raw, strict=True)) if lower else None
    )
    result["time_ratio_with_local_copies"] = statistics.median(
        t / r for (t, _), r in zip(runs["tidal"], raw_local, strict=True)
    )
    result["time_ratio_vs_pair"] = (
        statistics.median(t for t, _ in runs["tidal"]) * statistics.median(pair) / largest
        if largest
        else None
    )
    if "broadcast" in times:
        result.update(
            broadcast_time_s=times["broadcast"],
            broadcast_peak_extra_bytes=peak["broadcast"],
            broadcast_bytes_ratio=_ratio((world - 1) * SPEC.num_bytes(), lower),
            speedup_vs_broadcast=times["broadcast"] / times["tidal"],
        )
    if gather is not None:
        result.update(
            gather_full_time_s=times["gather_full"],
            gather_full_peak_extra_bytes=peak["gather_full"],
            gather_full_bytes=total(gather.bytes_received),
            gather_full_bytes_ratio=_ratio(total(gather.bytes_received), lower),
            speedup_vs_gather_full=times["gather_full"] / times["tidal"],
        )
    if rank == 0:
        Path(out_path).write_text(json.dumps(result))
    dist.destroy_process_group()


def _ratio(x: float, lower: int) -> float | None:
    return x / lower if lower else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _seconds(r: dict, key: str) -> str:
    return f"{r[key]:.2f}s" if key in r else "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", nargs="+", default=["tp4pp2_to_tp2", "tp2_to_tp4"], choices=SCENARIOS)
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each method (median)")
    parser.add_argument("--bucket-mb", type=int, default=64, help="the plan's bucket cap, MiB")
    parser.add_argument(
        "--pairs", type=int, default=5, help="(raw exchange, Tidal sync) pairs per repetition"
    )
    parser.add_argument("--chunk-mb", type=int, default=4, help="message size of the raw exchange, MiB")
    parser.add_argument(
        "--no-baselines", action="store_true", help="time Tidal and the raw exchange only (quick iterations)"
    )
    args = parser.parse_args(argv)
    if min(args.reps, args.pairs, args.bucket_mb, args.chunk_mb) < 1:
        parser.error("--reps, --pairs, --bucket-mb and --chunk-mb must be >= 1")
    results = {}
    for name in args.scenarios:
        src, dst, mode = SCENARIOS[name]
        world = src.world_size + (dst.world_size if mode == "disaggregated" else 0)
        with tempfile.TemporaryDirectory() as tmp:
            opts = {**vars(args), "store": f"{tmp}/store"}
            mp.spawn(worker, args=(world, name, opts, f"{tmp}/result.json"), nprocs=world, join=True)
            results[name] = r = json.loads(Path(f"{tmp}/result.json").read_text())
        parts = ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in r["tidal_parts_s"].items())
        print(
            f"{name}: {world} processes, tidal {r['tidal_time_s']:.2f}s (bound {r['time_lower_bound_s']:.2f}s, "
            f"ratio {_fmt(r['time_ratio'])}, with local copies {r['time_ratio_with_local_copies']:.2f}; parts {parts}), "
            f"bytes x{_fmt(r['bytes_ratio'])} of {r['lower_bound_bytes'] / 2**20:.0f} MiB, gather_full "
            f"{_seconds(r, 'gather_full_time_s')}, broadcast {_seconds(r, 'broadcast_time_s')}, "
            f"bandwidth {r['bandwidth_bytes_per_s'] / 2**20:.0f} MiB/s, peak extra "
            f"{r['peak_extra_bytes'] / 2**20:.0f} MiB (staging {r['staging_bytes'] / 2**20:.0f} MiB)",
            flush=True,
        )
    first = results[args.scenarios[0]]
    summary = {k: v for k, v in first.items() if not isinstance(v, list)}
    summary.update(
        worst_time_ratio=max((r["time_ratio"] for r in results.values() if r["time_ratio"]), default=None),
        worst_bytes_ratio=max((r["bytes_ratio"] for r in results.values() if r["bytes_ratio"]), default=None),
        model=f"Qwen3-0.6B shape, {SPEC.num_bytes() // SPEC.element_size / 1e6:.0f}M parameters, {SPEC.dtype}",
        cpus=os.cpu_count(),
        torch=torch.__version__,
        scenarios=results,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
