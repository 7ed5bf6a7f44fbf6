"""CUDA IPC transport: processes on the GPUs of one node read each other's memory directly.

For colocated processes that do not share a NCCL communicator (a trainer process and a rollout
engine process on the same GPU, or on GPUs of one node with peer access). Nothing is staged: a
receiver copies straight out of the sender's own buffers (its parameters, or the executor's
staging buffer for packed rectangles), mapped into the receiver's address space. Per exchange:

1. a sender waits for its stream (the buffers hold their data), then tells each receiver where
   each buffer lies: (storage slot, byte offset) per buffer, plus the CUDA IPC handle of any
   storage that receiver has not mapped before;
2. a receiver maps new storages (once: the plan's buffers live in the same few storages every
   sync), copies every buffer of every sender in one fused launch, waits, and acknowledges;
3. a sender returns once every receiver has acknowledged, so its buffers may change again.

Signals go over a CPU/gloo group (tiny tensors, and the pickled handles the first time).
A mapped storage stays mapped until `close`: torch keeps the sender's memory alive while a
receiver maps it, so no other tensor can take that address meanwhile and the cache by address
cannot go stale. So send from buffers that persist (parameters, and the executor's staging buffer,
which it keeps on a GPU): each new storage a sender uses stays allocated until `close`. Its tests are marked `gpu` (CPU-only CI cannot run them); they pass on an H100.
"""

from __future__ import annotations

import pickle

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import reduce_tensor

from tidal.resharding.messages import copy_all
from tidal.resharding.transports.base import Buffers, Pending, Transport, Works

_WHERE_TAG, _HANDLES_TAG, _ACK_TAG = 0, 1, 2
_INT_OF_WIDTH = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


class CudaIpcTransport(Transport):
    """Exchange by reading peers' buffers through CUDA IPC; `group` must be a gloo group."""

    max_in_flight = 1  # a sender's buffers are read in place: it must not move on before the acks

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not torch.cuda.is_available():
            raise ValueError("CudaIpcTransport needs a CUDA device; on CPU use TorchP2PTransport (gloo)")
        if not dist.is_initialized() or dist.get_backend(group) != "gloo":
            raise ValueError(
                "CudaIpcTransport signals over a gloo group: pass group=dist.new_group(backend='gloo') "
                "(or initialise the default group with gloo)"
            )
        device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(dist.get_rank(group), dist.get_world_size(group), device)
        self.group = group
        # Sender side: per peer, the slot of each storage that peer has mapped, by (address, size).
        self._slots: dict[int, dict[tuple[int, int], int]] = {}
        # Receiver side: per peer, its storages mapped here (uint8 tensors over each whole storage).
        self._mapped: dict[int, list[torch.Tensor]] = {}

    def _start(self, sends: Buffers, recvs: Buffers) -> Pending:
        torch.cuda.current_stream(self.device).synchronize()  # every send buffer holds its data
        posted = []
        for peer, bufs in sorted(sends.items()):
            where, new = self._locate(peer, bufs)
            posted.append(dist.isend(where, group_dst=peer, group=self.group, tag=_WHERE_TAG))
            if new:
                posted += self._send_handles(peer, new)
        acks = [torch.empty(1, dtype=torch.int64) for _ in sends]
        posted += [
            dist.irecv(a, group_src=peer, group=self.group, tag=_ACK_TAG)
            for a, peer in zip(acks, sorted(sends), strict=True)
        ]
        incoming, mapped = [], []
        for peer, bufs in sorted(recvs.items()):
            where = torch.empty(1 + 2 * len(bufs), dtype=torch.int64)
            dist.recv(where, group_src=peer, group=self.group, tag=_WHERE_TAG)
            if int(where[0]):
                self._map_handles(peer, int(where[0]))
            storages = self._mapped[peer]
            for buf, (slot, offset) in zip(bufs, where[1:].view(-1, 2).tolist(), strict=True):
                incoming.append(buf)
                mapped.append(storages[slot][offset : offset + buf.numel()])
        copy_bytes(incoming, mapped)
        torch.cuda.current_stream(self.device).synchronize()  # read before the senders move on
        posted += [
            dist.isend(torch.ones(1, dtype=torch.int64), group_dst=peer, group=self.group, tag=_ACK_TAG)
            for peer in sorted(recvs)
        ]
        return Works(posted)

    def _locate(self, peer: int, bufs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """[number of new storages, (slot, byte offset) per buffer] for `peer`, and those storages."""
        slots = self._slots.setdefault(peer, {})
        where, new = [0], []
        for buf in bufs:
            storage = buf.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in slots:
                slots[key] = len(slots)
                new.append(torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage))
            where += [slots[key], buf.data_ptr() - storage.data_ptr()]
        where[0] = len(new)
        return torch.tensor(where, dtype=torch.int64), new

    def _send_handles(self, peer: int, storages: list[torch.Tensor]) -> list[dist.Work]:
        payload = torch.frombuffer(
            bytearray(pickle.dumps([reduce_tensor(s) for s in storages])), dtype=torch.uint8
        )
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        return [
            dist.isend(size, group_dst=peer, group=self.group, tag=_HANDLES_TAG),
            dist.isend(payload, group_dst=peer, group=self.group, tag=_HANDLES_TAG),
        ]

    def _map_handles(self, peer: int, count: int) -> None:
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, group_src=peer, group=self.group, tag=_HANDLES_TAG)
        payload = torch.empty(int(size), dtype=torch.uint8)
        dist.recv(payload, group_src=peer, group=self.group, tag=_HANDLES_TAG)
        handles = pickle.loads(payload.numpy().tobytes())  # from a peer of our own group
        if len(handles) != count:
            raise RuntimeError(
                f"CudaIpcTransport rank {self.rank}: {len(handles)} handles from {peer}, {count} announced"
            )
        self._mapped.setdefault(peer, []).extend(rebuild(*args) for rebuild, args in handles)

    def close(self) -> None:
        if not self._mapped and not self._slots:
            return
        self._mapped, self._slots = {}, {}
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)  # nobody maps a peer's memory any more: each may free its own
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
