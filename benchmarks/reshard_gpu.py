"""Weight-sync resharding on one GPU node: Tidal's executor over CUDA IPC (or NCCL) vs. its bounds.

The model and scenarios are benchmarks/reshard.py's (Qwen3-0.6B shape, bf16). Every process is a
colocated trainer + rollout process of one node. With fewer GPUs than processes they share GPU 0
(CUDA IPC between processes of one GPU: trainer and engine processes colocated on a card); with a
GPU per process, `--transport nccl` runs NCCL p2p too.

Per scenario, interleaved over --reps (medians):
  tidal         the cached plan run by `ReshardExecutor` over the transport;
  tidal_loop    the same with the executor's copies as one `copy_` per rectangle (its reference
                path, `fused_copies=False`) instead of fused launches;
  raw           the transport alone moving the plan's device-to-device byte matrix (no plan,
                packing or copies): time_ratio = tidal / raw, what the engine adds to the wire;
  full_ipc      the baseline: process 0 holds the full Hugging Face model; every process copies
                every full tensor out of it through CUDA IPC and reslices its shard (what
                gather-then-share-handles weight sync costs once the gather is done; untimed gather);
  hbm_bound     when all processes share one GPU, every byte received or copied locally crosses the
                same HBM once: the sum over processes / one large device-to-device copy's rate.
Targets are checked against the formula (Tidal) and by checksum (the baseline).

    python benchmarks/reshard_gpu.py                        # tp2_to_tp4 and tp4pp2_to_tp2
    python benchmarks/reshard_gpu.py --scenarios tp2_to_tp4 --bucket-mb 256

The last line is one JSON object (all scenarios under "scenarios").
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _reshard_baselines import dst_index, reslice
from _reshard_measure import build, make_tensors, raw_exchange_s, timed, traffic
from reshard import PARTS, SCENARIOS, SPEC
from torch.multiprocessing.reductions import reduce_tensor

from tidal.resharding.alignment import aligned_colocated
from tidal.resharding.executor import ReshardExecutor
from tidal.resharding.layout import ParallelLayout
from tidal.resharding.planner import Placement, get_plan
from tidal.resharding.transports import CudaIpcTransport, TorchP2PTransport
from tidal.resharding.verify import checksum


def copy_rate(num_bytes: int) -> float:
    """Bytes per second of one large device-to-device copy (each byte read and written once)."""
    a = torch.ones(num_bytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        b.copy_(a)
    torch.cuda.synchronize()
    return 5 * num_bytes / (time.perf_counter() - start)


class FullIpc:
    """Process 0's full model, mapped into every process; each copies it whole, then reslices."""

    def __init__(self, full: dict[str, torch.Tensor] | None, index):
        names = list(SPEC.canonical_shapes())
        objs = [[reduce_tensor(full[n]) for n in names] if full is not None else None]
        dist.broadcast_object_list(objs, src=0)
        # A process cannot open its own IPC handles: process 0 reads its tensors directly.
        self.full = full or {n: fn(*args) for n, (fn, args) in zip(names, objs[0], strict=True)}
        self.index = index
        self.copies = {n: torch.empty_like(t) for n, t in self.full.items()}  # the "received" model

    def __call__(self, targets) -> None:
        for name, t in self.full.items():
            self.copies[name].copy_(t)
        reslice(self.copies, self.index, targets)


def worker(rank: int, world: int, name: str, opts: dict, out_path: str) -> None:
    torch.set_num_threads(2)
    nccl = opts["transport"] == "nccl"
    torch.cuda.set_device(rank if nccl else 0)
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if nccl else "gloo",
        init_method=f"file://{opts['store']}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=10),
    )
    src, dst, mode = SCENARIOS[name]
    bucket = opts["bucket_mb"] << 20
    placement = aligned_colocated(SPEC, src, dst) if mode == "aligned" else Placement.colocated(world, world)
    plan = get_plan(SPEC, src, dst, placement, bucket)
    transport = TorchP2PTransport(device="cuda") if nccl else CudaIpcTransport()
    executor = ReshardExecutor(plan, transport)
    looped = ReshardExecutor(plan, transport, fused_copies=False)  # the reference: one copy_ each
    sources = {r: {k: v.cuda() for k, v in make_tensors(SPEC, src, r).items()} for r in executor.src_ranks}
    targets = executor.allocate_targets()
    index = dst_index(SPEC, dst, executor.dst_ranks)
    full = {k: v.cuda() for k, v in make_tensors(SPEC, ParallelLayout.hf(), 0).items()} if rank == 0 else None
    baseline = FullIpc(full, index)
    out, into = traffic(plan, rank)
    chunk = opts["chunk_mb"] << 20
    raw_exchange_s(transport, out, into, chunk, plan.report.num_buckets)  # warm-up

    stats = executor.sync(sources, targets, verify=True)
    for r in executor.dst_ranks:
        for t in dst.rank_tensors(SPEC, r):
            assert torch.equal(targets[r][t.name].cpu(), build(SPEC, t)), (name, r, t.name)
    sums = {(r, n): int(checksum(v)) for r, ts in targets.items() for n, v in ts.items()}

    def cleared_then(fn):
        for ts in targets.values():
            for v in ts.values():
                v.zero_()
        return timed(fn)[0]

    runs: dict[str, list[float]] = {"tidal": [], "tidal_loop": [], "raw": [], "full_ipc": []}
    parts = []
    for _ in range(opts["reps"]):
        runs["raw"].append(raw_exchange_s(transport, out, into, chunk, plan.report.num_buckets))
        runs["tidal"].append(cleared_then(lambda: parts.append(executor.sync(sources, targets))))
        runs["tidal_loop"].append(cleared_then(lambda: looped.sync(sources, targets)))
        runs["full_ipc"].append(cleared_then(lambda: baseline(targets)))
        bad = [k for k, v in sums.items() if int(checksum(targets[k[0]][k[1]])) != v]
        assert not bad, (name, "full_ipc", bad[:3])

    def total(x: float, op=dist.ReduceOp.SUM) -> float:
        t = torch.tensor([float(x)], dtype=torch.float64)
        dist.all_reduce(t, op=op)
        return float(t)

    times = {m: statistics.median(v) for m, v in runs.items()}
    hbm_bytes = total(stats.bytes_received + stats.local_copy_bytes)
    rate = copy_rate(1 << 30) if rank == 0 else 0.0
    rate = total(rate, dist.ReduceOp.MAX)
    shared_gpu = torch.cuda.device_count() < world or not nccl
    result = {
        "scenario": name,
        "processes": world,
        "transport": opts["transport"],
        "gpus_used": 1 if shared_gpu else world,
        "device": torch.cuda.get_device_name(0),
        "bucket_bytes": bucket,
        "lower_bound_bytes": plan.report.lower_bound_bytes,
        "tidal_bytes": total(stats.bytes_received),
        "local_copy_bytes": total(stats.local_copy_bytes),
        "copy_rate_bytes_per_s": rate,
        "times_s": runs,
        "tidal_time_s": times["tidal"],
        "raw_exchange_s": times["raw"],
        "full_ipc_time_s": times["full_ipc"],
        "tidal_loop_time_s": times["tidal_loop"],
        "speedup_of_fused_copies": times["tidal_loop"] / times["tidal"],
        "hbm_bound_s": hbm_bytes / rate if shared_gpu else None,
        "time_ratio": statistics.median(t / r for t, r in zip(runs["tidal"], runs["raw"], strict=True)),
        "speedup_vs_full_ipc": times["full_ipc"] / times["tidal"],
        "staging_bytes": total(executor.staging_bytes, dist.ReduceOp.MAX),
        # Per part of a sync (host time: launching copies, waiting on peers): median, busiest process.
        "tidal_parts_s": {
            k: total(statistics.median(getattr(p, k) for p in parts), dist.ReduceOp.MAX) for k in PARTS
        },
    }
    if shared_gpu:
        result["time_ratio_vs_hbm"] = times["tidal"] / result["hbm_bound_s"]
    if rank == 0:
        Path(out_path).write_text(json.dumps(result))
    baseline.full = {}  # unmap process 0's model before it exits
    transport.close()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=["tp2_to_tp4", "tp4pp2_to_tp2"],
        choices=[s for s, (_, _, mode) in SCENARIOS.items() if mode != "disaggregated"],
    )
    parser.add_argument("--transport", choices=["ipc", "nccl"], default="ipc")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--bucket-mb", type=int, default=256, help="the plan's bucket cap, MiB")
    parser.add_argument("--chunk-mb", type=int, default=64, help="message size of the raw exchange, MiB")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device; benchmarks/reshard.py is the CPU (gloo) benchmark")
    results = {}
    for name in args.scenarios:
        src, _, _ = SCENARIOS[name]
        world = src.world_size
        if args.transport == "nccl" and torch.cuda.device_count() < world:
            print(f"{name}: skipped, NCCL needs {world} GPUs (have {torch.cuda.device_count()})", flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            opts = {**vars(args), "store": f"{tmp}/store"}
            mp.spawn(worker, args=(world, name, opts, f"{tmp}/result.json"), nprocs=world, join=True)
            results[name] = r = json.loads(Path(f"{tmp}/result.json").read_text())
        hbm = f", HBM bound {r['hbm_bound_s'] * 1e3:.1f} ms" if r["hbm_bound_s"] else ""
        print(
            f"{name}: {world} processes on {r['gpus_used']} {r['device']}, {args.transport}: tidal "
            f"{r['tidal_time_s'] * 1e3:.1f} ms (loop copies {r['tidal_loop_time_s'] * 1e3:.1f} ms), raw exchange {r['raw_exchange_s'] * 1e3:.1f} ms (ratio "
            f"{r['time_ratio']:.2f}){hbm}, full_ipc {r['full_ipc_time_s'] * 1e3:.1f} ms "
            f"(x{r['speedup_vs_full_ipc']:.1f}); {r['tidal_bytes'] / 2**20:.0f} MiB moved, "
            f"{r['local_copy_bytes'] / 2**20:.0f} MiB local; parts (ms) "
            + ", ".join(f"{k.removesuffix('_s')} {v * 1e3:.1f}" for k, v in r["tidal_parts_s"].items()),
            flush=True,
        )
    print(json.dumps({"torch": torch.__version__, "scenarios": results}))


if __name__ == "__main__":
    sys.exit(main())
