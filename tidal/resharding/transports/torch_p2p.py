"""torch.distributed point-to-point transport: gloo on CPU, NCCL on GPU.

All sends and receives of a bucket (all buffers, for all peers) go out in one `batch_isend_irecv` call. On NCCL that call is
coalesced into one grouped launch (so a device sending to several peers does not serialise them,
and the order of sends and receives cannot deadlock); gloo has no coalescing and torch falls back
to posting each isend/irecv, which gloo runs asynchronously on its own threads, so the effect is
the same: everything is in flight before anyone waits.

Peers are ranks of `group` (the default group when None), the devices of the plan's placement.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from tidal.resharding.transports.base import Buffers, Done, Pending, Transport, Works

_TAG_WRAP = 1 << 30  # tags stay positive 32-bit ints; far more messages than ever in flight


class TorchP2PTransport(Transport):
    """isend/irecv over an initialised process group (gloo or nccl).

    `device` picks the buffers' device where the group has both backends ("cpu:gloo,cuda:nccl",
    as Tidal's workers on GPUs create it); by default it follows the group's backend.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str | None = None):
        if not dist.is_initialized():
            raise ValueError(
                "TorchP2PTransport needs torch.distributed initialised "
                "(dist.init_process_group('gloo' or 'nccl', ...)) before it is built"
            )
        self.group = group
        self.backend = str(dist.get_backend(group))
        if device is None:
            device = "cuda" if "nccl" in self.backend else "cpu"
        device = torch.device(device)
        if device.type == "cuda":
            device = torch.device(
                "cuda", torch.cuda.current_device() if device.index is None else device.index
            )
        needed = {"cpu": "gloo", "cuda": "nccl"}.get(device.type)
        if needed is None or needed not in self.backend:
            raise ValueError(
                f"TorchP2PTransport on {device} needs a group with backend {needed or 'gloo or nccl'}; "
                f"this group's backend is {self.backend!r}"
            )
        super().__init__(dist.get_rank(group), dist.get_world_size(group), device)
        self._tags = MessageTags()
        if device.type == "cuda":
            # NCCL creates its communicator lazily, and a first batched p2p call that only some ranks
            # join would hang (torch's documented caveat): make the first call a collective of all.
            dist.barrier(group=group, device_ids=[device.index])

    def _start(self, sends: Buffers, recvs: Buffers) -> Pending:
        ops = [
            dist.P2POp(dist.isend if send else dist.irecv, buf, group=self.group, tag=tag, group_peer=peer)
            for send, buf, peer, tag in self._tags.ops(sends, recvs)
        ]
        if not ops:
            return Done()
        return Works(dist.batch_isend_irecv(ops))


class MessageTags:
    """Tags for the messages of a point-to-point transport, counted per peer and direction.

    Each message gets the count of messages posted before it between the same pair in the same
    direction as its tag. Both ends count alike, so gloo, which matches messages by (peer, tag),
    pairs them right even with two calls in flight; NCCL ignores tags and keeps issue order.
    """

    def __init__(self) -> None:
        self._sent: defaultdict[int, int] = defaultdict(int)  # messages posted to each peer so far
        self._received: defaultdict[int, int] = defaultdict(int)  # ... and from each peer

    def ops(self, sends: Buffers, recvs: Buffers) -> list[tuple[bool, torch.Tensor, int, int]]:
        """(is a send, buffer, peer, tag) for every non-empty buffer: sends first, peers in order."""
        out = []
        for is_send, buffers, counts in ((True, sends, self._sent), (False, recvs, self._received)):
            for peer, bufs in sorted(buffers.items()):
                for buf in bufs:
                    if buf.numel():
                        out.append((is_send, buf, peer, counts[peer] % _TAG_WRAP))
                        counts[peer] += 1
        return out
