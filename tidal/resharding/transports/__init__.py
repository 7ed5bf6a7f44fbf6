"""Transports that move a resharding plan's buffers between devices, behind one small interface.

- `LocalTransport` (local.py): in-process copies (one process, or devices simulated by threads).
- `TorchP2PTransport` (torch_p2p.py): torch.distributed isend/irecv, gloo on CPU, NCCL on GPU.
- `BridgeP2PTransport` (bridge_p2p.py): the same over a `BridgeGroup`, between two pools' processes.
- `CudaIpcTransport` (cuda_ipc.py): colocated processes on one node's GPUs, through CUDA IPC.
"""

from tidal.resharding.transports.base import Pending, Transport
from tidal.resharding.transports.bridge_p2p import BridgeP2PTransport
from tidal.resharding.transports.cuda_ipc import CudaIpcTransport
from tidal.resharding.transports.local import LocalHub, LocalTransport
from tidal.resharding.transports.torch_p2p import TorchP2PTransport

__all__ = [
    "BridgeP2PTransport",
    "CudaIpcTransport",
    "LocalHub",
    "LocalTransport",
    "Pending",
    "TorchP2PTransport",
    "Transport",
]
