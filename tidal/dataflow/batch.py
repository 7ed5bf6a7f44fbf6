"""Batch: the unit of data that moves between stages.

Per-sample tensors live in a `TensorDict` (dim 0 = sample), per-sample Python values (text, ids,
ground truth, errors) in object arrays, batch-level facts in `meta`.

Through Ray a Batch pickles its tensors as numpy arrays: Ray stores numpy buffers out of band in
its shared-memory object store and hands them back without a copy, while a pickled torch tensor is
copied (ENVIRONMENT.md measured ~15 ms vs ~200 ms for 100 MB). Tensors that arrive this way share
the store's memory: treat them as read-only (make new tensors, do not write in place).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from tensordict import TensorDict

# numpy has no bfloat16: such tensors travel as int16 bit patterns and are viewed back on arrival.
_VIEW_AS_INT = {torch.bfloat16: torch.int16}


def _as_object_array(values: Sequence[Any]) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = list(values)
    return arr


class Batch:
    def __init__(
        self,
        tensors: TensorDict,
        non_tensors: dict[str, np.ndarray] | None = None,
        meta: dict[str, Any] | None = None,
    ):
        self.tensors = tensors
        self.non_tensors = non_tensors or {}
        self.meta = meta or {}
        n = self.tensors.batch_size[0] if self.tensors.batch_size else None
        for key, arr in self.non_tensors.items():
            if n is not None and len(arr) != n:
                raise ValueError(f"non-tensor column {key!r} has {len(arr)} rows but the tensors have {n}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(
        cls,
        tensors: dict[str, torch.Tensor] | None = None,
        non_tensors: dict[str, Sequence[Any]] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Batch:
        tensors = tensors or {}
        non_tensors = {k: _as_object_array(v) for k, v in (non_tensors or {}).items()}
        sizes = {k: t.shape[0] for k, t in tensors.items()} | {k: len(v) for k, v in non_tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"columns disagree on the number of samples: {sizes}")
        n = next(iter(sizes.values()), 0)
        return cls(TensorDict(dict(tensors), batch_size=[n]), non_tensors, meta)

    @classmethod
    def empty_like(cls, other: Batch) -> Batch:
        return other.slice(0, 0)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return (
            int(self.tensors.batch_size[0])
            if self.tensors.batch_size
            else len(next(iter(self.non_tensors.values()), ()))
        )

    def keys(self) -> list[str]:
        return list(self.tensors.keys()) + list(self.non_tensors.keys())

    def __contains__(self, key: str) -> bool:
        return key in self.tensors.keys() or key in self.non_tensors

    def __getitem__(self, key: str) -> torch.Tensor | np.ndarray:
        if key in self.non_tensors:
            return self.non_tensors[key]
        if key in self.tensors.keys():
            return self.tensors[key]
        raise KeyError(f"batch has no column {key!r}; it has {self.keys()}")

    def __setitem__(self, key: str, value: torch.Tensor | Sequence[Any]) -> None:
        if isinstance(value, torch.Tensor):
            if value.shape[0] != len(self):
                raise ValueError(f"column {key!r} has {value.shape[0]} rows, batch has {len(self)}")
            self.non_tensors.pop(key, None)
            self.tensors[key] = value
        else:
            if len(value) != len(self):
                raise ValueError(f"column {key!r} has {len(value)} rows, batch has {len(self)}")
            self.non_tensors[key] = _as_object_array(value)

    def __repr__(self) -> str:
        cols = ", ".join(f"{k}:{tuple(t.shape)}" for k, t in self.tensors.items())
        return f"Batch(n={len(self)}, tensors=[{cols}], non_tensors={list(self.non_tensors)}, meta={list(self.meta)})"

    # ------------------------------------------------------------------ column algebra
    def select(self, *keys: str) -> Batch:
        missing = [k for k in keys if k not in self]
        if missing:
            raise KeyError(f"batch has no columns {missing}; it has {self.keys()}")
        tkeys = [k for k in keys if k in self.tensors.keys()]
        return Batch(
            self.tensors.select(*tkeys),
            {k: self.non_tensors[k] for k in keys if k in self.non_tensors},
            dict(self.meta),
        )

    def union(self, other: Batch) -> Batch:
        """Columns of both. Shared columns must hold equal values (a cheap guard against misalignment)."""
        if len(self) != len(other):
            raise ValueError(f"cannot union batches of {len(self)} and {len(other)} samples")
        tensors = self.tensors.clone(recurse=False)
        for key, value in other.tensors.items():
            if key in tensors.keys() and not torch.equal(tensors[key], value):
                raise ValueError(f"union: column {key!r} differs between the two batches")
            tensors[key] = value
        non_tensors = dict(self.non_tensors)
        for key, value in other.non_tensors.items():
            if key in non_tensors and not np.array_equal(non_tensors[key], value):
                raise ValueError(f"union: column {key!r} differs between the two batches")
            non_tensors[key] = value
        return Batch(tensors, non_tensors, {**self.meta, **other.meta})

    # ------------------------------------------------------------------ row algebra
    def index(self, indices: Sequence[int] | torch.Tensor) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        np_idx = idx.numpy()
        return Batch(self.tensors[idx], {k: v[np_idx] for k, v in self.non_tensors.items()}, dict(self.meta))

    reorder = index

    def slice(self, start: int, stop: int) -> Batch:
        return Batch(
            self.tensors[start:stop], {k: v[start:stop] for k, v in self.non_tensors.items()}, dict(self.meta)
        )

    @classmethod
    def concat(cls, batches: Iterable[Batch]) -> Batch:
        batches = list(batches)
        if not batches:
            raise ValueError("Batch.concat needs at least one batch")
        keys = set(batches[0].keys())
        for b in batches[1:]:
            if set(b.keys()) != keys:
                raise ValueError(f"Batch.concat: columns differ: {sorted(keys)} vs {sorted(b.keys())}")
        tensors = torch.cat([b.tensors for b in batches], dim=0)
        non_tensors = {k: np.concatenate([b.non_tensors[k] for b in batches]) for k in batches[0].non_tensors}
        meta = {}
        for b in batches:
            meta.update(b.meta)
        return cls(tensors, non_tensors, meta)

    def split_sizes(self, sizes: Sequence[int]) -> list[Batch]:
        if sum(sizes) != len(self):
            raise ValueError(f"split sizes {list(sizes)} do not add up to {len(self)} samples")
        out, start = [], 0
        for size in sizes:
            out.append(self.slice(start, start + size))
            start += size
        return out

    def split(self, num_chunks: int) -> list[Batch]:
        """`num_chunks` contiguous pieces whose sizes differ by at most one (earlier ones larger)."""
        return self.split_sizes(even_split_sizes(len(self), num_chunks))

    def chunk(self, size: int) -> list[Batch]:
        """Contiguous pieces of at most `size` samples."""
        if size < 1:
            raise ValueError(f"chunk size must be >= 1, got {size}")
        return [self.slice(i, min(i + size, len(self))) for i in range(0, len(self), size)]

    def repeat(self, n: int, interleave: bool = True) -> Batch:
        """Each sample n times: interleaved `a a b b` (samples of one prompt adjacent) or tiled `a b a b`."""
        rows = torch.arange(len(self))
        idx = rows.repeat_interleave(n) if interleave else rows.repeat(n)
        return self.index(idx)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.tensors.to(device), self.non_tensors, self.meta)

    # ------------------------------------------------------------------ pickling (Ray transport)
    def __getstate__(self) -> dict[str, Any]:
        arrays, dtypes = {}, {}
        for key, t in self.tensors.items():
            t = t.detach().cpu().contiguous()
            if t.dtype in _VIEW_AS_INT:
                dtypes[key] = t.dtype
                t = t.view(_VIEW_AS_INT[t.dtype])
            arrays[key] = t.numpy()
        return {
            "n": len(self),
            "arrays": arrays,
            "dtypes": dtypes,
            "non_tensors": self.non_tensors,
            "meta": self.meta,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        tensors = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")  # shared, read-only buffers
            for key, arr in state["arrays"].items():
                t = torch.from_numpy(arr)
                if key in state["dtypes"]:
                    t = t.view(state["dtypes"][key])
                tensors[key] = t
        self.tensors = TensorDict(tensors, batch_size=[state["n"]])
        self.non_tensors = state["non_tensors"]
        self.meta = state["meta"]


def even_split_sizes(total: int, num_chunks: int) -> list[int]:
    """Sizes of `num_chunks` near-equal parts of `total`; the first `total % num_chunks` get one more."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    base, extra = divmod(total, num_chunks)
    return [base + (1 if i < extra else 0) for i in range(num_chunks)]
