"""Point-to-point over a `BridgeGroup`: the pools of a disaggregated sync (gloo on CPU, NCCL on GPU).

The same messages and tags as `TorchP2PTransport`, posted on the bridge group's own backend
objects rather than through `torch.distributed` (which does not know that group: see
bridge_group.py). Peers are the group's ranks: trainer ranks first, then rollout ranks.
"""

from __future__ import annotations

from tidal.resharding.bridge_group import BridgeGroup, P2POp
from tidal.resharding.transports.base import Buffers, Done, Pending, Transport, Works
from tidal.resharding.transports.torch_p2p import MessageTags


class BridgeP2PTransport(Transport):
    """Sends and receives on `group`; buffers live on the group's device."""

    def __init__(self, group: BridgeGroup):
        super().__init__(group.rank, group.world_size, group.device)
        self.group = group
        self._tags = MessageTags()

    def _start(self, sends: Buffers, recvs: Buffers) -> Pending:
        ops = [P2POp(*op) for op in self._tags.ops(sends, recvs)]
        if not ops:
            return Done()
        return Works(self.group.post(ops))
