"""The session's local cluster (started by conftest.py with start_local_cluster) listens on loopback only.

Only this test process's own descendants are inspected: Ray's GCS, raylet, agents, dashboard
and autoscaler processes and the workers, never other clusters on the machine.
"""

from __future__ import annotations

import ipaddress
import os

import psutil
import pytest
import ray

from tidal.controller.ray_cluster import LOOPBACK, NODE_IP_ENV, local_node_ip


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1, an IPv6 socket bound to the IPv4 loopback
    return addr.is_loopback


def _listening(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket of `pids`."""
    found = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue  # a worker that exited meanwhile
        found += [(pid, name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


@pytest.mark.skipif(
    os.environ.get(NODE_IP_ENV, "") not in ("", LOOPBACK, "localhost"), reason=f"${NODE_IP_ENV} opts out"
)
def test_local_cluster_listens_on_loopback_only() -> None:
    @ray.remote(num_cpus=0)
    def node_ip() -> str:
        return ray.util.get_node_ip_address()

    # A worker exists (and listens) and sees the node's address as loopback, as the resharding
    # and vLLM workers do when they pick a MASTER_ADDR.
    assert ray.get(node_ip.remote()) == LOOPBACK
    assert ray.get_runtime_context().gcs_address.startswith(f"{LOOPBACK}:")

    me = psutil.Process()
    pids = [me.pid, *(p.pid for p in me.children(recursive=True))]
    sockets = _listening(pids)
    names = {name for _, name, _, _ in sockets}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), sockets
    exposed = [s for s in sockets if not _is_loopback(s[2])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_node_ip_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, expected in [
        (None, LOOPBACK),
        ("", LOOPBACK),
        ("localhost", LOOPBACK),
        ("auto", None),
        ("0.0.0.0", None),
        ("10.1.2.3", "10.1.2.3"),
    ]:
        if value is None:
            monkeypatch.delenv(NODE_IP_ENV, raising=False)
        else:
            monkeypatch.setenv(NODE_IP_ENV, value)
        assert local_node_ip() == expected, value
