"""The pieces of the programs' weight sync that need no process group.

- `TensorSpec`: any model's tensors by name; plans between the `fsdp` and `hf` layouts over it
  rebuild every tensor bit for bit; structured layouts refuse it.
- `Resharder` in a world of one process: every rectangle is a local copy (one copy in all), the
  executor is kept across syncs, and a sync after the sources changed carries the new values.
- An fp32 source feeding a bf16 target: cast on the sender, on threads of the in-process hub.
"""

from __future__ import annotations

import threading

import pytest
import torch

from tidal.resharding.apply import apply_plan, materialize
from tidal.resharding.executor import ReshardExecutor
from tidal.resharding.layout import ParallelLayout
from tidal.resharding.planner import Placement, make_plan
from tidal.resharding.spec import TensorSpec
from tidal.resharding.sync import Resharder, WeightSource, WeightTarget
from tidal.resharding.transports import LocalHub

SHAPES = {  # row counts that do not divide by 2 or 3, a 1-D tensor, a 3-D one (fused experts)
    "embed.weight": (19, 6),
    "layers.0.attn.weight": (7, 6),
    "layers.0.norm.weight": (6,),
    "layers.0.experts.gate_up_proj": (4, 10, 6),
    "head.weight": (1, 6),
}


def full_tensors(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen).to(dtype) for name, shape in SHAPES.items()}


def test_tensor_spec_plans_fsdp_to_hf_bit_for_bit():
    spec = TensorSpec.of(full_tensors())
    assert spec.canonical_shapes() == SHAPES and spec.dtype == "float32"
    assert spec.num_bytes() == sum(t.numel() * 4 for t in full_tensors().values())
    assert hash(spec) == hash(TensorSpec.of(full_tensors(seed=1))) and spec == TensorSpec.of(
        full_tensors(seed=1)
    )
    full = full_tensors()
    for src, dst in (
        (ParallelLayout.fsdp(dp=3), ParallelLayout.hf(dp=2)),
        (ParallelLayout.hf(), ParallelLayout.fsdp(dp=4)),
    ):
        plan = make_plan(spec, src, dst, Placement.colocated(src.world_size, dst.world_size), bucket_bytes=64)
        out = apply_plan(plan, {r: materialize(spec, src, r, full) for r in range(src.world_size)})
        for r in range(dst.world_size):
            for name, got in out[r].items():
                assert torch.equal(got, materialize(spec, dst, r, full)[name]), (src, dst, r, name)


def test_tensor_spec_mistakes_are_value_errors():
    spec = TensorSpec.of(full_tensors())
    with pytest.raises(ValueError, match="needs a ModelSpec"):
        ParallelLayout.vllm(tp=2).rank_tensors(spec, 0)
    with pytest.raises(ValueError, match="needs a ModelSpec"):
        ParallelLayout.fsdp(dp=2, fused_experts=True).rank_tensors(spec, 0)
    mixed = {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.bfloat16)}
    with pytest.raises(ValueError, match="one dtype"):
        TensorSpec.of(mixed)
    with pytest.raises(ValueError, match="more than once"):
        TensorSpec((("a", (2,)), ("a", (3,))))
    with pytest.raises(ValueError, match="dtype"):
        TensorSpec((("a", (2,)),), dtype="float33")


def test_one_process_sync_is_one_local_copy_and_never_stale():
    full = full_tensors()
    spec = TensorSpec.of(full)
    source_tensors = {name: t.clone() for name, t in full.items()}
    target_tensors = {name: torch.zeros_like(t) for name, t in full.items()}
    source = WeightSource(ParallelLayout.fsdp(dp=1), 0, source_tensors)
    target = WeightTarget(spec, ParallelLayout.hf(), 0, target_tensors)
    resharder = Resharder(verify=True)

    stats = resharder.sync(source, target)
    assert stats.bytes_received == stats.bytes_sent == stats.staging_bytes == 0
    assert stats.local_copy_bytes == spec.num_bytes()  # every byte copied exactly once
    assert all(torch.equal(target_tensors[n], full[n]) for n in full)
    executor = resharder.executor

    for t in source_tensors.values():  # the trainer steps: its tensors change in place
        t.mul_(-2.0)
    resharder.sync(source, target)
    assert resharder.executor is executor  # plan and executor kept across syncs
    assert all(torch.equal(target_tensors[n], full[n] * -2.0) for n in full)

    with pytest.raises(ValueError, match="lacks tensor"):
        partial = {n: t for n, t in source_tensors.items() if n != "head.weight"}
        resharder.sync(WeightSource(source.layout, 0, partial), target)
    with pytest.raises(TypeError, match="no full tensors"):
        iter(source)


def test_placement_must_hold_every_rank_once():
    from tidal.resharding.sync import _devices

    assert _devices([1, 0], ParallelLayout.hf(dp=2), "target") == (1, 0)
    with pytest.raises(ValueError, match="exactly one process"):
        _devices([0, 0], ParallelLayout.hf(dp=2), "target")


@pytest.mark.parametrize("min_direct_bytes", [1, 1 << 20], ids=["direct", "packed"])
def test_fp32_sources_feed_a_bf16_target_cast_on_the_sender(min_direct_bytes):
    full = full_tensors()
    spec = TensorSpec.of({n: t.to(torch.bfloat16) for n, t in full.items()})
    src, dst = ParallelLayout.fsdp(dp=2), ParallelLayout.hf(dp=2)
    plan = make_plan(spec, src, dst, Placement.colocated(2, 2), bucket_bytes=100)
    hub = LocalHub(2, timeout_s=30)
    received = [0, 0]

    def run(device: int) -> None:
        executor = ReshardExecutor(
            plan, hub.transport(device), min_direct_bytes=min_direct_bytes, src_dtype=torch.float32
        )
        sources = {device: materialize(TensorSpec.of(full), src, device, full)}  # fp32 shards
        targets = executor.allocate_targets()
        stats = executor.sync(sources, targets, verify=True)
        received[device] = stats.bytes_received
        for name, got in targets[device].items():
            assert got.dtype == torch.bfloat16 and torch.equal(got, full[name].to(torch.bfloat16)), name

    on_threads(2, run)
    assert sum(received) == plan.report.lower_bound_bytes  # bf16 bytes on the wire, not fp32


def on_threads(num_devices: int, fn) -> None:
    """Run fn(device) on one thread per device; re-raise the first failure."""
    errors: list[BaseException] = []

    def run(device: int) -> None:
        try:
            fn(device)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,)) for d in range(num_devices)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_src_dtype_must_be_floating_to_differ():
    spec = TensorSpec.of(full_tensors())
    plan = make_plan(spec, ParallelLayout.hf(), ParallelLayout.hf(), Placement.colocated(1, 1))
    with pytest.raises(ValueError, match="floating point"):
        ReshardExecutor(plan, LocalHub(1).transport(0), src_dtype=torch.int32)


@pytest.mark.parametrize("fused", [False, True], ids=["loop", "fused"])
def test_kept_views_carry_new_values_and_follow_new_tensors(fused):
    """With the staging buffer kept (the GPU default), a sync reuses the views of its first one:
    new values in the same tensors arrive, and other target tensors get views of their own."""
    full = full_tensors()
    spec = TensorSpec.of(full)
    src, dst = ParallelLayout.fsdp(dp=2), ParallelLayout.hf(dp=2)
    plan = make_plan(spec, src, dst, Placement.colocated(2, 2), bucket_bytes=100)
    hub = LocalHub(2, timeout_s=30)

    def run(device: int) -> None:
        executor = ReshardExecutor(
            plan, hub.transport(device), keep_staging=True, min_direct_bytes=64, fused_copies=fused
        )
        sources = {device: materialize(spec, src, device, full)}
        targets = executor.allocate_targets()
        executor.sync(sources, targets, verify=True)
        views = executor._cached_views
        new = full_tensors(seed=1)
        for name, t in materialize(spec, src, device, new).items():
            sources[device][name].copy_(t)
        executor.sync(sources, targets)
        assert executor._cached_views is views
        fresh = executor.allocate_targets()
        executor.sync(sources, fresh)
        assert executor._cached_views is not views
        for got in (targets, fresh):
            for name, tensor in got[device].items():
                assert torch.equal(tensor, new[name]), name

    on_threads(2, run)
