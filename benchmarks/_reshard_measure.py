"""Synthetic weights and measurements for benchmarks/reshard.py.

Weights: a hash of each element's position in its canonical tensor, so every process fills its own
shards (and checks its targets) without the full model existing anywhere.
Measurements: wall time across all processes with peak extra resident memory, the transport's own
time for the plan's exact byte matrix (the bound of `time_ratio`), and one uncontended link.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from tidal.resharding.layout import Box, LocalTensor, ParallelLayout, box_numel, box_slices
from tidal.resharding.planner import Plan
from tidal.resharding.spec import Spec
from tidal.resharding.transports import Transport

# ------------------------------------------------------------------------ synthetic weights


@functools.cache
def _tensor_ids(spec: Spec) -> dict[str, int]:
    return {name: i for i, name in enumerate(spec.canonical_shapes())}


def values(spec: Spec, name: str, box: Box) -> torch.Tensor:
    """The canonical values of `box` of tensor `name`: a hash of each element's flat position."""
    shape = spec.canonical_shapes()[name]
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    idx = torch.zeros((), dtype=torch.int64)
    for d, (start, stop) in enumerate(box):
        view = [1] * len(box)
        view[d] = stop - start
        idx = idx + (torch.arange(start, stop) * strides[d]).view(view)
    h = (idx * 2654435761 + (_tensor_ids(spec)[name] + 1) * 40503) & 0xFFFFFF
    return (h.to(torch.float32) / float(1 << 23) - 1.0).to(spec.torch_dtype)


def build(spec: Spec, t: LocalTensor) -> torch.Tensor:
    """One local tensor filled with the canonical values of its pieces (padding 0)."""
    out = torch.zeros(t.shape, dtype=spec.torch_dtype)
    for p in t.pieces:
        dest = out[box_slices(p.local_box)].view([stop - start for start, stop in p.canon_box])
        (r0, r1), *rest = p.canon_box
        step = max(1, (1 << 22) // box_numel(((0, 1), *rest)))  # small int64 temporaries
        for lo in range(r0, r1, step):
            hi = min(lo + step, r1)
            dest[lo - r0 : hi - r0].copy_(values(spec, p.canonical, ((lo, hi), *rest)))
    return out


def make_tensors(spec: Spec, layout: ParallelLayout, rank: int) -> dict[str, torch.Tensor]:
    return {t.name: build(spec, t) for t in layout.rank_tensors(spec, rank)}


# ------------------------------------------------------------------------------ measurement


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
    _settle()
    start = time.perf_counter()
    fn()
    _settle()
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed), _vm("VmHWM:") - base


def _settle() -> None:
    """Every process here, with its queued GPU work done (device work is asynchronous)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    dist.barrier()


def traffic(plan: Plan, device: int) -> tuple[dict[int, int], dict[int, int]]:
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


def raw_exchange_s(
    transport: Transport, out: dict, into: dict, chunk: int, rounds: int, local_bytes: int = 0
) -> float:
    """The transport alone moving the same device-to-device bytes in `rounds` exchanges (each pair's
    bytes split evenly), chunk-sized messages, no plan or packing.

    Every peer gets its own send and receive memory, written before the clock starts, as a sync's
    sources and targets are: fresh pages would make the bound pay first-touch faults the sync does not
    (measured: 0.70 s instead of 0.27 s for TP2xDP2 -> TP4). On a CPU they live only for this call.
    `local_bytes` > 0 also copies that many bytes within this process while the messages move (the
    plan's local copies, as plain memcpy): the bound for a machine where the wire is memory too.
    """
    send, recv, local_src, local_dst = _exchange_buffers(transport.device, out, into, local_bytes)

    def part(buf: torch.Tensor, i: int) -> list[torch.Tensor]:
        n = buf.numel()
        lo, hi = n * i // rounds, n * (i + 1) // rounds
        return list(buf[lo:hi].split(chunk)) if hi > lo else []

    def move() -> None:
        for i in range(rounds):
            sends = {p: part(b, i) for p, b in send.items() if part(b, i)}
            recvs = {p: part(b, i) for p, b in recv.items() if part(b, i)}
            pending = transport.start(sends, recvs)
            lo, hi = local_bytes * i // rounds, local_bytes * (i + 1) // rounds
            local_dst[lo:hi].copy_(local_src[lo:hi])
            pending.wait()

    return timed(move)[0]


_GPU_BUFFERS: dict = {}


def _exchange_buffers(dev: torch.device, out: dict, into: dict, local_bytes: int) -> tuple:
    """The raw exchange's memory, written before any timing. On a GPU it is kept for later calls of
    the same shape: the CUDA IPC transport maps each sender storage once, as it would parameters."""
    key = (dev, tuple(sorted(out.items())), tuple(sorted(into.items())), local_bytes)
    if key in _GPU_BUFFERS:
        return _GPU_BUFFERS[key]
    buffers = (
        {p: torch.ones(n, dtype=torch.uint8, device=dev) for p, n in out.items()},
        {p: torch.ones(n, dtype=torch.uint8, device=dev) for p, n in into.items()},
        torch.ones(local_bytes, dtype=torch.uint8, device=dev),
        torch.zeros(local_bytes, dtype=torch.uint8, device=dev),
    )
    if dev.type == "cuda":
        _GPU_BUFFERS[key] = buffers
    return buffers


def pair_bandwidth(transport: Transport, num_bytes: int) -> float:
    """Bytes per second from process 0 to process 1 while the others wait (one link, uncontended)."""
    buf = torch.ones(num_bytes, dtype=torch.uint8, device=transport.device)
    rank = transport.rank
    seconds, _ = timed(
        lambda: transport.exchange({1: [buf]} if rank == 0 else {}, {0: [buf]} if rank == 1 else {})
    )
    return num_bytes / seconds
