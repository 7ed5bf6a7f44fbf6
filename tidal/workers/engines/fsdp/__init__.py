"""FSDP2 train/inference engine: sharded model, packed / packed-rows / padded micro-batches, optimizer, checkpoints."""

from tidal.workers.engines.fsdp.engine import (
    DTYPES,
    LAYOUTS,
    FSDPEngine,
    Layout,
    PolicyModel,
    block_types,
    choose_layout,
    load_pretrained,
)
from tidal.workers.engines.fsdp.packed_rows import PackedRowsBatch
from tidal.workers.engines.fsdp.packing import PackedBatch, SequenceBatch
from tidal.workers.engines.fsdp.padding import PaddedBatch
from tidal.workers.engines.fsdp.value_model import ValueModel

__all__ = [
    "DTYPES",
    "LAYOUTS",
    "FSDPEngine",
    "Layout",
    "PackedBatch",
    "PackedRowsBatch",
    "PaddedBatch",
    "PolicyModel",
    "SequenceBatch",
    "ValueModel",
    "block_types",
    "choose_layout",
    "load_pretrained",
]
