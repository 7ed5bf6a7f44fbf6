"""The resharding planner, all ranks simulated in one process (no process group).

For random small models and layouts the plan, run by the in-memory executor, must rebuild every
target rank's tensors bit for bit (checked against the tensor-op references of the layout tests),
write every target element exactly once, move exactly the bytes each target device lacks, and be
the same plan every time it is computed.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_resharding_layouts import full_tensors, megatron_reference, vllm_reference

from tidal.resharding.alignment import _greedy_then_swaps, aligned_colocated, lacking_bytes
from tidal.resharding.apply import apply_plan, coverage, materialize, padding_mask
from tidal.resharding.layout import ParallelLayout, box_numel, box_slices
from tidal.resharding.planner import Placement, get_plan, make_plan
from tidal.resharding.spec import ModelSpec


@st.composite
def cases(draw):
    """A tiny spec with a source and a target layout both valid for it."""
    src_tp, dst_tp = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4, 8]))
    src_pp, src_dp = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    kv = src_tp * draw(st.sampled_from([1, 2]))  # Megatron splits whole query groups
    heads = kv * draw(st.sampled_from([1, 2])) * max(1, dst_tp // kv)
    moe = draw(st.booleans()) and draw(st.booleans())  # a quarter of the cases
    spec = ModelSpec(
        num_layers=src_pp * draw(st.sampled_from([1, 2])),
        hidden_size=draw(st.sampled_from([4, 6])),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=draw(st.sampled_from([1, 2])),
        ffn_size=0 if moe else 8 * draw(st.sampled_from([1, 2])),
        vocab_size=draw(st.integers(3, 140)),
        tie_embeddings=draw(st.booleans()),
        qkv_bias=draw(st.booleans()),
        o_bias=draw(st.booleans()),
        mlp_bias=not moe and draw(st.booleans()),
        qk_norm=draw(st.booleans()),
        num_experts=4 if moe else 0,
        moe_ffn_size=8 if moe else 0,
        dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        make_vocab_size_divisible_by=draw(st.sampled_from([1, 8, 128])),
    )
    src_kind = draw(st.sampled_from(["megatron", "megatron", "megatron", "fsdp", "hf"]))
    if src_kind == "megatron":
        ep = draw(st.sampled_from([1, 2])) if moe and src_dp == 2 else 1
        src = ParallelLayout.megatron(tp=src_tp, pp=src_pp, dp=src_dp, ep=ep)
    elif src_kind == "fsdp":
        src = ParallelLayout.fsdp(
            dp=draw(st.sampled_from([1, 2, 3])), fused_experts=moe and draw(st.booleans())
        )
    else:
        src = ParallelLayout.hf(dp=src_dp)
    dst_kind = draw(st.sampled_from(["vllm", "vllm", "vllm", "megatron", "hf"]))
    if dst_kind == "vllm":
        dst_dp = draw(st.sampled_from([1, 2]))
        dst = ParallelLayout.vllm(
            tp=dst_tp,
            pp=min(spec.num_layers, draw(st.sampled_from([1, 2]))),
            dp=dst_dp,
            expert_parallel=moe and draw(st.booleans()),
        )
    elif dst_kind == "megatron":
        dst = ParallelLayout.megatron(tp=src_tp, pp=1, dp=draw(st.sampled_from([1, 2])))
    else:
        dst = ParallelLayout.hf(dp=draw(st.sampled_from([1, 2])))
    kind = draw(st.sampled_from(["colocated", "aligned", "disaggregated"]))
    if kind == "aligned" and src.world_size == dst.world_size:
        placement = aligned_colocated(spec, src, dst)
    elif kind == "disaggregated":
        placement = Placement.disaggregated(src.world_size, dst.world_size)
    else:
        placement = Placement.colocated(src.world_size, dst.world_size)
    bucket_bytes = draw(st.sampled_from([16, 100, 1000, 1 << 20]))
    return spec, src, dst, placement, bucket_bytes


def _reference(full, spec: ModelSpec, layout: ParallelLayout, rank: int) -> dict[str, torch.Tensor] | None:
    """The independent tensor-op reference where one exists (dense vLLM / Megatron), else None."""
    c = layout.coords(rank)
    if spec.is_moe or layout.pp > 2:
        return None
    if layout.format == "vllm":
        return vllm_reference(full, spec, layout.tp, layout.pp, c["tp"], c["pp"])
    if layout.format == "megatron":
        return megatron_reference(full, spec, layout.tp, layout.pp, c["tp"], c["pp"])
    if layout.format == "hf":
        return dict(full)
    return None


def _lacking_bytes(spec: ModelSpec, src: ParallelLayout, dst: ParallelLayout, placement: Placement) -> int:
    """Lower bound by brute force: element masks of what each device holds, counted per target piece."""
    held: dict[int, dict[str, torch.Tensor]] = {}
    for rank, device in enumerate(placement.src_devices):
        masks = held.setdefault(device, {})
        for t in src.rank_tensors(spec, rank):
            for p in t.pieces:
                shape = spec.canonical_shapes()[p.canonical]
                masks.setdefault(p.canonical, torch.zeros(shape, dtype=torch.bool))[
                    box_slices(p.canon_box)
                ] = True
    total = 0
    for rank, device in enumerate(placement.dst_devices):
        for t in dst.rank_tensors(spec, rank):
            for p in t.pieces:
                mask = held.get(device, {}).get(p.canonical)
                have = 0 if mask is None else int(mask[box_slices(p.canon_box)].sum())
                total += (box_numel(p.canon_box) - have) * spec.element_size
    return total


@settings(max_examples=120, deadline=None)
@given(case=cases())
def test_plan_rebuilds_every_target_shard_bit_for_bit_and_moves_only_what_is_lacking(case):
    spec, src, dst, placement, bucket_bytes = case
    full = full_tensors(spec)
    src_locals = {r: materialize(spec, src, r, full) for r in range(src.world_size)}
    plan = make_plan(spec, src, dst, placement, bucket_bytes)
    out = apply_plan(plan, src_locals)

    counts = coverage(plan)
    for rank in range(dst.world_size):
        expected = materialize(spec, dst, rank, full)
        reference = _reference(full, spec, dst, rank)
        if reference is not None:  # the layout itself is independently right ...
            assert sorted(reference) == sorted(expected)
            assert all(torch.equal(expected[k], reference[k]) for k in reference)
        for t in dst.rank_tensors(spec, rank):  # ... and the plan rebuilds it exactly
            assert torch.equal(out[rank][t.name], expected[t.name]), (rank, t.name)
            pad = padding_mask(t)
            assert bool((counts[rank][t.name][~pad] == 1).all()), (rank, t.name, "element not written once")
            assert bool((counts[rank][t.name][pad] == 0).all()), (rank, t.name, "padding written")

    report = plan.report
    assert report.total_bytes == report.lower_bound_bytes == _lacking_bytes(spec, src, dst, placement)
    assert report.total_bytes == sum(m.num_bytes for b in plan.buckets for m in b)
    for bucket in plan.buckets:  # no device stages more than the cap in one bucket
        staged: dict[int, int] = {}
        for m in bucket:
            for dev in (placement.src_devices[m.src_rank], placement.dst_devices[m.dst_rank]):
                staged[dev] = staged.get(dev, 0) + m.num_bytes
        assert max(staged.values()) <= max(bucket_bytes, spec.element_size)
    assert make_plan(spec, src, dst, placement, bucket_bytes) == plan  # deterministic


@settings(max_examples=30, deadline=None)
@given(case=cases())
def test_device_ops_partition_the_plan(case):
    spec, src, dst, placement, bucket_bytes = case
    plan = make_plan(spec, src, dst, placement, bucket_bytes)
    devices = sorted(set(placement.src_devices) | set(placement.dst_devices))
    ops = [plan.device_ops(d) for d in devices]
    for b, bucket in enumerate(plan.buckets):
        assert sorted(m for o in ops for m in o.sends[b]) == sorted(bucket)
        assert sorted(m for o in ops for m in o.recvs[b]) == sorted(bucket)
    assert sorted(m for o in ops for m in o.local_copies) == sorted(plan.local_copies)


def _qwen25_05b() -> ModelSpec:
    return ModelSpec(
        num_layers=24, hidden_size=896, num_heads=14, num_kv_heads=2, head_dim=64, ffn_size=4864,
        vocab_size=151936, tie_embeddings=True, qkv_bias=True,
    )  # fmt: skip


def test_colocated_same_layout_is_all_local_copies():
    spec = _qwen25_05b()
    layout = ParallelLayout.megatron(tp=2, pp=2, dp=2)
    plan = make_plan(spec, layout, layout, Placement.colocated(8, 8))
    assert plan.report.total_bytes == 0 and plan.buckets == ()
    assert (
        plan.report.local_copy_bytes
        == sum(
            sum(box_numel(p.canon_box) for t in layout.rank_tensors(spec, r) for p in t.pieces)
            for r in range(8)
        )
        * spec.element_size
    )


def test_disaggregated_to_one_engine_moves_every_target_byte_once_balanced_over_senders():
    spec = _qwen25_05b()
    src, dst = ParallelLayout.megatron(tp=2, pp=2, dp=2), ParallelLayout.vllm(tp=2)
    cap = 16 << 20
    plan = make_plan(spec, src, dst, Placement.disaggregated(8, 2), bucket_bytes=cap)
    needed = sum(
        box_numel(p.canon_box) for r in range(2) for t in dst.rank_tensors(spec, r) for p in t.pieces
    )
    # Nothing is on the target devices: the model once, plus the norms both TP ranks replicate.
    assert plan.report.total_bytes == plan.report.lower_bound_bytes == needed * spec.element_size
    assert needed * spec.element_size - spec.num_bytes() == (2 * 24 + 1) * 896 * 2
    # Every rectangle has at least two holders (DP replicas), so greedy balancing gets close to
    # an even split over the 8 senders.
    assert plan.report.max_outbound_bytes <= plan.report.total_bytes / 8 + cap
    assert all(m.num_bytes <= cap for b in plan.buckets for m in b)


def test_plans_are_cached_on_hashable_keys():
    spec = _qwen25_05b()
    args = (spec, ParallelLayout.megatron(tp=2), ParallelLayout.vllm(tp=2), Placement.colocated(2, 2))
    assert get_plan(*args) is get_plan(*args)
    same = (
        ModelSpec(**vars(spec)),
        ParallelLayout.megatron(tp=2),
        ParallelLayout.vllm(tp=2),
        Placement.colocated(2, 2),
    )
    assert get_plan(*same) is get_plan(*args)


def test_buckets_keep_every_link_busy():
    """Every bucket carries about the same fraction of each link's bytes, so the busiest device
    of each bucket is about the busiest device overall: summed over buckets, the per-bucket
    maximum load stays close to the largest device total (first-fit in plan order gave 1.3-2.1)."""
    spec = ModelSpec(
        num_layers=4,
        hidden_size=64,
        num_heads=8,
        num_kv_heads=4,
        head_dim=16,
        ffn_size=192,
        vocab_size=1000,
        tie_embeddings=True,
        qk_norm=True,
        dtype="bfloat16",
        make_vocab_size_divisible_by=8,
    )
    for src, dst in (
        (ParallelLayout.megatron(tp=2, dp=2), ParallelLayout.vllm(tp=4)),
        (ParallelLayout.megatron(tp=4, pp=2), ParallelLayout.vllm(tp=2, dp=4)),
    ):
        placement = Placement.colocated(src.world_size, dst.world_size)
        plan = make_plan(spec, src, dst, placement, bucket_bytes=16 << 10)
        total: dict[tuple[str, int], int] = {}
        per_bucket_max = 0
        for bucket in plan.buckets:
            load: dict[tuple[str, int], int] = {}
            for m in bucket:
                for key in (
                    ("out", placement.src_devices[m.src_rank]),
                    ("in", placement.dst_devices[m.dst_rank]),
                ):
                    load[key] = load.get(key, 0) + m.num_bytes
                    total[key] = total.get(key, 0) + m.num_bytes
            per_bucket_max += max(load.values())
        assert per_bucket_max <= 1.15 * max(total.values()), (src, dst, per_bucket_max / max(total.values()))


# ------------------------------------------------------------------ aligned colocated placement


@settings(max_examples=25, deadline=None)
@given(case=cases())
def test_aligned_placement_never_lacks_more_than_rank_order(case):
    spec, src, dst, _, _ = case
    if src.world_size != dst.world_size:
        return
    n = dst.world_size
    lack = lacking_bytes(spec, src, dst)
    # The matrix against the brute-force masks: target rank r alone on device d, the others nowhere.
    nowhere = _lacking_bytes(spec, src, dst, Placement(tuple(range(n)), (-1,) * n))
    for r in range(n):
        own = sum(box_numel(p.canon_box) for t in dst.rank_tensors(spec, r) for p in t.pieces)
        for d in range(n):
            alone = Placement(tuple(range(n)), tuple(d if i == r else -1 for i in range(n)))
            assert lack[r][d] == _lacking_bytes(spec, src, dst, alone) - nowhere + own * spec.element_size

    aligned = aligned_colocated(spec, src, dst)
    assert sorted(aligned.dst_devices) == list(range(n))  # a permutation
    a = make_plan(spec, src, dst, aligned).report
    b = make_plan(spec, src, dst, Placement.colocated(n, n)).report
    assert (a.max_inbound_bytes, a.lower_bound_bytes) <= (b.max_inbound_bytes, b.lower_bound_bytes)


def test_aligned_tp2_dp2_to_tp4_moves_nothing():
    """Every TP=4 shard lies inside a TP=2 shard: with engine ranks (0, 2, 1, 3) all copies are local."""
    spec = ModelSpec(
        num_layers=2, hidden_size=64, num_heads=8, num_kv_heads=4, head_dim=8, ffn_size=96,
        vocab_size=1000, tie_embeddings=True, qk_norm=True,
    )  # fmt: skip
    src, dst = ParallelLayout.megatron(tp=2, dp=2), ParallelLayout.vllm(tp=4)
    placement = aligned_colocated(spec, src, dst)
    assert placement.dst_devices == (0, 2, 1, 3)
    report = make_plan(spec, src, dst, placement).report
    assert report.total_bytes == report.lower_bound_bytes == 0
    assert make_plan(spec, src, dst, Placement.colocated(4, 4)).report.max_inbound_bytes > 0


def test_greedy_assignment_finds_a_free_permutation_and_never_loses_to_rank_order():
    n = 11  # above the exact search
    order = [(3 * i + 5) % n for i in range(n)]
    lack = [[0 if d == order[r] else 10 + r + d for d in range(n)] for r in range(n)]

    def cost_of(matrix):
        def cost(devices):
            per_device = [matrix[r][d] for r, d in enumerate(devices)]
            return max(per_device), sum(per_device)

        return cost

    assert list(_greedy_then_swaps(lack, cost_of(lack))) == order
    # Greedy alone would give rank 0 device 1 here (cheaper for it), which costs the rest more.
    trap = [[5 if d == r else 9 for d in range(n)] for r in range(n)]
    trap[0][1] = 4
    result = _greedy_then_swaps(trap, cost_of(trap))
    assert cost_of(trap)(result) <= cost_of(trap)(tuple(range(n)))
