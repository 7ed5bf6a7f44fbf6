"""The one interface every resharding transport implements: exchange flat byte buffers with peers.

An executor runs a plan bucket by bucket. In each bucket a device sends an ordered list of buffers
to each of some peers and receives an ordered list from each of some peers; both ends derive the
same lists (count and sizes) from the same plan. The buffers are packed rectangles, or a tensor's
own memory where a rectangle is contiguous (no copy). So a transport only has to move contiguous
uint8 buffers between numbered devices, in order per pair; it knows nothing about tensors, names
or layouts. Buffers are uint8 so that a transport never depends on whether its backend supports
the model's dtype (gloo and bfloat16, say).

`start` posts every send and receive of one bucket and returns at once; `Pending.wait` returns
when all of them are done: the received buffers are filled and the sent ones may be reused. Up to
`max_in_flight` calls may be outstanding (posted, not yet waited), waited in the order they were
made; between one pair of devices, messages are matched in the order both ends posted them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch

Buffers = Mapping[int, Sequence[torch.Tensor]]  # peer -> its buffers, in order


class Pending(ABC):
    """The sends and receives of one `Transport.start` call, in flight."""

    @abstractmethod
    def wait(self) -> None:
        """Block until every buffer of the call has been sent or received."""


class Works(Pending):
    """torch.distributed works (isend/irecv), waited in order."""

    def __init__(self, works: list):
        self._works = works

    def wait(self) -> None:
        for work in self._works:
            work.wait()


class Done(Pending):
    """A call that had nothing left to do when `start` returned."""

    def wait(self) -> None:
        return None


class Transport(ABC):
    """Moves contiguous uint8 buffers between the devices (ranks 0..world_size-1) of one group."""

    # Outstanding `start` calls allowed: two let an executor keep the next bucket on the wire
    # while it finishes the previous one, so the link never waits for this device's copies.
    max_in_flight: int = 2

    def __init__(self, rank: int, world_size: int, device: torch.device):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside a transport group of world_size={world_size}")
        self.rank = rank
        self.world_size = world_size
        self.device = device  # where buffers must live (cpu for gloo, this rank's GPU for nccl/ipc)

    @abstractmethod
    def _start(self, sends: Buffers, recvs: Buffers) -> Pending:
        """Post the checked sends and receives (see `start`)."""

    def start(self, sends: Buffers, recvs: Buffers) -> Pending:
        """Send the buffers `sends[peer]` to each peer, receive into `recvs[peer]` from each peer.

        The i-th buffer one device sends to a peer lands in the i-th buffer that peer receives from
        it; both must have the same size. Every device that appears as a peer must make the
        matching call (same bucket); devices with nothing to do in a bucket may skip it.
        """
        for what, buffers in (("send", sends), ("recv", recvs)):
            for peer, buf in ((peer, buf) for peer, bufs in buffers.items() for buf in bufs):
                if not 0 <= peer < self.world_size or peer == self.rank:
                    raise ValueError(
                        f"{type(self).__name__} on rank {self.rank}: {what} peer {peer} must be another "
                        f"rank of the group (0..{self.world_size - 1})"
                    )
                if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
                    raise ValueError(
                        f"{type(self).__name__}: {what} buffer for peer {peer} is {buf.dtype} "
                        f"{tuple(buf.shape)}; pass a contiguous 1-D uint8 tensor (tensor.view(torch.uint8))"
                    )
                if buf.device != self.device:
                    raise ValueError(
                        f"{type(self).__name__}: {what} buffer for peer {peer} is on {buf.device}, "
                        f"this transport moves buffers on {self.device}"
                    )
        return self._start(sends, recvs)

    def exchange(self, sends: Buffers, recvs: Buffers) -> None:
        """`start` and wait."""
        self.start(sends, recvs).wait()

    def close(self) -> None:
        """Release what the transport holds (shared memory, groups it made); idempotent."""
        return None
