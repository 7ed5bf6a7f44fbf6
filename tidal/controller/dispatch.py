"""Dispatch and collect: how one endpoint call becomes per-rank calls, and their results one value.

Dispatch (declared on the role method, see tidal.workers.endpoint):
- ALL: every rank gets the same arguments; a local Batch is put in the object store once.
- DP_SPLIT: a local Batch is split on the driver (`Batch.split(dp_size)`, uneven, possibly empty
  shares) and each share put once; a DistributedBatch is sent as a descriptor and each rank
  fetches just its own rows (`Worker._resolve`). Ranks of one data-parallel replica get one share.
- RANK_ZERO: only rank 0 runs.
Collect:
- CONCAT: each collect rank returns (batch, num_rows) as two objects; the driver waits for the row
  counts only and returns a DistributedBatch of the batch references, in data-parallel order.
- FIRST / LIST: small results (metrics, paths) are fetched.

The driver waits on results with `ray.wait`, so when one rank fails the error surfaces at once even
while the other ranks sit in a collective waiting for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch, Shard
from tidal.workers.endpoint import Collect, Dispatch, EndpointSpec


@dataclass(frozen=True)
class RankInfo:
    """Where a rank sits in its group, as reported by the worker after setup."""

    rank: int
    dp_rank: int
    dp_size: int
    is_collect_rank: bool
    pid: int
    node_ip: str


def running_ranks(spec: EndpointSpec, ranks: Sequence[RankInfo]) -> list[RankInfo]:
    return [r for r in ranks if r.rank == 0] if spec.dispatch is Dispatch.RANK_ZERO else list(ranks)


def dispatch_args(
    spec: EndpointSpec, args: tuple, kwargs: dict[str, Any], ranks: Sequence[RankInfo]
) -> list[tuple[tuple, dict[str, Any]]]:
    """(args, kwargs) for each rank in `ranks`. Batches become object references, put once each."""
    dp_size = ranks[0].dp_size
    names = list(kwargs)
    values = list(args) + [kwargs[k] for k in names]
    per_value: list[Callable[[RankInfo], Any]] = []
    for value in values:
        if isinstance(value, Batch) and spec.dispatch is Dispatch.DP_SPLIT:
            shares = [ray.put(share) for share in value.split(dp_size)]
            per_value.append(lambda r, shares=shares: shares[r.dp_rank])
        elif isinstance(value, Batch):
            ref = ray.put(value)
            per_value.append(lambda r, ref=ref: ref)
        else:  # DistributedBatch descriptors and plain values go as they are
            per_value.append(lambda r, value=value: value)
    out = []
    for r in ranks:
        resolved = [pick(r) for pick in per_value]
        out.append((tuple(resolved[: len(args)]), dict(zip(names, resolved[len(args) :]))))
    return out


def wait_all(refs: Sequence[ray.ObjectRef]) -> list[Any]:
    """ray.get of small results, raising the first failure as soon as it happens."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(list(refs))


@dataclass
class PendingCall:
    """An endpoint call in flight. `result()` waits and collects; the refs stay usable meanwhile."""

    spec: EndpointSpec
    ranks: list[RankInfo]
    refs: list[Any]  # one per rank in `ranks`: an ObjectRef, or (batch ref, num_rows ref) for CONCAT
    label: str

    def result(self) -> Any:
        if self.spec.collect is Collect.CONCAT:
            counts = wait_all([num_rows for _, num_rows in self.refs])
            shards = sorted(
                (
                    (r.dp_rank, Shard(batch_ref, n))
                    for r, (batch_ref, _), n in zip(self.ranks, self.refs, counts)
                    if r.is_collect_rank
                ),
                key=lambda item: item[0],
            )
            dp_ranks = [dp for dp, _ in shards]
            assert dp_ranks == sorted(set(dp_ranks)), f"{self.label}: duplicate collect ranks {dp_ranks}"
            return DistributedBatch([[shard for _, shard in shards]])
        results = wait_all(self.refs)
        return results[0] if self.spec.collect is Collect.FIRST else results


# --------------------------------------------------------------------------- driver-side tasks


@ray.remote(num_cpus=0)
def _run_on_batch(fn: Callable[..., Any], batch: DistributedBatch, args: tuple) -> tuple[Batch, int, Any]:
    out = fn(batch.fetch(), *args)
    rows, extra = (out, None) if isinstance(out, Batch) else (out[0], tuple(out[1:]))
    if not isinstance(rows, Batch):
        raise TypeError(
            f"run_task: {fn.__name__} must return a Batch or (Batch, ...), got {type(out).__name__}"
        )
    return rows, len(rows), extra


def run_task(fn: Callable[..., Any], batch: DistributedBatch | Batch, *args: Any) -> Any:
    """Run `fn(batch, *args)` in a Ray task on the whole batch, without fetching it to the driver.

    `fn` returns a Batch (-> a DistributedBatch here) or a tuple (Batch, small values...) (-> the
    same tuple with the Batch kept as a DistributedBatch and the small values fetched). The task
    asks for no CPU: it is short, and pools may have reserved every CPU in placement groups.
    """
    if isinstance(batch, Batch):
        batch = DistributedBatch.from_batch(batch)
    rows_ref, num_rows_ref, extra_ref = _run_on_batch.options(num_returns=3).remote(fn, batch, args)
    num_rows, extra = wait_all([num_rows_ref, extra_ref])
    rows = DistributedBatch.from_refs([rows_ref], [num_rows])
    return rows if extra is None else (rows, *extra)
