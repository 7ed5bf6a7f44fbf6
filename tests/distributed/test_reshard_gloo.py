"""The resharding executor over real transports: 4 gloo processes, and threads on the in-process hub.

Each case builds full canonical tensors from a seed, cuts every source rank's tensors from them,
syncs through `ReshardExecutor`, and compares every target tensor with the target layout cut from
the same full tensors (bit for bit, padding included). One spawn of 4 processes runs all cases:
starting processes costs more than the cases. A rank's failed assertion stops the spawn; a short
process-group timeout bounds any hang.
"""

from __future__ import annotations

import datetime
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tidal.resharding.apply import materialize
from tidal.resharding.executor import ReshardExecutor
from tidal.resharding.layout import ParallelLayout, box_slices
from tidal.resharding.messages import is_contiguous
from tidal.resharding.planner import Placement, make_plan
from tidal.resharding.spec import ModelSpec
from tidal.resharding.transports import LocalHub, LocalTransport, TorchP2PTransport

WORLD = 4

DENSE = ModelSpec(
    num_layers=2,
    hidden_size=8,
    num_heads=4,
    num_kv_heads=2,
    head_dim=2,
    ffn_size=12,
    vocab_size=37,  # padded differently by Megatron (to 16 x tp) and vLLM (to 64)
    tie_embeddings=True,
    qkv_bias=True,
    qk_norm=True,
    dtype="bfloat16",
    make_vocab_size_divisible_by=8,
)
UNTIED_FP32 = ModelSpec(
    num_layers=2,
    hidden_size=8,
    num_heads=4,
    num_kv_heads=4,
    head_dim=2,
    ffn_size=8,
    vocab_size=21,
    tie_embeddings=False,
    mlp_bias=True,
    o_bias=True,
    dtype="float32",
    make_vocab_size_divisible_by=4,
)
MOE = ModelSpec(
    num_layers=2,
    hidden_size=6,
    num_heads=2,
    num_kv_heads=2,
    head_dim=2,
    ffn_size=0,
    vocab_size=11,
    tie_embeddings=False,
    num_experts=4,
    moe_ffn_size=4,
    dtype="float32",
)


def full_tensors(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=gen).to(spec.torch_dtype)
        for name, shape in spec.canonical_shapes().items()
    }


# (name, spec, source layout, target layout, placement, bucket cap in bytes)
CASES = [
    (
        "megatron tp2 pp2 -> vllm tp2 x2 engines, colocated, many small buckets",
        DENSE,
        ParallelLayout.megatron(tp=2, pp=2),
        ParallelLayout.vllm(tp=2, dp=2),
        Placement.colocated(4, 4),
        96,
    ),
    (
        "megatron tp2 dp2 -> vllm tp4, colocated",
        UNTIED_FP32,
        ParallelLayout.megatron(tp=2, dp=2),
        ParallelLayout.vllm(tp=4),
        Placement.colocated(4, 4),
        1 << 20,
    ),
    (
        "megatron tp2 on devices 0,1 -> vllm tp2 on devices 2,3, disaggregated",
        DENSE,
        ParallelLayout.megatron(tp=2),
        ParallelLayout.vllm(tp=2),
        Placement.disaggregated(2, 2),
        256,
    ),
    (
        "megatron tp2 pp2 -> full Hugging Face tensors on device 3 only",
        UNTIED_FP32,
        ParallelLayout.megatron(tp=2, pp=2),
        ParallelLayout.hf(),
        Placement((0, 1, 2, 3), (3,)),
        512,
    ),
    (
        "MoE: fsdp over 4 (fused experts) -> vllm tp2 with expert parallelism x2 engines",
        MOE,
        ParallelLayout.fsdp(dp=4, fused_experts=True),
        ParallelLayout.vllm(tp=2, dp=2, expert_parallel=True),
        Placement.colocated(4, 4),
        200,
    ),
]


def _run_case(transport, case, seed: int, min_direct_bytes: int) -> tuple[ReshardExecutor, dict, dict, dict]:
    """Sync one case on this device; check its targets; return what the caller checks further.

    min_direct_bytes=1 sends every rectangle as its own message, straight from and into tensor
    memory where it is contiguous; a large value packs them all into the staging buffer.
    """
    name, spec, src, dst, placement, bucket_bytes = case
    plan = make_plan(spec, src, dst, placement, bucket_bytes)
    executor = ReshardExecutor(plan, transport, min_direct_bytes=min_direct_bytes)
    full = full_tensors(spec, seed)
    device = transport.device
    sources = {
        r: {k: v.to(device) for k, v in materialize(spec, src, r, full).items()} for r in executor.src_ranks
    }
    targets = executor.allocate_targets()
    stats = executor.sync(sources, targets, verify=True)
    for rank, tensors in targets.items():
        expected = materialize(spec, dst, rank, full)
        for tensor_name, got in tensors.items():
            assert torch.equal(got.cpu(), expected[tensor_name]), (name, rank, tensor_name)
    assert stats.staging_bytes <= 2 * bucket_bytes, (name, stats)  # two halves: pack k+1 during k
    return executor, sources, targets, {"stats": stats, "full": full}


def _worker(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    transport = TorchP2PTransport()
    for case, min_direct_bytes in ((c, d) for c in CASES for d in (1, 1 << 20)):
        name, spec, src, dst, placement, bucket_bytes = case
        executor, sources, targets, info = _run_case(
            transport, case, seed=1, min_direct_bytes=min_direct_bytes
        )
        stats = info["stats"]

        # Bytes on the wire: exactly what each device lacks, summed over devices.
        moved = torch.tensor([stats.bytes_received, stats.bytes_sent], dtype=torch.int64)
        dist.all_reduce(moved)
        assert moved.tolist() == [executor.plan.report.lower_bound_bytes] * 2, (name, moved)

        # Repeated sync into the same target tensors after the sources changed: nothing stale.
        new_full = full_tensors(spec, seed=2)
        for r, tensors in sources.items():
            for tensor_name, t in materialize(spec, src, r, new_full).items():
                tensors[tensor_name].copy_(t)
        executor.sync(sources, targets, verify=True)
        for r, tensors in targets.items():
            expected = materialize(spec, dst, r, new_full)
            for tensor_name, got in tensors.items():
                assert torch.equal(got, expected[tensor_name]), (name, "second sync", r, tensor_name)

        # verify catches a wrong element: the last device with a received rectangle corrupts one.
        flag = torch.tensor([rank if executor.received_moves else -1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        corrupt = int(flag)
        if rank == corrupt:
            move = executor.received_moves[-1]
            target = targets[move.dst_rank][move.dst_tensor][box_slices(move.dst_box)]
            target.view(-1)[0] += 1
        report = executor.verify(sources, targets)
        if rank == corrupt:
            assert len(report.mismatches) == 1 and move.dst_tensor in report.mismatches[0], report
        else:
            assert report.ok, (name, report)
        dist.barrier()
    dist.destroy_process_group()


@pytest.mark.distributed
def test_gloo_p2p_reshards_megatron_fsdp_to_vllm_hf_colocated_and_disaggregated(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path}/rendezvous",), nprocs=WORLD, join=True)


def _gpu_worker(rank: int, store: str, kind: str) -> None:
    """Every case over NCCL (one GPU per process) or CUDA IPC (all processes on GPU 0)."""
    from tidal.resharding.transports.cuda_ipc import CudaIpcTransport

    torch.cuda.set_device(rank if kind == "nccl" else 0)
    dist.init_process_group(
        "nccl" if kind == "nccl" else "gloo",
        init_method=store,
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    transport = TorchP2PTransport() if kind == "nccl" else CudaIpcTransport()
    for case, min_direct_bytes in ((c, d) for c in CASES for d in (1, 1 << 20)):
        _run_case(transport, case, seed=1, min_direct_bytes=min_direct_bytes)
        dist.barrier()
    transport.close()
    dist.destroy_process_group()


@pytest.mark.gpu
def test_cuda_ipc_between_processes_sharing_one_gpu(tmp_path):
    mp.spawn(_gpu_worker, args=(f"file://{tmp_path}/rendezvous", "ipc"), nprocs=WORLD, join=True)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < WORLD,
    reason=f"NCCL needs one GPU per process: {WORLD} GPUs",
)
def test_nccl_p2p_one_gpu_per_process(tmp_path):
    mp.spawn(_gpu_worker, args=(f"file://{tmp_path}/rendezvous", "nccl"), nprocs=WORLD, join=True)


def _threads(num_devices: int, fn) -> list:
    """Run fn(device) on one thread per device; re-raise the first failure."""
    results: list = [None] * num_devices
    errors: list[BaseException] = []

    def run(device: int) -> None:
        try:
            results[device] = fn(device)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,)) for d in range(num_devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("min_direct_bytes", [1, 1 << 20], ids=["direct", "packed"])
@pytest.mark.parametrize("case", CASES, ids=[c[0].split(",")[0] for c in CASES])
def test_in_process_hub_runs_the_same_plans_with_threads(case, min_direct_bytes):
    hub = LocalHub(WORLD, timeout_s=30)
    _threads(WORLD, lambda device: _run_case(hub.transport(device), case, 3, min_direct_bytes))


def test_world_of_one_is_local_copies_only():
    """Trainer and engine in one process: Hugging Face tensors -> vLLM tp1 without any exchange."""
    case = ("hf -> vllm tp1 in one process", DENSE, ParallelLayout.hf(), ParallelLayout.vllm(), None, 64)
    case = (*case[:4], Placement.colocated(1, 1), case[5])
    executor, _, _, info = _run_case(LocalTransport.single(), case, seed=4, min_direct_bytes=1)
    assert info["stats"].bytes_received == info["stats"].bytes_sent == 0
    assert info["stats"].local_copy_bytes == DENSE.num_bytes()


def test_mismatched_sizes_and_bad_buffers_are_refused():
    hub = LocalHub(2, timeout_s=5)

    def run(device: int) -> None:
        transport = hub.transport(device)
        if device == 0:
            transport.exchange({1: [torch.zeros(8, dtype=torch.uint8)]}, {})
        else:
            with pytest.raises(RuntimeError, match="sent 8 bytes, 4 expected"):
                transport.exchange({}, {0: [torch.zeros(4, dtype=torch.uint8)]})

    _threads(2, run)
    with pytest.raises(ValueError, match="uint8"):
        hub.transport(0).exchange({1: [torch.zeros(2)]}, {})
    with pytest.raises(ValueError, match="another rank"):
        hub.transport(0).exchange({0: [torch.zeros(2, dtype=torch.uint8)]}, {})
    plan = make_plan(DENSE, ParallelLayout.megatron(tp=2), ParallelLayout.vllm(), Placement.colocated(2, 1))
    with pytest.raises(ValueError, match="transport's group has 1 ranks"):
        ReshardExecutor(plan, LocalTransport.single())
    executor = ReshardExecutor(plan, hub.transport(0))
    with pytest.raises(ValueError, match="lacks tensor"):
        executor.sync({0: {}}, executor.allocate_targets())


def test_is_contiguous_agrees_with_torch():
    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        shape = tuple(
            int(n) for n in torch.randint(1, 4, (int(torch.randint(1, 4, ()).item()),), generator=gen)
        )
        box = []
        for n in shape:
            start = int(torch.randint(0, n, (), generator=gen))
            box.append((start, int(torch.randint(start + 1, n + 1, (), generator=gen))))
        box = tuple(box)
        assert is_contiguous(box, shape) == torch.empty(shape)[box_slices(box)].is_contiguous(), (shape, box)
