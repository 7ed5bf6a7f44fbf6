"""ResourcePool: the devices of one named pool, reserved as one Ray placement group.

Each worker (rank) of the pool gets one bundle of {CPU: cpus_per_worker, GPU: gpus_per_worker}.
Reserving the bundles up front means a group either gets all its ranks or waits with a clear
message, instead of half its workers starting and blocking in rendezvous. PACK keeps the ranks on
as few nodes as possible (fast collectives, shared-memory object transfer).
"""

from __future__ import annotations

import uuid

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from tidal.config.schema import PoolConfig


class ResourcePool:
    def __init__(self, name: str, config: PoolConfig, strategy: str = "PACK"):
        self.name = name
        self.config = config
        self._check_cluster_can_hold()
        self.placement_group: PlacementGroup | None = placement_group(
            self.bundles, strategy=strategy, name=f"tidal-{name}-{uuid.uuid4().hex[:8]}"
        )

    @property
    def num_workers(self) -> int:
        return self.config.num_workers

    @property
    def cpus_per_worker(self) -> float:
        return self.config.cpus_per_worker

    @property
    def gpus_per_worker(self) -> float:
        return self.config.gpus_per_worker

    @property
    def bundles(self) -> list[dict[str, float]]:
        bundle = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker > 0:  # Ray rejects zero-valued bundle entries
            bundle["GPU"] = self.gpus_per_worker
        return [dict(bundle) for _ in range(self.num_workers)]

    def ready(self, timeout_s: float = 120.0) -> None:
        """Block until every bundle is reserved; explain what is missing if that does not happen."""
        pg = self._placement_group()
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as err:
            raise TimeoutError(
                f"resource pool {self.name!r} ({self.num_workers} x {self.bundles[0]}) was not placed "
                f"within {timeout_s:.0f} s; the cluster has {ray.available_resources()} free of "
                f"{ray.cluster_resources()}. Other pools or jobs may hold the rest: shrink "
                f"resources.pools.{self.name} or free resources"
            ) from err

    def remove(self) -> None:
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    def _placement_group(self) -> PlacementGroup:
        if self.placement_group is None:
            raise RuntimeError(f"resource pool {self.name!r} was removed")
        return self.placement_group

    def _check_cluster_can_hold(self) -> None:
        """Fail at once, naming the config field, when the whole cluster is too small for the pool."""
        total = ray.cluster_resources()
        for resource, per_worker in self.bundles[0].items():
            need, have = per_worker * self.num_workers, total.get(resource, 0.0)  # absent resource = none
            if need > have:
                field = "cpus_per_worker" if resource == "CPU" else "gpus_per_worker"
                raise ValueError(
                    f"resources.pools.{self.name} needs {need:g} {resource} (num_workers={self.num_workers} x "
                    f"{field}={per_worker:g}) but the Ray cluster has {have:g}; lower num_workers or {field}, "
                    f"or start Ray with more {resource}"
                )
