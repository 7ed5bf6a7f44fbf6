"""One local Ray cluster for the whole test session, shared by every test under tests/ray.

Starting Ray costs ~5 s, so it happens once. num_cpus=4 on a 2-core machine is deliberate: the
tests need more logical slots than cores (several small groups at once), not more compute.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tidal.controller.ray_cluster import LocalCluster, start_local_cluster


@pytest.fixture(scope="session", autouse=True)
def ray_cluster() -> Iterator[LocalCluster]:
    cluster = start_local_cluster(num_cpus=4)
    yield cluster
    cluster.shutdown()
