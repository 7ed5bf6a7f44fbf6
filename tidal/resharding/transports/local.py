"""In-process transport: devices are threads (or one caller) of one process, the wire is a memory copy.

Used when the "devices" of a plan live in one Python process: a single process holding both the
trainer and the engine (world size 1, where every rectangle is a local copy and nothing is ever
exchanged), or several simulated devices driven by threads, which is how the executor is tested
without a process group. A `LocalHub` is the shared mailbox; `hub.transport(rank)` is rank's end.

A send is not copied when posted: the receiver copies straight out of the sender's buffer, and the
sender's `wait` returns only once every receiver has done so (so it may then reuse the buffer).
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque

import torch

from tidal.resharding.transports.base import Buffers, Pending, Transport

_TIMEOUT_S = 300.0


class _Message:
    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.consumed = threading.Event()


class LocalHub:
    """The mailboxes of `world_size` in-process devices: one FIFO per (sender, receiver) pair."""

    def __init__(self, world_size: int, timeout_s: float = _TIMEOUT_S):
        if world_size < 1:
            raise ValueError(f"LocalHub world_size={world_size} must be >= 1")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._boxes: defaultdict[tuple[int, int], deque[_Message]] = defaultdict(deque)

    def transport(self, rank: int, device: torch.device | str = "cpu") -> LocalTransport:
        return LocalTransport(self, rank, torch.device(device))

    def _post(self, src: int, dst: int, buf: torch.Tensor) -> _Message:
        msg = _Message(buf)
        with self._cond:
            self._boxes[(src, dst)].append(msg)
            self._cond.notify_all()
        return msg

    def _take(self, src: int, dst: int) -> _Message:
        with self._cond:
            box = self._boxes[(src, dst)]
            if not self._cond.wait_for(lambda: len(box) > 0, timeout=self.timeout_s):
                raise TimeoutError(
                    f"LocalTransport rank {dst}: nothing from rank {src} after {self.timeout_s} s; "
                    "every device must run the same plan (same buckets, in the same order)"
                )
            return box.popleft()


class _LocalPending(Pending):
    def __init__(self, transport: LocalTransport, sent: list[_Message], recvs: Buffers):
        self._transport = transport
        self._sent = sent
        self._recvs = [(peer, buf) for peer, bufs in recvs.items() for buf in bufs]

    def wait(self) -> None:
        hub, rank = self._transport.hub, self._transport.rank
        for peer, buf in self._recvs:  # per pair in posting order: the mailboxes are FIFO
            msg = hub._take(peer, rank)
            if msg.buf.numel() != buf.numel():
                msg.consumed.set()  # let the sender go; the error is raised here
                raise RuntimeError(
                    f"LocalTransport rank {rank}: rank {peer} sent {msg.buf.numel()} bytes, "
                    f"{buf.numel()} expected; the two devices run different plans"
                )
            buf.copy_(msg.buf)
            msg.consumed.set()
        for msg in self._sent:
            if not msg.consumed.wait(timeout=hub.timeout_s):
                raise TimeoutError(
                    f"LocalTransport rank {rank}: a send was not received in {hub.timeout_s} s"
                )


class LocalTransport(Transport):
    """Rank `rank` of a `LocalHub`; `LocalTransport.single()` is a world of one (local copies only)."""

    def __init__(self, hub: LocalHub, rank: int, device: torch.device):
        super().__init__(rank, hub.world_size, device)
        self.hub = hub

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> LocalTransport:
        return LocalHub(1).transport(0, device)

    def _start(self, sends: Buffers, recvs: Buffers) -> Pending:
        sent = [self.hub._post(self.rank, peer, buf) for peer, bufs in sends.items() for buf in bufs]
        return _LocalPending(self, sent, recvs)
