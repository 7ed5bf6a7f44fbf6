"""Colocated placement that leaves weights where they already are (HybridFlow's grouping).

When the trainer and the engine share devices, which target rank runs on which device is a free
choice: an engine's tensor-parallel rank r need not sit on device r. `aligned_colocated` picks the
assignment that minimises the bytes the busiest device must receive (then the total), so a target
shard already held by a device's training shard is copied there instead of sent. For Megatron
TP=2 x DP=2 -> vLLM TP=4 every TP=4 shard lies inside one of the TP=2 shards, so with engine ranks
(0, 2, 1, 3) on devices (0, 1, 2, 3) nothing crosses a link at all; in rank order half the devices
receive their whole shard.

Whoever launches the engines must then give device `placement.dst_devices[r]` the engine rank r
(e.g. order the rollout workers so). The plan itself is the ordinary planner's over that placement.
"""

from __future__ import annotations

import itertools

from tidal.resharding.layout import ParallelLayout, box_intersect, box_numel
from tidal.resharding.planner import Placement
from tidal.resharding.spec import Spec

__all__ = ["aligned_colocated", "lacking_bytes"]

_EXACT_UP_TO = 8  # devices; above, a greedy assignment improved by pairwise swaps


def lacking_bytes(spec: Spec, src: ParallelLayout, dst: ParallelLayout) -> list[list[int]]:
    """[r][d]: the bytes of target rank r's shard that source rank d (on device d) does not hold."""
    held_by = [
        [(p.canonical, p.canon_box) for t in src.rank_tensors(spec, s) for p in t.pieces]
        for s in range(src.world_size)
    ]
    matrix = []
    for r in range(dst.world_size):
        pieces = [(p.canonical, p.canon_box) for t in dst.rank_tensors(spec, r) for p in t.pieces]
        total = sum(box_numel(box) for _, box in pieces)
        row = []
        for held in held_by:
            # One source rank's pieces never overlap each other, so the overlaps add up.
            have = 0
            for name, box in pieces:
                for held_name, held_box in held:
                    if held_name == name and (overlap := box_intersect(box, held_box)) is not None:
                        have += box_numel(overlap)
            row.append((total - have) * spec.element_size)
        matrix.append(row)
    return matrix


def aligned_colocated(spec: Spec, src: ParallelLayout, dst: ParallelLayout) -> Placement:
    """Source rank d on device d; target ranks on the devices that minimise (max inbound, total)."""
    if src.world_size != dst.world_size:
        raise ValueError(
            f"aligned_colocated puts one target rank on each device of the trainer, but {src} has "
            f"{src.world_size} ranks and {dst} {dst.world_size}; use Placement.colocated or give "
            "both layouts the same number of ranks"
        )
    lack = lacking_bytes(spec, src, dst)
    n = len(lack)

    def cost(devices: tuple[int, ...]) -> tuple[int, int]:
        per_device = [lack[r][d] for r, d in enumerate(devices)]
        return max(per_device), sum(per_device)

    if n <= _EXACT_UP_TO:
        # Permutations in lexicographic order and a strict `<`: the rank order wins ties.
        best = min(itertools.permutations(range(n)), key=cost)
    else:
        best = _greedy_then_swaps(lack, cost)
    return Placement(tuple(range(n)), tuple(best))


def _greedy_then_swaps(lack: list[list[int]], cost) -> tuple[int, ...]:
    """Each target rank in turn takes its best free device; then pairwise swaps while one helps.
    Starts from rank order when that is better, so the result never loses to it."""
    n = len(lack)
    free = set(range(n))
    greedy = []
    for r in range(n):
        d = min(free, key=lambda d: (lack[r][d], d))
        greedy.append(d)
        free.remove(d)
    devices = min(greedy, list(range(n)), key=lambda devs: cost(tuple(devs)))
    improved = True
    while improved:
        improved = False
        for a, b in itertools.combinations(range(n), 2):
            trial = list(devices)
            trial[a], trial[b] = trial[b], trial[a]
            if cost(tuple(trial)) < cost(tuple(devices)):
                devices, improved = trial, True
    return tuple(devices)
