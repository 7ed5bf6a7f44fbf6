"""CUDA IPC transport: processes on the GPUs of one node read each other's memory directly.

For colocated processes that do not share a NCCL communicator (a trainer process and a rollout
engine process on the same GPU, or on GPUs of one node with peer access). Each process allocates
one staging arena of `capacity_bytes` on its GPU and, once, shares its CUDA IPC handle with every
other process of `group` (a CPU/gloo group, used only for handles and tiny signals). Per exchange:

1. a sender copies its buffers into its own arena (peers in rank order, each peer's buffers in
   order), waits for the copies, and tells each receiver where its part starts;
2. a receiver copies its part straight out of the sender's arena (mapped into its address space)
   into its receive buffers, waits for the copies, and acknowledges;
3. a sender returns once every receiver has acknowledged, so its arena may be reused.

Buffers are laid out back to back (their sizes are multiples of the element size), so an arena of
the plan's `bucket_bytes` holds any bucket. It is extra memory beside the executor's staging
buffer (at most one bucket each). Each side's copies of a call go in one fused launch
(`copy_bytes`): with hundreds of rectangles per bucket, one launch each cost more than the bytes.
Its tests are marked `gpu` (CPU-only CI cannot run them); they passed on an H100 (torch 2.11).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import reduce_tensor

from tidal.resharding.messages import copy_all
from tidal.resharding.transports.base import Buffers, Pending, Transport

_OFFSET_TAG, _ACK_TAG = 0, 1
_INT_OF_WIDTH = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


class _Acks(Pending):
    def __init__(self, works: list[dist.Work]):
        self._works = works

    def wait(self) -> None:
        for work in self._works:
            work.wait()


class CudaIpcTransport(Transport):
    """Exchange through CUDA IPC-mapped arenas; `group` must be a gloo group of the same ranks."""

    max_in_flight = 1  # one arena: the next call would overwrite what peers may still be reading

    def __init__(self, capacity_bytes: int, group: dist.ProcessGroup | None = None):
        if not torch.cuda.is_available():
            raise ValueError("CudaIpcTransport needs a CUDA device; on CPU use TorchP2PTransport (gloo)")
        if not dist.is_initialized() or dist.get_backend(group) != "gloo":
            raise ValueError(
                "CudaIpcTransport signals over a gloo group: pass group=dist.new_group(backend='gloo') "
                "(or initialise the default group with gloo)"
            )
        if capacity_bytes < 1:
            raise ValueError(
                f"CudaIpcTransport capacity_bytes={capacity_bytes} must be >= 1 (use the plan's bucket_bytes)"
            )
        device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(dist.get_rank(group), dist.get_world_size(group), device)
        self.group = group
        self.capacity_bytes = capacity_bytes
        self._arena = torch.empty(capacity_bytes, dtype=torch.uint8, device=device)
        handles: list = [None] * self.world_size
        dist.all_gather_object(handles, reduce_tensor(self._arena), group=group)
        self._peers = {
            r: rebuild(*args) for r, (rebuild, args) in enumerate(handles) if r != self.rank
        }  # peer rank -> its arena, mapped into this process

    def _start(self, sends: Buffers, recvs: Buffers) -> Pending:
        stream = torch.cuda.current_stream(self.device)
        # 1. Stage every outgoing buffer in this process's arena.
        offsets: dict[int, torch.Tensor] = {}
        staged, outgoing, cursor = [], [], 0
        for peer, bufs in sorted(sends.items()):
            offsets[peer] = torch.tensor([cursor], dtype=torch.int64)
            for buf in bufs:
                if cursor + buf.numel() > self.capacity_bytes:
                    raise ValueError(
                        f"CudaIpcTransport rank {self.rank}: a bucket sends more than capacity_bytes="
                        f"{self.capacity_bytes}; build the transport with the plan's bucket_bytes"
                    )
                staged.append(self._arena[cursor : cursor + buf.numel()])
                outgoing.append(buf)
                cursor += buf.numel()
        copy_bytes(staged, outgoing)
        stream.synchronize()  # the arena holds the data before any receiver is told where it is
        posted = [
            dist.isend(off, group_dst=peer, group=self.group, tag=_OFFSET_TAG)
            for peer, off in offsets.items()
        ]
        acks = {peer: torch.empty(1, dtype=torch.int64) for peer in offsets}
        ack_works = [
            dist.irecv(a, group_src=peer, group=self.group, tag=_ACK_TAG) for peer, a in acks.items()
        ]
        # 2. Pull each sender's part out of its arena, all pairs in one fused copy.
        incoming, mapped = [], []
        for peer, bufs in sorted(recvs.items()):
            base = torch.empty(1, dtype=torch.int64)
            dist.recv(base, group_src=peer, group=self.group, tag=_OFFSET_TAG)
            cursor = int(base)
            for buf in bufs:
                incoming.append(buf)
                mapped.append(self._peers[peer][cursor : cursor + buf.numel()])
                cursor += buf.numel()
        copy_bytes(incoming, mapped)
        stream.synchronize()  # copied out before the senders may overwrite their arenas
        posted += [
            dist.isend(torch.ones(1, dtype=torch.int64), group_dst=peer, group=self.group, tag=_ACK_TAG)
            for peer in recvs
        ]
        return _Acks(posted + ack_works)

    def close(self) -> None:
        if not self._peers and not self._arena.numel():
            return
        self._peers = {}
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)  # nobody maps an arena any more: each may now be freed
        self._arena = torch.empty(0, dtype=torch.uint8, device=self.device)
        torch.cuda.ipc_collect()


def copy_bytes(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """Copy uint8 buffers pairwise in one fused launch, viewed as the widest integer type that every
    size and address allows (a kernel moving 8-byte words runs near memory speed; bytes do not)."""
    pairs = [(d, s) for d, s in zip(dsts, srcs, strict=True) if d.numel()]
    if not pairs:
        return
    width = 8
    while width > 1 and any((t.numel() | t.data_ptr()) % width for pair in pairs for t in pair):
        width //= 2
    kind = _INT_OF_WIDTH[width]
    copy_all([d.view(kind) for d, _ in pairs], [s.view(kind) for _, s in pairs], fused=True)
