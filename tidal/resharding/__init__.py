"""Moving weights from a training layout to a generation layout (see DESIGN.md, "Parallel layouts").

- spec.py           the canonical (Hugging Face) tensors: `ModelSpec` (structured), `TensorSpec` (by name)
- layout.py         parallel layouts: which rectangle of which canonical tensor each rank holds
- megatron_names.py, vllm_names.py   Megatron-core and vLLM names and fused layouts
- planner.py        the pure, cached plan: local copies, balanced transfers, buckets, byte report
- alignment.py      colocated placement of engine ranks on the devices that already hold their shards
- apply.py          in-memory reference executor; materialize / assemble (conversions without a plan)
- messages.py       how one device's share of a plan becomes the buffers it exchanges
- executor.py       runs one device's share over a transport (`ReshardExecutor`)
- verify.py         checksums of every target rectangle against its source
- transports/       in-process copy, torch.distributed p2p (gloo/NCCL), bridge-group p2p, CUDA IPC
- sync.py           a process's end of a trainer -> engine sync (`Resharder`, `WeightSource/Target`)
- fsdp_source.py    an FSDP2 module's shards as a `WeightSource`
- colocated.py      the worker's actor -> rollout sync between roles of one process
- bridge_group.py   a process group across two pools' workers, beside each one's own world
- disaggregated.py  the worker's end of an actor pool -> rollout pool sync over that group
"""
