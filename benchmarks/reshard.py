"""Weight-sync resharding on gloo: Tidal's planner + executor vs. two baselines, 0.6B-shaped model.

Model: Qwen3-0.6B's shape (28 layers, hidden 1024, 16 heads, 8 KV groups, head_dim 128, FFN 3072,
vocab 151936, tied embeddings, q/k norms; 596M parameters; Qwen2.5-0.5B's 14 heads do not split
over TP=4), bfloat16, random values: a hash of each element's position, so every process fills
its own shard without the full model. Scenarios (colocated = every process holds a trainer shard
and a rollout shard, HybridFlow style):
  tp4pp2_to_tp2      Megatron TP=4 x PP=2 (8 processes) -> vLLM TP=2 x 4 engines on the same 8
  tp2_to_tp4         Megatron TP=2 x DP=2 (4 processes) -> vLLM TP=4 on the same 4
  tp2_to_tp4_disagg  (optional) Megatron TP=2 on processes 0-1 -> vLLM TP=4 on processes 2-5
Methods, interleaved over --reps repetitions in one process group (medians reported):
  tidal        the cached plan run by `ReshardExecutor` over `TorchP2PTransport` (--pairs per rep);
  gather_full  verl's way: per Megatron parameter, broadcast over the pipeline group, all-gather
               over the TP group, full Hugging Face tensors on every process, reslice;
  broadcast    process 0 holds the full Hugging Face model (untimed), broadcasts it in buckets.
Tidal's targets are checked against the formula, the baselines' against Tidal's (checksums).
Bandwidth, measured right before each Tidal sync: the transport alone moves the plan's
device-to-device byte matrix in --chunk-mb messages (no plan, packing or copies), all at once and
in as many even rounds as the plan has buckets; the faster counts. bandwidth = largest
per-process bytes (max of sent, received) / that time, so time_ratio = median of tidal time / raw
time: what the engine adds to the wire. All processes share 2 cores here, so one link alone runs
faster than any link of a busy pattern: `time_ratio_vs_pair` uses that uncontended 0 -> 1 rate.
Peak extra memory: the larger of the staging buffer and the resident-set growth during a sync
(VmHWM reset through /proc/self/clear_refs, minus VmRSS before), largest over processes.

    python benchmarks/reshard.py                      # both required scenarios
    python benchmarks/reshard.py --scenarios tp2_to_tp4 --reps 5 --bucket-mb 32

The last line is one JSON object (top-level figures: the first scenario; all under "scenarios").
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
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

from tidal.resharding.executor import ReshardExecutor, checksum
from tidal.resharding.layout import Box, LocalTensor, ParallelLayout, box_numel, box_slices
from tidal.resharding.planner import Placement, get_plan
from tidal.resharding.spec import ModelSpec
from tidal.resharding.transports import TorchP2PTransport

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
}
_IDS = {name: i for i, name in enumerate(SPEC.canonical_shapes())}


# ------------------------------------------------------------------------ synthetic weights


def values(name: str, box: Box) -> torch.Tensor:
    """The canonical values of `box` of tensor `name`: a hash of each element's flat position."""
    shape = SPEC.canonical_shapes()[name]
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    idx = torch.zeros((), dtype=torch.int64)
    for d, (start, stop) in enumerate(box):
        view = [1] * len(box)
        view[d] = stop - start
        idx = idx + (torch.arange(start, stop) * strides[d]).view(view)
    h = (idx * 2654435761 + (_IDS[name] + 1) * 40503) & 0xFFFFFF
    return (h.to(torch.float32) / float(1 << 23) - 1.0).to(SPEC.torch_dtype)


def build(t: LocalTensor) -> torch.Tensor:
    """One local tensor filled with the canonical values of its pieces (padding 0)."""
    out = torch.zeros(t.shape, dtype=SPEC.torch_dtype)
    for p in t.pieces:
        dest = out[box_slices(p.local_box)].view(extents(p.canon_box))
        (r0, r1), *rest = p.canon_box
        step = max(1, (1 << 22) // box_numel(((0, 1), *rest)))  # small int64 temporaries
        for lo in range(r0, r1, step):
            hi = min(lo + step, r1)
            dest[lo - r0 : hi - r0].copy_(values(p.canonical, ((lo, hi), *rest)))
    return out


def make_tensors(layout: ParallelLayout, rank: int) -> dict[str, torch.Tensor]:
    return {t.name: build(t) for t in layout.rank_tensors(SPEC, rank)}


def extents(box: Box) -> list[int]:
    return [stop - start for start, stop in box]


# ------------------------------------------------------------------------------ measurement

_T0 = time.perf_counter()


def log(rank: int, name: str, what: str) -> None:
    if rank == 0:
        print(f"[{time.perf_counter() - _T0:6.1f}s] {name}: {what}", file=sys.stderr, flush=True)


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def timed(fn) -> tuple[float, int]:
    """Wall time of fn() across all processes, and this process's peak extra resident memory."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _vm("VmRSS:")
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed), _vm("VmHWM:") - base


def traffic(plan, device: int) -> tuple[dict[int, int], dict[int, int]]:
    """Bytes `device` sends to and receives from each peer over the whole plan."""
    src_dev, dst_dev = plan.placement.src_devices, plan.placement.dst_devices
    ops = plan.device_ops(device)
    out: dict[int, int] = defaultdict(int)
    into: dict[int, int] = defaultdict(int)
    for m in (m for bucket in ops.sends for m in bucket):
        out[dst_dev[m.dst_rank]] += m.num_bytes
    for m in (m for bucket in ops.recvs for m in bucket):
        into[src_dev[m.src_rank]] += m.num_bytes
    return out, into


def raw_exchange_s(transport: TorchP2PTransport, out: dict, into: dict, chunk: int, rounds: int) -> float:
    """The transport alone moving the same device-to-device bytes in `rounds` exchanges (each pair's
    bytes split evenly), chunk-sized messages, no plan or packing. Buffers alias (contents do not
    matter) to spare memory."""
    send = torch.ones(max(out.values(), default=0), dtype=torch.uint8)
    recv = torch.empty(max(into.values(), default=0), dtype=torch.uint8)

    def part(buf: torch.Tensor, n: int, i: int) -> list[torch.Tensor]:
        lo, hi = n * i // rounds, n * (i + 1) // rounds
        return list(buf[: hi - lo].split(chunk)) if hi > lo else []

    def move() -> None:
        for i in range(rounds):
            sends = {p: part(send, n, i) for p, n in out.items() if part(send, n, i)}
            recvs = {p: part(recv, n, i) for p, n in into.items() if part(recv, n, i)}
            transport.exchange(sends, recvs)

    return timed(move)[0]


def pair_bandwidth(transport: TorchP2PTransport, num_bytes: int) -> float:
    """Bytes per second from process 0 to process 1 while the others wait (one link, uncontended)."""
    buf = torch.ones(num_bytes, dtype=torch.uint8)
    rank = transport.rank
    seconds, _ = timed(
        lambda: transport.exchange({1: [buf]} if rank == 0 else {}, {0: [buf]} if rank == 1 else {})
    )
    return num_bytes / seconds


# ------------------------------------------------------------------------------- baselines


def dst_index(dst: ParallelLayout, dst_ranks) -> dict[str, list]:
    """canonical name -> every (target rank, tensor, piece) of this process that needs it."""
    index = defaultdict(list)
    for r in dst_ranks:
        for t in dst.rank_tensors(SPEC, r):
            for p in t.pieces:
                index[p.canonical].append((r, t.name, p))
    return index


def reslice(full: dict[str, torch.Tensor], index, targets) -> None:
    for name, tensor in full.items():
        for r, tname, p in index[name]:
            region = tensor[box_slices(p.canon_box)]
            targets[r][tname][box_slices(p.local_box)].copy_(region.reshape([b - a for a, b in p.local_box]))


class GatherFull:
    """verl today: per Megatron parameter, PP broadcast + TP all-gather, full HF tensors, reslice."""

    def __init__(self, src: ParallelLayout, rank: int, index):
        self.src, self.rank, self.index = src, rank, index
        tp, dp, pp = src.tp, src.dp, src.pp
        self.at = lambda t, d, p: t + tp * (d + dp * p)  # Megatron's rank numbering (tp fastest)
        c = src.coords(rank)
        self.c = c
        # Every process creates every group, in the same order, and keeps its own.
        tp_groups = {
            (d, p): dist.new_group([self.at(t, d, p) for t in range(tp)])
            for d in range(dp)
            for p in range(pp)
        }
        pp_groups = {
            (t, d): dist.new_group([self.at(t, d, p) for p in range(pp)])
            for d in range(dp)
            for t in range(tp)
        }
        self.tp_group, self.pp_group = tp_groups[(c["dp"], c["pp"])], pp_groups[(c["tp"], c["dp"])]
        self.bytes_received = 0

    def __call__(self, sources, targets) -> None:
        src, c, dtype = self.src, self.c, SPEC.torch_dtype
        done: set[str] = set()
        received = 0
        for stage in range(src.pp):
            owner = self.at(c["tp"], c["dp"], stage)
            tensors = src.rank_tensors(SPEC, owner)
            for i, t in enumerate(tensors):
                if all(p.canonical in done for p in t.pieces):
                    continue  # the last stage's copy of tied embeddings: sent once, as verl does
                shard = sources[t.name] if c["pp"] == stage else torch.empty(t.shape, dtype=dtype)
                if src.pp > 1:
                    dist.broadcast(shard.view(torch.uint8), src=owner, group=self.pp_group)
                    received += 0 if c["pp"] == stage else shard.numel() * shard.element_size()
                parts = [torch.empty_like(shard) for _ in range(src.tp)]
                dist.all_gather(
                    [p.view(torch.uint8) for p in parts], shard.view(torch.uint8), group=self.tp_group
                )
                received += (src.tp - 1) * shard.numel() * shard.element_size()
                full: dict[str, torch.Tensor] = {}
                for j, part in enumerate(parts):
                    lt = src.rank_tensors(SPEC, self.at(j, c["dp"], stage))[i]
                    for p in lt.pieces:
                        if p.canonical not in full:
                            full[p.canonical] = torch.empty(SPEC.canonical_shapes()[p.canonical], dtype=dtype)
                        full[p.canonical][box_slices(p.canon_box)] = part[box_slices(p.local_box)].reshape(
                            [b - a for a, b in p.canon_box]
                        )
                reslice(full, self.index, targets)
                done.update(full)
        self.bytes_received = received


def broadcast_from_rank0(full, index, targets, bucket_bytes: int) -> None:
    """Rank 0 broadcasts the full HF tensors, packed in buckets; every process reslices."""
    names = list(SPEC.canonical_shapes())
    elem = SPEC.element_size
    while names:
        batch, size = [], 0
        while names and (not batch or size + box_numel_of(names[0]) * elem <= bucket_bytes):
            size += box_numel_of(names[0]) * elem
            batch.append(names.pop(0))
        buf = torch.empty(size // elem, dtype=SPEC.torch_dtype)
        if dist.get_rank() == 0:
            torch.cat([full[n].reshape(-1) for n in batch], out=buf)
        dist.broadcast(buf.view(torch.uint8), src=0)
        offset, views = 0, {}
        for n in batch:
            shape = SPEC.canonical_shapes()[n]
            views[n] = buf[offset : offset + box_numel_of(n)].view(shape)
            offset += box_numel_of(n)
        reslice(views, index, targets)


def box_numel_of(name: str) -> int:
    return math.prod(SPEC.canonical_shapes()[name])


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
    make = Placement.colocated if mode == "colocated" else Placement.disaggregated
    bucket = opts["bucket_mb"] << 20
    start = time.perf_counter()
    plan = get_plan(SPEC, src, dst, make(src.world_size, dst.world_size), bucket)
    plan_s = time.perf_counter() - start
    transport = TorchP2PTransport()
    executor = ReshardExecutor(plan, transport)
    sources = {r: make_tensors(src, r) for r in executor.src_ranks}
    targets = executor.allocate_targets()
    index = dst_index(dst, executor.dst_ranks)
    gather = GatherFull(src, rank, index) if mode == "colocated" else None
    full = make_tensors(ParallelLayout.hf(), 0) if rank == 0 else None
    out, into = traffic(plan, rank)
    chunk = opts["chunk_mb"] << 20
    raw_exchange_s(transport, out, into, chunk, 1)  # warm-up: connections, first-touch pages
    log(rank, name, "set up")

    # Correctness first (untimed): Tidal against the formula, then checksums for the baselines.
    stats = executor.sync(sources, targets, verify=True)
    for r in executor.dst_ranks:
        for t in dst.rank_tensors(SPEC, r):
            assert torch.equal(targets[r][t.name], build(t)), (name, r, t.name)
    sums = {(r, n): int(checksum(v)) for r, ts in targets.items() for n, v in ts.items()}
    log(rank, name, "checked Tidal's targets against the formula")
    baselines = {"broadcast": lambda: broadcast_from_rank0(full, index, targets, bucket)}
    if gather is not None:
        baselines["gather_full"] = lambda: gather(sources[rank], targets)

    def run(method: str, fn, check: bool) -> None:
        for ts in targets.values():
            for v in ts.values():
                v.zero_()
        runs[method].append(timed(fn))
        if check:
            bad = [k for k, v in sums.items() if int(checksum(targets[k[0]][k[1]])) != v]
            assert not bad, (name, method, bad[:3])

    # Interleaved, so the machine's load hits every method and the raw exchange alike: per
    # repetition, --pairs of (raw exchange, Tidal sync) back to back, then each baseline once.
    runs: dict[str, list[tuple[float, int]]] = defaultdict(list)
    raw, pair = [], []
    for _ in range(opts["reps"]):
        pair.append(pair_bandwidth(transport, 64 << 20))
        for i in range(opts["pairs"]):
            # The better of all at once and in as many rounds as the plan has buckets.
            one_shot = raw_exchange_s(transport, out, into, chunk, 1)
            raw.append(min(one_shot, raw_exchange_s(transport, out, into, chunk, plan.report.num_buckets)))
            run("tidal", lambda: executor.sync(sources, targets), check=i == opts["pairs"] - 1)
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
        "tidal_time_s": times["tidal"],
        "tidal_times_s": [t for t, _ in runs["tidal"]],
        "peak_extra_bytes": max(peak["tidal"], total(executor.staging_bytes, dist.ReduceOp.MAX)),
        "peak_extra_rss_bytes": peak["tidal"],
        "staging_bytes": total(executor.staging_bytes, dist.ReduceOp.MAX),
        "broadcast_time_s": times["broadcast"],
        "broadcast_peak_extra_bytes": peak["broadcast"],
        "broadcast_bytes_ratio": (world - 1) * SPEC.num_bytes() / lower,
    }
    result["bytes_ratio"] = result["tidal_bytes"] / lower
    # Per repetition: this rep's sync against this rep's raw exchange; the median of those ratios.
    result["time_ratio"] = statistics.median(t / r for (t, _), r in zip(runs["tidal"], raw, strict=True))
    result["time_ratio_vs_pair"] = (
        statistics.median(t for t, _ in runs["tidal"]) * statistics.median(pair) / largest
    )
    result["speedup_vs_broadcast"] = times["broadcast"] / times["tidal"]
    if gather is not None:
        result.update(
            gather_full_time_s=times["gather_full"],
            gather_full_peak_extra_bytes=peak["gather_full"],
            gather_full_bytes_ratio=total(gather.bytes_received) / lower,
            speedup_vs_gather_full=times["gather_full"] / times["tidal"],
        )
    if rank == 0:
        Path(out_path).write_text(json.dumps(result))
    dist.destroy_process_group()


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
        print(
            f"{name}: {world} processes, tidal {r['tidal_time_s']:.2f}s (bound {r['time_lower_bound_s']:.2f}s, "
            f"ratio {r['time_ratio']:.2f}), bytes x{r['bytes_ratio']:.2f}, gather_full "
            f"{format(r['gather_full_time_s'], '.2f') + 's' if 'gather_full_time_s' in r else 'n/a'}, "
            f"broadcast {r['broadcast_time_s']:.2f}s, "
            f"bandwidth {r['bandwidth_bytes_per_s'] / 2**20:.0f} MiB/s, peak extra "
            f"{r['peak_extra_bytes'] / 2**20:.0f} MiB (staging {r['staging_bytes'] / 2**20:.0f} MiB)",
            flush=True,
        )
    first = results[args.scenarios[0]]
    summary = {k: v for k, v in first.items() if not isinstance(v, list)}
    summary.update(
        worst_time_ratio=max(r["time_ratio"] for r in results.values()),
        worst_bytes_ratio=max(r["bytes_ratio"] for r in results.values()),
        model=f"Qwen3-0.6B shape, {SPEC.num_bytes() // SPEC.element_size / 1e6:.0f}M parameters, {SPEC.dtype}",
        cpus=os.cpu_count(),
        torch=torch.__version__,
        scenarios=results,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
