"""StreamStore: a streaming data store for asynchronous RL (issue 13, point 1).

A metadata controller (one async Ray actor, `controller.py`, wrapping the pure `StoreIndex` of
`index.py`) plus storage units (`storage.py`) holding numpy-backed columns; the client
(`store.py`) puts from any producer and takes per task with a sampler (`samplers.py`).
"""

from tidal.dataflow.store.index import StoreIndex, StoreTimeout, TakePlan
from tidal.dataflow.store.samplers import SAMPLERS, SampleMeta, Sampler, get_sampler
from tidal.dataflow.store.store import StreamStore, TakeResult

__all__ = [
    "SAMPLERS", "SampleMeta", "Sampler", "StoreIndex", "StoreTimeout", "StreamStore", "TakePlan", "TakeResult",
    "get_sampler",
]
