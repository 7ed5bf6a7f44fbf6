"""torch.distributed point-to-point transport: gloo on CPU, NCCL on GPU.

All sends and receives of a bucket (all buffers, for all peers) go out in one `batch_isend_irecv` call. On NCCL that call is
coalesced into one grouped launch (so a device sending to several peers does not serialise them,
and the order of sends and receives cannot deadlock); gloo has no coalescing and torch falls back
to posting each isend/irecv, which gloo runs asynchronously on its own threads, so the effect is
the same: everything is in flight before anyone waits.

Peers are ranks of `group` (the default group when None), the devices of the plan's placement.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tidal.resharding.transports.base import Buffers, Done, Pending, Transport


class _Works(Pending):
    def __init__(self, works: list[dist.Work]):
        self._works = works

    def wait(self) -> None:
        for work in self._works:
            work.wait()


class TorchP2PTransport(Transport):
    """isend/irecv over an initialised process group (gloo or nccl)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise ValueError(
                "TorchP2PTransport needs torch.distributed initialised "
                "(dist.init_process_group('gloo' or 'nccl', ...)) before it is built"
            )
        self.group = group
        self.backend = dist.get_backend(group)
        if self.backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        elif self.backend == "gloo":
            device = torch.device("cpu")
        else:
            raise ValueError(f"TorchP2PTransport supports backends 'gloo' and 'nccl', not {self.backend!r}")
        super().__init__(dist.get_rank(group), dist.get_world_size(group), device)
        if self.backend == "nccl":
            # NCCL creates its communicator lazily, and a first batched p2p call that only some ranks
            # join would hang (torch's documented caveat): make the first call a collective of all.
            dist.barrier(group=group, device_ids=[device.index])

    def _start(self, sends: Buffers, recvs: Buffers) -> Pending:
        # The i-th buffer between a pair gets tag i: gloo matches messages by (peer, tag), so the
        # pairing cannot depend on arrival order; NCCL ignores tags and keeps issue order per pair.
        ops = [
            dist.P2POp(op, buf, group=self.group, tag=i, group_peer=peer)
            for op, buffers in ((dist.isend, sends), (dist.irecv, recvs))
            for peer, bufs in sorted(buffers.items())
            for i, buf in enumerate(bufs)
            if buf.numel()
        ]
        if not ops:
            return Done()
        return _Works(dist.batch_isend_irecv(ops))
