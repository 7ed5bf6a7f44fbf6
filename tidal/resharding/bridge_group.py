"""A process group across the worker processes of two pools, beside each process's own world.

Every WorkerGroup is one torch.distributed world: each worker joined its pool's default group
(FSDP and the roles' collectives use it). A process joins one default group only, and
`dist.new_group` can only regroup ranks of that world, so a trainer pool and a rollout pool have
no group in common. `BridgeGroup` builds one outside torch.distributed's global state: the backend
objects (`ProcessGroupGloo`, plus `ProcessGroupNCCL` on GPUs) constructed directly on a TCPStore
that the first trainer rank serves. Nothing is registered with torch.distributed, so `dist.*` calls
do not know this group and the default group is left as it was; the group's users call its
methods instead: `all_gather_object` (the resharder's agreement on plan and placement), `post`
(the bridge transport's sends and receives), `barrier`.

Ranks are numbered trainer ranks first, then rollout ranks. Every wait is bounded: the backends
fail an operation that takes longer than `timeout`, and joining waits at most that long for peers.
"""

from __future__ import annotations

import datetime
import pickle
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist


class P2POp(NamedTuple):
    """One point-to-point message of a `BridgeGroup.post` call."""

    send: bool  # True: send `buf` to `peer`; False: receive `buf` from `peer`
    buf: torch.Tensor
    peer: int
    tag: int


def begun_key(rank: int) -> str:
    return f"begun/{rank}"


class BridgeGroup:
    """Rank `rank` of a group of `world_size` processes, on `store` (shared by all of them).

    On a CPU every operation runs on gloo. On a GPU the point-to-point messages run on NCCL
    (buffers on `device`) and the small object exchanges on gloo.
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        device: torch.device,
        timeout: datetime.timedelta,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"BridgeGroup rank={rank} is outside world_size={world_size}")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"BridgeGroup device={device} must be a cpu or cuda device")
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.timeout = timeout
        self.store = store
        # Constructing the gloo backend connects every pair of ranks: it returns once all joined.
        self.cpu = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", store), rank, world_size, timeout)
        self.p2p = self.cpu
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.p2p = dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", store), rank, world_size, options)
            # NCCL makes its communicator at the first operation; a first batch of sends and
            # receives that only some ranks join would hang, so make it a collective of all.
            warm = torch.zeros(1, device=device)
            self.p2p.allreduce([warm]).wait()
            torch.cuda.synchronize(device)

    @classmethod
    def join(
        cls,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        device: torch.device,
        timeout: datetime.timedelta,
        store: dist.Store | None = None,
    ) -> BridgeGroup:
        """Join through the store at host:port (`store`: the serving rank's own, already open)."""
        if store is None:
            store = dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        return cls(store, rank, world_size, device, timeout)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, by rank (pickled; the peers are this job's own workers)."""
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self.cpu.allgather([sizes], [torch.tensor([payload.numel()], dtype=torch.int64)]).wait()
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: payload.numel()] = payload
        out = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        self.cpu.allgather([out], [padded]).wait()
        return [pickle.loads(buf[: int(n)].numpy().tobytes()) for buf, n in zip(out, sizes, strict=True)]

    def mark_begun(self, version: int) -> None:
        """Record in the store that this rank has begun syncing `version` (one key per rank), so a
        controller whose sync timed out can tell the ranks that never began from those that wait."""
        self.store.set(begun_key(self.rank), str(version))

    def barrier(self) -> None:
        self.cpu.barrier().wait()

    def post(self, ops: Sequence[P2POp]) -> list[Any]:
        """Post every send and receive at once; returns the works to wait on.

        gloo runs each message on its own threads, so posting them all before any wait cannot
        deadlock. NCCL gets them as one coalesced group (as `dist.batch_isend_irecv` does): a
        device sending to several peers does not serialise them, nor can their order deadlock.
        """
        if self.device.type != "cuda":
            return [
                self.p2p.send([op.buf], op.peer, op.tag)
                if op.send
                else self.p2p.recv([op.buf], op.peer, op.tag)
                for op in ops
            ]
        # (A backend's own coalescing calls take no device: the ops' tensors name it.)
        self.p2p._start_coalescing()
        for op in ops:
            if op.send:
                self.p2p.send([op.buf], op.peer, op.tag)
            else:
                self.p2p.recv([op.buf], op.peer, op.tag)
        return [self.p2p._end_coalescing()]

    def close(self) -> None:
        """Release the backends (NCCL's communicator); idempotent."""
        if self.device.type == "cuda" and self.p2p is not self.cpu:
            self.p2p.shutdown()
        self.p2p = self.cpu
