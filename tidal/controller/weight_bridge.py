"""WeightBridge: a role's weights from a trainer pool into an engine role on another pool.

    bridge = WeightBridge(actor_group, "actor", rollout_group, "rollout", cfg)
    metrics = bridge.sync(version=step)   # every rollout rank now serves the actor's weights
    bridge.close()

Two ways to move them (`method`), both calling every rank of both pools at once:
- "reshard" (the fast path): the pools' workers join one bridge group at construction (trainer
  ranks first, gloo on CPU, NCCL on GPU; tidal/resharding/bridge_group.py); a sync runs the
  resharder over it (tidal/resharding/disaggregated.py): each trainer rank sends its own FSDP
  shards, no gather, and each engine rank receives its full replica straight into its
  parameters. Every byte an engine rank needs crosses the wire once (the plan's lower bound).
- "gather" (the reference): the trainer gathers full tensors (a collective of its pool), rank 0
  ships them through the Ray object store, and every engine rank copies them in by name.

A sync that fails or runs out of time leaves the other side's calls blocked (until the group's
timeout) and queued: the bridge refuses further syncs; close it and build a new one.
"""

from __future__ import annotations

import datetime
import time
import uuid
from typing import TYPE_CHECKING, Literal

import ray
import torch.distributed as dist

from tidal.config.schema import JobConfig
from tidal.controller.worker_group import WorkerGroup
from tidal.resharding.bridge_group import begun_key

if TYPE_CHECKING:
    from tidal.controller.cluster import Cluster

Method = Literal["reshard", "gather"]
METHODS = ("reshard", "gather")


class WeightBridge:
    """Moves `src_role`'s weights (on `src_group`) into `dst_role` (on `dst_group`).

    timeout_s bounds joining the bridge group here and each operation of the group afterwards (a
    rank waiting on a peer that never comes fails after it); cfg.rollout.weight_sync gives the
    bucket size and the verify option.
    """

    def __init__(
        self,
        src_group: WorkerGroup,
        src_role: str,
        dst_group: WorkerGroup,
        dst_role: str,
        cfg: JobConfig,
        *,
        method: Method = "reshard",
        timeout_s: float = 300.0,
    ):
        if method not in METHODS:
            raise ValueError(f"WeightBridge method={method!r} is not one of {METHODS}")
        if src_group is dst_group:
            raise ValueError(
                f"WeightBridge joins two pools, but source and target are both pool {src_group.pool.name!r}; "
                "roles of one pool sync in process: group.hand_over_weights(src_role, dst_role, version)"
            )
        if src_group.device != dst_group.device:
            raise ValueError(
                f"pool {src_group.pool.name!r} runs on {src_group.device} and pool {dst_group.pool.name!r} "
                f"on {dst_group.device}; a bridge moves weights between pools on the same kind of device"
            )
        if timeout_s <= 0:
            raise ValueError(f"WeightBridge timeout_s={timeout_s} must be > 0")
        src_group.role(src_role), dst_group.role(dst_role)  # raise, naming the roles, if absent
        self.src_group, self.src_role = src_group, src_role
        self.dst_group, self.dst_role = dst_group, dst_role
        self.method = method
        self.timeout_s = timeout_s
        self.name = f"{src_role}->{dst_role}-{uuid.uuid4().hex[:8]}"
        self._broken: str | None = None
        self._joined = False
        self._store: dist.TCPStore | None = None  # a client of the bridge's store (reshard)
        if method == "reshard":
            sync = cfg.rollout.weight_sync
            try:
                self._join(int(sync.bucket_mb * (1 << 20)), sync.verify)
            except BaseException:
                self._release_after_failed_join()
                raise

    # ------------------------------------------------------------------ sync
    def sync(self, version: int, timeout_s: float = 300.0) -> dict[str, float]:
        """Move the weights; every engine rank serves `version` next. Returns `weight_sync/` metrics:
        bytes (over the wire, all ranks), seconds (this call), reshard_s (the slowest rank's
        executor), send_s / receive_s (the slowest rank of each side's whole call), and the first
        engine rank's breakdown (wait_s, unpack_s, ...)."""
        if self._broken is not None:
            raise RuntimeError(
                f"WeightBridge {self.name} is unusable: {self._broken}; close it and build a new one"
            )
        start = time.perf_counter()
        if self.method == "reshard":
            senders = [
                w.send_weights.remote(self.name, self.src_role, version) for w in self.src_group.workers
            ]
            receivers = [
                w.receive_weights.remote(self.name, self.dst_role, version) for w in self.dst_group.workers
            ]
        else:
            senders = [w.gather_weights.remote(self.src_role) for w in self.src_group.workers]
            receivers = [  # Ray hands each rank rank 0's full tensors once they exist
                w.load_full_weights.remote(self.dst_role, senders[0], version) for w in self.dst_group.workers
            ]
        self._wait(senders, receivers, f"syncing version {version}", timeout_s, version)
        sent = ray.get(senders) if self.method == "reshard" else []  # gather: the weights themselves
        return _metrics(sent, ray.get(receivers), version, time.perf_counter() - start)

    def close(self, timeout_s: float = 60.0) -> None:
        """Every rank leaves the bridge group; idempotent. A rank still busy with a failed sync
        leaves once that call ends (the group's timeout bounds it); one that died has nothing to
        release. Waits at most `timeout_s`, then raises TimeoutError naming the ranks still busy."""
        self._broken = self._broken or "it is closed"
        if not self._joined:
            return
        self._joined = False
        self._store = None
        workers = self.src_group.workers + self.dst_group.workers
        refs = {w.bridge_close.remote(self.name): name for w, name in zip(workers, self._rank_names())}
        ready, busy = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                pass  # a dead worker holds no group any more
        if busy:
            raise TimeoutError(
                f"WeightBridge {self.name}: {', '.join(refs[ref] for ref in busy)} did not leave the "
                f"bridge within {timeout_s:g} s (still busy with an earlier call)"
            )

    # ------------------------------------------------------------------ helpers
    def _join(self, bucket_bytes: int, verify: bool) -> None:
        workers = self.src_group.workers + self.dst_group.workers
        world, num_src = len(workers), self.src_group.world_size
        store = self.src_group.workers[0].bridge_store.remote(self.name, world, self.timeout_s)
        self._wait([store], [], "opening the bridge's store", self.timeout_s)
        host, port = ray.get(store)
        self._store = _store_client(host, port)
        self._joined = True  # from here on, close() has something to release
        refs = [
            w.bridge_init.remote(
                self.name, host, port, rank, world, num_src, self.timeout_s, bucket_bytes, verify
            )
            for rank, w in enumerate(workers)
        ]
        self._wait(refs[:num_src], refs[num_src:], "joining the bridge group", self.timeout_s)

    def _release_after_failed_join(self) -> None:
        """Let the ranks that did join leave again, without hiding why the join failed."""
        try:
            self.close(timeout_s=self.timeout_s)
        except Exception:  # noqa: BLE001 (the join's own error is the one to raise)
            pass

    def _wait(
        self, senders: list, receivers: list, what: str, timeout_s: float, version: int | None = None
    ) -> None:
        """Wait for every call; raise the first failure at once, or name the ranks still busy at
        the deadline. Either leaves the bridge unusable (the other calls may still be running)."""
        labels = dict(zip(senders + receivers, self._rank_names(), strict=False))
        pending = list(labels)
        deadline = time.monotonic() + timeout_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                busy = [labels[ref] for ref in pending]
                self._broken = f"{', '.join(busy)} did not finish {what} within {timeout_s:g} s"
                if version is not None and self._store is not None:
                    self._broken += self._not_begun(
                        [i for i, ref in enumerate(labels) if ref in pending], version
                    )
                raise TimeoutError(f"WeightBridge {self.name}: {self._broken}")
            try:
                ray.get(ready)
            except Exception as exc:
                self._broken = f"{labels[ready[0]]} failed {what}"
                raise RuntimeError(f"WeightBridge {self.name}: {self._broken}: {exc}") from exc

    def _rank_names(self) -> list[str]:
        """'pool rank i (role)' of every bridge rank: the trainer's ranks, then the engine's."""
        return [
            f"{group.pool.name} rank {i} ({role})"
            for group, role in ((self.src_group, self.src_role), (self.dst_group, self.dst_role))
            for i in range(group.world_size)
        ]

    def _not_begun(self, busy: list[int], version: int) -> str:
        """Which of the busy bridge ranks never began `version` (the ranks that did wait on them)."""
        assert self._store is not None
        names = self._rank_names()
        late = []
        try:
            for rank in busy:
                key = begun_key(rank)
                if not self._store.check([key]) or int(self._store.get(key)) != version:
                    late.append(names[rank])
        except (RuntimeError, ValueError) as exc:  # the store's server (trainer rank 0) is gone
            return f"; which of them began is unknown ({exc})"
        if not late:
            return "; every one of them began (a slow or stuck transfer)"
        return f"; {', '.join(late)} never began it (busy with an earlier call?), the others wait on them"


def _store_client(host: str, port: int) -> dist.TCPStore | None:
    """A client of the bridge's store, read only to tell, after a timeout, which ranks never began
    the sync; None (no such detail in the error) where this process cannot reach the store."""
    try:
        return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=10))
    except RuntimeError:
        return None


def _metrics(
    sent: list[dict[str, float]], received: list[dict[str, float]], version: int, seconds: float
) -> dict[str, float]:
    first = received[0]
    out = {
        f"weight_sync/{key}": value for key, value in first.items() if key not in ("seconds", "bytes_sent")
    }
    out["weight_sync/bytes"] = sum(m["bytes_received"] for m in received)
    out["weight_sync/receive_s"] = max(m["seconds"] for m in received)
    if sent:
        out["weight_sync/send_s"] = max(m["seconds"] for m in sent)
        out["weight_sync/reshard_s"] = max(m["reshard_s"] for m in sent + received)
    out["weight_sync/seconds"] = seconds
    out["weight_sync/version"] = float(version)
    return out


def actor_to_rollout(cluster: Cluster, cfg: JobConfig) -> WeightBridge:
    """The bridge from the actor's pool to the rollout's (sync mode on two pools, streaming mode)."""
    return WeightBridge(cluster.group_of("actor"), "actor", cluster.group_of("rollout"), "rollout", cfg)
