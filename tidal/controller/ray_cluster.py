"""Start or join the Ray cluster a job (or a test session) runs on.

Several Ray clusters may run on one machine (other jobs, other test sessions). So a local cluster
here always gets its own temp dir and Ray's own random ports, is started with an explicit
`address="local"` (never attaching to whatever cluster `ray.init()` would find), and is stopped by
`ray.shutdown()` from the process that started it, never by `ray stop`, which kills every Ray
process on the machine.

A local cluster listens on the loopback interface only (see `local_node_ip`): Ray's servers (GCS,
raylet, object manager, workers, dashboard agent, runtime-env agent, the autoscaler's and the
dashboard's Prometheus metrics) otherwise bind every interface, several of them on fixed ports
and the metrics ones answering without a token. $TIDAL_RAY_NODE_IP opts out for a local head
meant to be reached from other machines; docs/deployment.md says how to run on a real cluster.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ray

log = logging.getLogger(__name__)

# Ray puts unix sockets at <temp_dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store and a
# socket path may hold at most 107 bytes, which leaves about 40 for the temp dir itself.
MAX_TEMP_DIR_CHARS = 40

# Environment variable naming the node IP address of a local cluster this process starts: unset,
# empty, "127.0.0.1" or "localhost" = loopback only (the default); "auto" or "0.0.0.0" = Ray's own
# choice (the machine's primary address, every server on all interfaces); any other value = that
# address, advertised to other nodes (Ray's servers then bind all interfaces).
NODE_IP_ENV = "TIDAL_RAY_NODE_IP"
LOOPBACK = "127.0.0.1"


@dataclass
class LocalCluster:
    """A Ray cluster this process started. `shutdown()` stops it and removes its temp dir if we made it."""

    temp_dir: Path
    address: str
    remove_temp_dir: bool

    def shutdown(self) -> None:
        ray.shutdown()
        if self.remove_temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_cluster(
    num_cpus: float | None = None,
    *,
    num_gpus: int | None = None,
    temp_dir: str | Path | None = None,
    object_store_memory: int | None = None,
    runtime_env: dict | None = None,
) -> LocalCluster:
    """Start a fresh single-node cluster owned by this process (a job's or a test session's).

    `temp_dir` (logs, sockets, spilled objects) defaults to a new dir under /tmp, removed on
    shutdown. A `temp_dir` too long for Ray's socket paths is replaced by a short one, and a
    symlink at `temp_dir` points to it so the logs are still found where asked. `runtime_env` is
    Ray's job-level runtime environment (passed to `ray.init`).
    """
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; use ensure_ray() to join it")
    made_here = temp_dir is None
    actual = _short_temp_dir(Path(temp_dir).absolute() if temp_dir is not None else None)
    node_ip = local_node_ip()
    with _loopback_node(node_ip == LOOPBACK):
        ray.init(
            address="local",
            num_cpus=None if num_cpus is None else math.ceil(num_cpus),
            num_gpus=num_gpus,
            object_store_memory=object_store_memory,
            include_dashboard=False,  # no dashboard server (its host would default to loopback anyway)
            _node_ip_address=node_ip,
            _temp_dir=str(actual),
            runtime_env=runtime_env,
        )
    address = ray.get_runtime_context().gcs_address
    if node_ip == LOOPBACK and not address.startswith(f"{LOOPBACK}:"):
        log.warning(
            "asked Ray for a loopback-only cluster but its GCS is at %s: this Ray version may listen "
            "on every interface (see %s in tidal/controller/ray_cluster.py)",
            address,
            NODE_IP_ENV,
        )
    log.info("started local Ray cluster at %s (temp dir %s)", address, actual)
    return LocalCluster(temp_dir=actual, address=address, remove_temp_dir=made_here)


def ensure_ray(
    num_cpus: float | None = None,
    temp_dir: str | Path | None = None,
    address: str | None = None,
    *,
    runtime_env: dict | None = None,
) -> LocalCluster | None:
    """Use the cluster this process is connected to, else join `address` (or $RAY_ADDRESS, as set
    by `ray job submit`), else start a local one. Returns the LocalCluster only if one was started.

    `runtime_env` (Ray's job-level runtime environment, e.g. py_modules to ship to the workers) is
    passed to `ray.init` when this call joins or starts a cluster; a process already connected keeps
    the runtime env it was connected with."""
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
        log.info("joined Ray cluster at %s", address)
        return None
    return start_local_cluster(num_cpus, temp_dir=temp_dir, runtime_env=runtime_env)


def local_node_ip() -> str | None:
    """The node IP address of a local cluster this process starts, from $TIDAL_RAY_NODE_IP.

    LOOPBACK by default; None ("auto" or "0.0.0.0") lets Ray pick the machine's primary address;
    any other value is passed to Ray as the node's address.
    """
    value = os.environ.get(NODE_IP_ENV, "").strip()
    if value in ("", LOOPBACK, "localhost"):
        return LOOPBACK
    if value.lower() in ("auto", "0.0.0.0"):
        return None
    return value


@contextlib.contextmanager
def _loopback_node(loopback: bool) -> Iterator[None]:
    """While `ray.init` starts a local cluster, let its node address be 127.0.0.1.

    Ray 2.60 decides every bind address from the node's IP address: a loopback node IP makes GCS,
    raylet, workers, both agents and the two metrics servers bind 127.0.0.1 (or ::ffff:127.0.0.1),
    any other makes them bind all interfaces (GCS, raylet, workers on "::"; the dashboard agent's
    gRPC and metrics servers on 0.0.0.0; the autoscaler's and the dashboard's Prometheus servers
    on 0.0.0.0:44217 and 0.0.0.0:44227). But `ray.init(_node_ip_address="127.0.0.1")` rewrites a
    loopback address to the machine's primary IP (`services.resolve_ip_for_localhost`) unless
    `ray_constants.ENABLE_RAY_CLUSTER` is false, as it is on macOS and Windows and as the
    environment variable RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes it on Linux. That variable is
    read when ray is imported, so the constant itself is switched off for the duration of
    `ray.init` in this process (the driver), which is the only one that resolves the node address:
    Ray's own processes get the address on their command lines, and workers ask the node they
    belong to (`ray.util.get_node_ip_address()` returns 127.0.0.1 in them).
    """
    if not loopback:
        yield
        return
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _short_temp_dir(requested: Path | None) -> Path:
    if requested is not None and len(str(requested)) <= MAX_TEMP_DIR_CHARS:
        requested.mkdir(parents=True, exist_ok=True)
        return requested
    root = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    actual = Path(tempfile.mkdtemp(prefix="tidal-ray-", dir=root))
    if requested is not None:
        requested.parent.mkdir(parents=True, exist_ok=True)
        if requested.is_symlink():
            requested.unlink()  # left by an earlier run of this job
        if not requested.exists():
            requested.symlink_to(actual, target_is_directory=True)
        log.info("Ray temp dir %s is too long for Ray's socket paths; using %s", requested, actual)
    return actual
