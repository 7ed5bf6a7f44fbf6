"""FSDP2 train/inference engine: sharded model, packed micro-batches, optimizer, checkpoints."""

from tidal.workers.engines.fsdp.engine import DTYPES, FSDPEngine, PolicyModel, block_types, load_pretrained
from tidal.workers.engines.fsdp.packing import PackedBatch
from tidal.workers.engines.fsdp.value_model import ValueModel

__all__ = [
    "DTYPES",
    "FSDPEngine",
    "PackedBatch",
    "PolicyModel",
    "ValueModel",
    "block_types",
    "load_pretrained",
]
