"""Worker: the one Ray actor class. A process that hosts every role of one resource pool.

The WorkerGroup creates one Worker per bundle of its pool's placement group, then:
1. rank 0 opens the rendezvous store on a free port of its own node (`create_store`), so two
   groups, or two jobs on one machine, can never pick the same port;
2. every rank joins torch.distributed through that store and builds its roles in order (`setup`);
3. the controller calls role endpoints through `execute`, which turns object references and
   DistributedBatch arguments into this rank's local data before the role sees them.

Weights move between roles of one process (`hand_over_weights`, colocated), or between pools over a
bridge group that the controller's WeightBridge builds (`bridge_store`, `bridge_init`) and
drives (`send_weights` on the trainer pool, `receive_weights` on the engine pool); the reference
path beside it ships full tensors through the object store (`gather_weights`, `load_full_weights`).

Roles never know they run under Ray: they get plain Batches and a WorkerContext.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

import ray
import torch
import torch.distributed as dist

from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch
from tidal.resharding import disaggregated
from tidal.resharding.bridge_group import BridgeGroup
from tidal.resharding.colocated import hand_over
from tidal.workers.context import WorkerContext
from tidal.workers.endpoint import Collect, Dispatch, EndpointSpec, endpoint_spec

# How long ranks wait for each other to join the group (process start-up and imports included).
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=10)


class Worker:
    def __init__(self, rank: int, world_size: int, device: str, num_cpus: float):
        self.rank = rank
        self.world_size = world_size
        self.device_type = device
        self.num_cpus = num_cpus
        self.ctx: WorkerContext | None = None
        self._store: dist.TCPStore | None = None
        self._roles: dict[str, Any] = {}
        self._bridge_stores: dict[str, dist.TCPStore] = {}  # served by this rank, by bridge name
        self._bridges: dict[str, disaggregated.BridgeEnd] = {}

    # ------------------------------------------------------------------ start-up
    def create_store(self) -> tuple[str, int]:
        """Rank 0: listen on a port the OS picks (no probe-then-bind race) and return (host, port)."""
        if self.rank != 0:
            raise RuntimeError(f"create_store runs on rank 0, not rank {self.rank}")
        host = ray.util.get_node_ip_address()
        self._store = dist.TCPStore(
            host, 0, self.world_size, is_master=True, wait_for_workers=False, timeout=RENDEZVOUS_TIMEOUT
        )
        return host, self._store.port

    def setup(self, master_addr: str, master_port: int, roles: dict[str, type], cfg: Any) -> dict[str, Any]:
        """Join the group's torch.distributed world, then build each role as `role_cls(cfg, ctx)`."""
        # Ray reserves `num_cpus` logical CPUs for this process; more threads only fight the other ranks.
        torch.set_num_threads(max(1, int(self.num_cpus)))
        if self.device_type == "cuda":
            # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU(s), so ours is always index 0.
            torch.cuda.set_device(0)
            device = torch.device("cuda", 0)
            # Gloo next to NCCL: roles may all-reduce small CPU tensors (metrics) as well as CUDA ones.
            backend, pg_backend = "nccl", "cpu:gloo,cuda:nccl"
        else:
            device = torch.device("cpu")
            backend = pg_backend = "gloo"
        os.environ.update(
            {
                "RANK": str(self.rank),
                "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": "0",
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(master_port),
            }
        )
        store = self._store or dist.TCPStore(
            master_addr, master_port, self.world_size, is_master=False, timeout=RENDEZVOUS_TIMEOUT
        )
        dist.init_process_group(pg_backend, store=store, rank=self.rank, world_size=self.world_size)
        tp = model_parallel_size(cfg, set(roles))
        self.ctx = WorkerContext(
            rank=self.rank,
            world_size=self.world_size,
            dp_rank=self.rank // tp,
            dp_size=self.world_size // tp,
            device=device,
            backend=backend,
            tp_size=tp,
        )
        for name, role_cls in roles.items():
            self._roles[name] = role_cls(cfg, self.ctx)
        return self.info()

    def info(self) -> dict[str, Any]:
        ctx = self._context()
        return {
            "rank": ctx.rank,
            "dp_rank": ctx.dp_rank,
            "dp_size": ctx.dp_size,
            "is_collect_rank": ctx.is_collect_rank,
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),
        }

    def ping(self) -> int:
        return self.rank

    # ------------------------------------------------------------------ calls from the controller
    def execute(self, role_name: str, method: str, args: tuple, kwargs: dict[str, Any]) -> Any:
        """Run `role.method` on this rank's data. CONCAT endpoints return (batch, num_rows)."""
        role = self._role(role_name)
        spec = endpoint_spec(type(role), method)
        args, kwargs = self._resolve(spec, args, kwargs)
        result = getattr(role, method)(*args, **kwargs)
        if spec.collect is not Collect.CONCAT:
            return result
        if not self._context().is_collect_rank:
            return None, 0  # a replica of another rank's result: do not ship it
        if not isinstance(result, Batch):
            raise TypeError(
                f"{type(role).__name__}.{method} collects by CONCAT and must return a Batch, "
                f"got {type(result).__name__}"
            )
        return result, len(result)  # pickling a Batch moves its tensors to host memory

    def hand_over_weights(self, src_role: str, dst_role: str, version: int) -> dict[str, float]:
        """Colocated weight copy: `src.export_weights()` straight into `dst.load_weights`, in process."""
        src, dst = self._role(src_role), self._role(dst_role)
        return hand_over(src.export_weights(), dst.load_weights, version)

    # ------------------------------------------------------------------ weights between pools
    def bridge_store(self, name: str, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Serve the rendezvous of bridge `name` (this rank becomes its rank 0); return (host, port)."""
        if name in self._bridge_stores or name in self._bridges:
            raise ValueError(f"this worker already serves or joined a bridge named {name!r}; close it first")
        host = ray.util.get_node_ip_address()
        self._bridge_stores[name] = dist.TCPStore(
            host,
            0,
            world_size,
            is_master=True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        return host, self._bridge_stores[name].port

    def bridge_init(
        self,
        name: str,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        num_sources: int,
        timeout_s: float,
        bucket_bytes: int,
        verify: bool = False,
    ) -> None:
        """Join bridge `name` as its rank `rank` (trainer ranks first); returns once every rank has."""
        if name in self._bridges:
            raise ValueError(f"this worker already joined a bridge named {name!r}; close it first")
        device = self._context().device
        group = BridgeGroup.join(
            host,
            port,
            rank,
            world_size,
            device,
            datetime.timedelta(seconds=timeout_s),
            store=self._bridge_stores.get(name),
        )
        self._bridges[name] = disaggregated.BridgeEnd(group, num_sources, bucket_bytes, verify)

    def send_weights(self, name: str, src_role: str, version: int) -> dict[str, float]:
        """Send `src_role.export_weights()` (this rank's shards) over bridge `name`."""
        return self._bridge(name).send(self._role(src_role).export_weights(), version)

    def receive_weights(self, name: str, dst_role: str, version: int) -> dict[str, float]:
        """Receive weights over bridge `name` into `dst_role`'s engine, which serves `version` next."""
        ctx = self._context()
        write_weights = self._write_weights(dst_role)
        weight_layout = getattr(self._role(dst_role), "weight_layout", None)  # None: a full replica per rank
        layout = weight_layout() if callable(weight_layout) else None
        # every rank of the engine's pool receives its own share of the engine's layout
        return self._bridge(name).receive(write_weights, version, ctx.rank, ctx.world_size, layout)

    def bridge_close(self, name: str) -> None:
        """Leave bridge `name` (and stop serving its store); idempotent."""
        bridge = self._bridges.pop(name, None)
        if bridge is not None:
            bridge.close()
        self._bridge_stores.pop(name, None)

    def gather_weights(self, src_role: str) -> dict[str, torch.Tensor] | None:
        """Reference path: full tensors of `src_role` (a collective of the pool), kept on rank 0."""
        source = self._role(src_role).export_weights()
        return disaggregated.gather_full(source, keep=self._context().rank == 0)

    def load_full_weights(
        self, dst_role: str, weights: dict[str, torch.Tensor], version: int
    ) -> dict[str, float]:
        """Reference path: copy full tensors (from `gather_weights`) into `dst_role`'s engine."""
        return disaggregated.load_full(self._write_weights(dst_role), weights, version)

    # ------------------------------------------------------------------ helpers
    def _write_weights(self, role_name: str) -> disaggregated.WriteWeights:
        """The engine role's `write_weights(write, version)`: `write` fills its parameters in place
        while generation is paused (RolloutRole.write_weights)."""
        role = self._role(role_name)
        if not callable(getattr(role, "write_weights", None)):
            raise TypeError(
                f"role {role_name!r} ({type(role).__name__}) has no write_weights(write, version); weights "
                "arriving from another pool are written through it (see RolloutRole.write_weights)"
            )
        return role.write_weights

    def _bridge(self, name: str) -> disaggregated.BridgeEnd:
        if name not in self._bridges:
            raise ValueError(f"this worker joined no bridge {name!r}; it joined {sorted(self._bridges)}")
        return self._bridges[name]

    def _context(self) -> WorkerContext:
        if self.ctx is None:
            raise RuntimeError("worker is not set up; WorkerGroup calls setup() before any endpoint")
        return self.ctx

    def _role(self, name: str) -> Any:
        if name not in self._roles:
            raise ValueError(f"this worker hosts no role {name!r}; it hosts {sorted(self._roles)}")
        return self._roles[name]

    def _resolve(
        self, spec: EndpointSpec, args: tuple, kwargs: dict[str, Any]
    ) -> tuple[tuple, dict[str, Any]]:
        """Fetch object references (one ray.get for all) and cut DistributedBatches to this rank's rows."""
        values = list(args) + list(kwargs.values())
        ref_pos = [i for i, v in enumerate(values) if isinstance(v, ray.ObjectRef)]
        for i, value in zip(ref_pos, ray.get([values[i] for i in ref_pos])):
            values[i] = value
        for i, value in enumerate(values):
            if isinstance(value, DistributedBatch):
                if spec.dispatch is Dispatch.DP_SPLIT:
                    ctx = self._context()
                    values[i] = value.materialize(*value.row_ranges(ctx.dp_size)[ctx.dp_rank])
                else:
                    values[i] = value.fetch()
        return tuple(values[: len(args)]), dict(zip(kwargs, values[len(args) :]))


def model_parallel_size(cfg: Any, roles: set[str]) -> int:
    """Ranks per model replica in a pool running `roles`: a tensor-parallel rollout engine on a pool of
    its own (the config allows tensor parallelism nowhere else), 1 otherwise."""
    if roles != {"rollout"} or not hasattr(cfg, "rollout"):
        return 1
    from tidal.config.rollout_backend import tensor_parallel_size

    return tensor_parallel_size(cfg.rollout.backend)[1]
