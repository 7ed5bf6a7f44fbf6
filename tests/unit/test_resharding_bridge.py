"""The disaggregated resharder: processes that hold only a source rank or only a target rank.

Four gloo processes, each in a torch.distributed world of its own (as every worker pool is), meet
in a `BridgeGroup` built on a shared store: ranks 0-1 hold FSDP shards (the trainer), ranks 2-3
full replicas (the engine); on a machine with 2 GPUs, the same over NCCL with one rank a side. Every engine rank must then hold the full tensors bit for bit,
after a second sync the new values, with exactly the plan's lower bound on the wire; an fp32
trainer feeds a bf16 engine, cast on the sender. One spawn runs every case (starting processes
costs more than the cases); a short group timeout bounds any hang.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tidal.resharding.apply import materialize
from tidal.resharding.bridge_group import BridgeGroup
from tidal.resharding.disaggregated import BridgeEnd
from tidal.resharding.layout import ParallelLayout
from tidal.resharding.spec import TensorSpec
from tidal.resharding.sync import Resharder, WeightSource, WeightTarget, _devices

SHAPES = {  # row counts that do not divide by 2, a 1-D tensor, a one-row tensor
    "embed.weight": (19, 6),
    "layers.0.attn.weight": (7, 6),
    "layers.0.norm.weight": (6,),
    "head.weight": (1, 6),
}
TIMEOUT = datetime.timedelta(seconds=30)


def full_tensors(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in SHAPES.items()}


def _source(rank: int, seed: int, num_src: int, device: torch.device) -> WeightSource:
    layout = ParallelLayout.fsdp(dp=num_src)
    full = full_tensors(seed)
    tensors = materialize(TensorSpec.of(full), layout, rank, full)
    return WeightSource(layout, rank, {name: t.to(device) for name, t in tensors.items()})


def _rank_main(rank: int, store_path: str, num_src: int, num_dst: int, device_type: str) -> None:
    device = torch.device("cpu")
    if device_type == "cuda":  # one GPU per rank: NCCL refuses two ranks of a group on one GPU
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    # A world of one per process: the bridge must leave each process's default group alone.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    store = dist.FileStore(store_path, num_src + num_dst)
    group = BridgeGroup(store, rank, num_src + num_dst, device, TIMEOUT)

    def report_total(seed: int, dtype: torch.dtype) -> int:
        """Every engine rank's full replica crosses the wire once."""
        return num_dst * sum(t.numel() * t.element_size() for t in full_tensors(seed, dtype).values())

    assert dist.get_world_size() == 1 and dist.get_rank() == 0
    is_src = rank < num_src
    dst_rank = rank - num_src

    for seed, dtype, verify in (
        (0, torch.float32, True),
        (1, torch.float32, False),
        (2, torch.bfloat16, False),
    ):
        resharder = Resharder(group, bucket_bytes=96, verify=verify)  # many small buckets
        if is_src:
            stats = resharder.sync(_source(rank, seed, num_src, device), None)
            assert stats.bytes_received == 0 and stats.local_copy_bytes == 0
        else:
            targets = {n: torch.zeros(shape, dtype=dtype, device=device) for n, shape in SHAPES.items()}
            target = WeightTarget(TensorSpec.of(targets), ParallelLayout.hf(dp=num_dst), dst_rank, targets)
            stats = resharder.sync(None, target)
            for name, want in full_tensors(seed, dtype).items():
                assert torch.equal(targets[name].cpu(), want), (seed, dtype, name)
            report = resharder.executor.plan.report
            assert report.local_copy_bytes == 0 and stats.local_copy_bytes == 0
            assert report.total_bytes == report.lower_bound_bytes
            # Each engine rank receives one full replica, in the engine's dtype.
            assert stats.bytes_received == sum(t.numel() * t.element_size() for t in targets.values())
        sent = group.all_gather_object(stats.bytes_sent)
        received = group.all_gather_object(stats.bytes_received)
        assert sum(sent) == sum(received) == report_total(seed, dtype)

    # The worker's end: versions agree first, then the engine writes through its hook.
    end = BridgeEnd(group, num_src, bucket_bytes=1 << 20)
    for version, seed in ((1, 3), (2, 4)):
        if is_src:
            metrics = end.send(_source(rank, seed, num_src, device), version)
        else:
            params = {name: torch.zeros(shape, device=device) for name, shape in SHAPES.items()}

            def write_weights(write, v, params=params, version=version):
                assert v == version
                return write(params)

            metrics = end.receive(write_weights, version, dst_rank, num_dst)
            assert all(torch.equal(params[n].cpu(), t) for n, t in full_tensors(seed).items())
        assert metrics["plan_bytes"] == metrics["lower_bound_bytes"] == report_total(seed, torch.float32)
    with pytest.raises(RuntimeError, match="different versions"):
        if is_src:
            end.send(_source(rank, 0, num_src, device), 5)
        else:
            end.receive(lambda write, v: None, 6, dst_rank, num_dst)
    group.barrier()
    group.close()
    dist.destroy_process_group()


def test_source_only_and_target_only_processes_over_a_bridge_group(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), 2, 2, "cpu"), nprocs=4, join=True)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: 2 GPUs")
def test_source_only_and_target_only_processes_over_nccl(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "store"), 1, 1, "cuda"), nprocs=2, join=True)


def test_placement_of_processes_holding_one_side():
    # processes 0-1 hold trainer ranks, 2-3 engine ranks (in reverse order)
    assert _devices([0, 1, None, None], ParallelLayout.fsdp(dp=2), "source") == (0, 1)
    assert _devices([None, None, 1, 0], ParallelLayout.hf(dp=2), "target") == (3, 2)
    with pytest.raises(ValueError, match="exactly one process"):
        _devices([0, None, None, None], ParallelLayout.fsdp(dp=2), "source")


def test_a_sync_with_one_side_missing_is_refused():
    full = full_tensors(0)
    source = WeightSource(ParallelLayout.fsdp(dp=1), 0, full)
    with pytest.raises(ValueError, match="no process of the sync holds the engine"):
        Resharder().sync(source, None)
    with pytest.raises(ValueError, match="both are None"):
        Resharder().sync(None, None)
