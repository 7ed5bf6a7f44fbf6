"""DistributedBatch.materialize of a selected batch: only the selected columns leave the shards.

`cut="never"` (whole shards fetched, cut locally) is the reference for the values; with
`cut="always"` the caller's `ray.get` is watched to check that nothing but the selected columns
comes back to it. On this one-node cluster every shard is local, so `cut="auto"` fetches directly;
pretending to be on several nodes, it cuts the shards this process does not know to be here.
"""

from __future__ import annotations

import sys
import time

import pytest
import ray
import torch

from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch, Shard

pytestmark = pytest.mark.ray

# Ray workers cannot import this test module by name; ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def wide(n: int) -> Batch:
    return Batch.from_dict(
        {
            "x": torch.arange(n, dtype=torch.float32),
            "big": torch.randn(n, 4096, generator=torch.Generator().manual_seed(1)),
        },
        {"text": [f"row {i} " * 200 for i in range(n)], "uid": [f"u{i // 2}" for i in range(n)]},
    )


def narrow(n: int) -> Batch:
    return Batch.from_dict(
        {
            "y": -torch.arange(n, dtype=torch.float32),
            "huge": torch.randn(n, 8192, generator=torch.Generator().manual_seed(2)),
        }
    )


@pytest.fixture
def watched_get(monkeypatch):
    """Every value the caller fetches with ray.get (tasks run elsewhere and are not watched)."""
    seen: list = []
    real_get = ray.get

    def get(refs, *args, **kwargs):
        out = real_get(refs, *args, **kwargs)
        seen.extend(out if isinstance(refs, list) else [out])
        return out

    monkeypatch.setattr(ray, "get", get)
    return seen


def assert_same(a: Batch, b: Batch) -> None:
    assert sorted(a.keys()) == sorted(b.keys()) and len(a) == len(b)
    for key in a.keys():
        if key in a.tensors.keys():
            assert torch.equal(a[key], b[key]), key
        else:
            assert list(a[key]) == list(b[key]), key


@pytest.mark.parametrize("start,stop", [(0, 7), (0, 3), (2, 6), (5, 7), (3, 3), (7, 7)])
def test_selected_materialize_matches_the_whole_shard_path(start, stop):
    local = wide(7).union(narrow(7))
    both = DistributedBatch.from_batch(wide(7), 3).union(DistributedBatch.from_batch(narrow(7), 2))
    for keys in [("x", "y"), ("uid",), ("y", "text", "x")]:
        selected = both.select(*keys)
        got = selected.materialize(start, stop, cut="always")
        assert_same(got, selected.materialize(start, stop, cut="never"))
        assert_same(got, local.slice(start, stop).select(*keys))
        assert_same(selected.materialize(start, stop), got)  # auto
    # Unselected parts take the direct path, as before.
    assert_same(both.materialize(start, stop), local.slice(start, stop))


def test_only_the_selected_columns_are_fetched(watched_get):
    both = DistributedBatch.from_batch(wide(7), 3).union(DistributedBatch.from_batch(narrow(7), 2))
    got = both.select("x", "y").materialize(1, 6, cut="always")
    assert sorted(got.keys()) == ["x", "y"]
    fetched = [value for value in watched_get if isinstance(value, Batch)]
    assert len(fetched) == 2  # one cut per part, not one shard each
    assert all(set(b.keys()) <= {"x", "y"} and len(b) == 5 for b in fetched)
    watched_get.clear()
    both.select("x", "y").materialize(1, 6, cut="never")  # the reference path does pull whole shards
    assert {"big", "huge", "text"} <= {k for b in watched_get if isinstance(b, Batch) for k in b.keys()}


def test_optional_columns_and_errors():
    both = DistributedBatch.from_batch(wide(4), 2).union(DistributedBatch.from_batch(narrow(4), 1))
    got = both.select("x", optional=("y", "not_here")).fetch()
    assert sorted(got.keys()) == ["x", "y"]
    with pytest.raises(KeyError, match="not_here"):
        both.select("x", "not_here").fetch()
    wrong = DistributedBatch([[Shard(ray.put(wide(4)), 5)]])  # recorded with the wrong row count
    with pytest.raises(RuntimeError, match="holds 4 rows"):
        wrong.select("x").materialize(0, 5, cut="always")
    with pytest.raises(RuntimeError, match="holds 4 rows"):
        wrong.select("x").materialize(0, 5)
    with pytest.raises(RuntimeError, match="holds 4 rows"):
        wrong.materialize(0, 5)
    with pytest.raises(ValueError, match="cut must be"):
        both.materialize(0, 4, cut="sometimes")


@ray.remote(num_cpus=0)
def slow_wide(n: int, delay: float) -> Batch:
    time.sleep(delay)
    return wide(n)


def test_auto_fetches_local_shards_directly_and_cuts_the_others(watched_get, monkeypatch):
    from tidal.dataflow import distributed_batch

    local = DistributedBatch.from_batch(wide(6), 2).select("x", "uid")
    assert sorted(local.materialize(0, 6).keys()) == ["uid", "x"]
    assert any("big" in b.keys() for b in watched_get if isinstance(b, Batch))  # local: fetched whole
    watched_get.clear()
    pending = DistributedBatch.from_refs([slow_wide.remote(6, 1.0)], [6]).select("x")
    got = pending.materialize(1, 4)  # one node: whatever is made will be here, so fetched whole
    assert torch.equal(got["x"], torch.arange(1.0, 4.0))
    assert any("big" in b.keys() for b in watched_get if isinstance(b, Batch))
    watched_get.clear()
    # On a cluster of several nodes only what this process knows to be here (or small) is near:
    # an object not made yet is cut where it will be made.
    monkeypatch.setattr(distributed_batch, "_one_node", lambda: False)
    pending = DistributedBatch.from_refs([slow_wide.remote(6, 1.0)], [6]).select("x")
    got = pending.materialize(1, 4)
    assert torch.equal(got["x"], torch.arange(1.0, 4.0))
    assert all(b.keys() == ["x"] for b in watched_get if isinstance(b, Batch))
