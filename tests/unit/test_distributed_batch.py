"""Row-range math and metadata of DistributedBatch, without a Ray cluster.

Fetching shards needs Ray and is covered in tests/ray/test_worker_group.py. Here the object
references are nil refs: nothing is ever fetched, only counted and routed.
"""

from __future__ import annotations

import pytest
import ray
import torch
from hypothesis import given
from hypothesis import strategies as st

from tidal.dataflow.batch import Batch
from tidal.dataflow.distributed_batch import DistributedBatch, Shard, row_ranges, shard_spans


def nil_batch(*shard_rows: int) -> DistributedBatch:
    return DistributedBatch([[Shard(ray.ObjectRef.nil(), n) for n in shard_rows]])


@given(st.integers(0, 50), st.integers(1, 9))
def test_row_ranges_match_batch_split(num_rows, num_chunks):
    batch = Batch.from_dict({"x": torch.arange(num_rows)})
    expected, start = [], 0
    for share in batch.split(num_chunks):
        expected.append((start, start + len(share)))
        start += len(share)
    assert row_ranges(num_rows, num_chunks) == expected


def test_row_ranges_examples():
    assert row_ranges(7, 2) == [(0, 4), (4, 7)]
    assert row_ranges(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert row_ranges(1, 2) == [(0, 1), (1, 1)]  # the second rank gets an empty share
    assert row_ranges(0, 2) == [(0, 0), (0, 0)]


@given(st.lists(st.integers(0, 6), min_size=1, max_size=6), st.data())
def test_shard_spans_cover_exactly_the_range_in_order(sizes, data):
    total = sum(sizes)
    start = data.draw(st.integers(0, total))
    stop = data.draw(st.integers(start, total))
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    spans = shard_spans(sizes, start, stop)
    covered = [offsets[i] + j for i, lo, hi in spans for j in range(lo, hi)]
    assert covered == list(range(start, stop))
    for i, lo, hi in spans:
        assert 0 <= lo <= hi <= sizes[i]
    if start == stop:  # one (empty) span, so the result keeps the columns of a real shard
        assert len(spans) == 1 and spans[0][1] == spans[0][2]
    else:
        assert all(lo < hi for _, lo, hi in spans)  # no shard fetched for nothing


def test_empty_range_prefers_a_zero_row_shard():
    # A shard with no rows at the position costs nothing to fetch.
    assert shard_spans([1, 0], 1, 1) == [(1, 0, 0)]
    assert shard_spans([3, 2, 2], 3, 3) == [(1, 0, 0)]
    assert shard_spans([4, 3], 7, 7) == [(1, 3, 3)]


def test_shard_spans_rejects_bad_ranges():
    with pytest.raises(ValueError, match="outside"):
        shard_spans([2, 2], 1, 5)
    with pytest.raises(ValueError, match="outside"):
        shard_spans([2, 2], 3, 2)
    with pytest.raises(ValueError, match="at least one shard"):
        shard_spans([], 0, 0)


def test_union_is_metadata_only_and_checks_rows():
    a, b = nil_batch(4, 3), nil_batch(3, 2, 2)
    both = a.union(b)
    assert len(both) == 7 and [[s.num_rows for s in p] for p in both.parts] == [[4, 3], [3, 2, 2]]
    assert both.row_ranges(3) == [(0, 3), (3, 5), (5, 7)]
    with pytest.raises(ValueError, match="7 and 5"):
        a.union(nil_batch(5))
    with pytest.raises(ValueError, match="same number of rows"):
        DistributedBatch([[Shard(ray.ObjectRef.nil(), 2)], [Shard(ray.ObjectRef.nil(), 3)]])
    with pytest.raises(ValueError, match="at least one shard"):
        DistributedBatch([[]])


def test_shards_unpack_as_ref_and_rows():
    ((ref, num_rows),) = nil_batch(5).parts[0]
    assert num_rows == 5 and ref.is_nil()


def test_select_narrows_each_part_lazily():
    both = nil_batch(4).union(nil_batch(4)).select("x", "y")
    assert both.part_keys == [("x", "y"), ("x", "y")] and both.required == ("x", "y")
    narrower = both.select("y")
    assert narrower.part_keys == [("y",), ("y",)]
    gone = both.select("z")  # dropped earlier: the error comes when the rows are materialised
    assert gone.part_keys == [(), ()] and gone.required == ("z",)
    mixed = both.select("x").union(nil_batch(4))
    assert mixed.part_keys == [("x",), ("x",), None]


def test_select_optional_keys_are_kept_where_present_but_not_required():
    both = nil_batch(4).union(nil_batch(4).select("y"))
    picked = both.select("x", optional=("y", "z"))
    assert picked.part_keys == [("x", "y", "z"), ("y",)] and picked.required == ("x",)
