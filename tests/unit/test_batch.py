import pickle

import numpy as np
import pytest
import torch

from tidal.dataflow.batch import Batch, even_split_sizes


def make(n: int = 5) -> Batch:
    return Batch.from_dict(
        {"x": torch.arange(2 * n).view(n, 2), "h": torch.randn(n, 3, dtype=torch.bfloat16)},
        {"uid": [f"u{i}" for i in range(n)]},
        {"version": 3},
    )


def test_split_is_uneven_and_concat_inverts_it():
    b = make(7)
    parts = b.split(3)
    assert [len(p) for p in parts] == [3, 2, 2]
    back = Batch.concat(parts)
    assert torch.equal(back["x"], b["x"]) and list(back["uid"]) == list(b["uid"])
    assert [len(p) for p in make(1).split(2)] == [1, 0]


def test_even_split_sizes_rules():
    assert even_split_sizes(10, 4) == [3, 3, 2, 2]
    assert sum(even_split_sizes(123, 7)) == 123
    with pytest.raises(ValueError):
        even_split_sizes(3, 0)


def test_repeat_interleaved_and_tiled():
    b = make(2)
    assert list(b.repeat(3)["uid"]) == ["u0", "u0", "u0", "u1", "u1", "u1"]
    assert list(b.repeat(2, interleave=False)["uid"]) == ["u0", "u1", "u0", "u1"]
    assert torch.equal(b.repeat(2)["x"][1], b["x"][0])


def test_select_union_reorder_chunk():
    b = make(4)
    u = b.select("x").union(b.select("h", "uid"))
    assert set(u.keys()) == {"x", "h", "uid"}
    with pytest.raises(ValueError):
        b.select("x").union(make(3).select("h"))
    r = b.reorder([3, 1, 0, 2])
    assert list(r["uid"]) == ["u3", "u1", "u0", "u2"] and torch.equal(r["x"][0], b["x"][3])
    assert [len(c) for c in b.chunk(3)] == [3, 1]
    with pytest.raises(KeyError):
        b.select("missing")


def test_union_rejects_misaligned_shared_columns():
    b = make(3)
    with pytest.raises(ValueError, match="differs"):
        b.union(b.reorder([2, 1, 0]))


def test_pickle_roundtrip_is_numpy_backed_and_exact():
    b = make(4)
    state = b.__getstate__()
    assert all(isinstance(a, np.ndarray) for a in state["arrays"].values())
    c = pickle.loads(pickle.dumps(b))
    assert torch.equal(c["x"], b["x"]) and c["h"].dtype == torch.bfloat16 and torch.equal(c["h"], b["h"])
    assert c.meta == {"version": 3} and list(c["uid"]) == list(b["uid"])


def test_mismatched_rows_are_rejected():
    with pytest.raises(ValueError, match="disagree"):
        Batch.from_dict({"x": torch.zeros(3)}, {"uid": ["a"]})
    b = make(2)
    with pytest.raises(ValueError):
        b["y"] = torch.zeros(3)
