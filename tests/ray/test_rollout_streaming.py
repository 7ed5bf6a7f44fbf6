"""The rollout role's streaming endpoints on a local Ray cluster, with a real StreamStore.

Two rollout workers generate in the background; finished groups go from each worker straight into
the store; the driver only submits prompts, polls metadata and takes the samples. A weight write
lands in the middle of the responses and every token records the version that sampled it.
"""

from __future__ import annotations

import sys
import time

import pytest
import ray
import torch
from tiny_job import tiny_model

from tidal.config import load_config
from tidal.config.schema import PoolConfig
from tidal.config.streaming import StreamingConfig
from tidal.controller.resource_pool import ResourcePool
from tidal.controller.worker_group import WorkerGroup
from tidal.dataflow.batch import Batch
from tidal.dataflow.store import StreamStore
from tidal.dataflow.tokenizer import load_tokenizer
from tidal.tasks.prepare import prepare_model
from tidal.workers.endpoint import Dispatch, endpoint
from tidal.workers.roles.rollout import RolloutRole

pytestmark = pytest.mark.ray

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

MAX_NEW, N, NUM_PROMPTS, PROMPT_WIDTH = 48, 2, 6, 24
COLUMNS = [
    "prompt_ids",
    "prompt_mask",
    "uid",
    "seed",
    "ground_truth",
    "response_ids",
    "response_mask",
    "rollout_log_probs",
    "policy_version",
    "response_text",
    "token_versions",
    "truncated",
]


class WeightWritingRollout(RolloutRole):
    """The rollout role plus a stand-in for the cross-pool weight sync, which calls `write_weights`
    in the worker: once `num_tokens` tokens are generated, scale every weight in place."""

    @endpoint(Dispatch.ALL)
    def write_after(self, num_tokens: int, scale: float, version: int) -> int:
        deadline = time.monotonic() + 30
        while self.streaming.batcher.num_generated_tokens < num_tokens:
            assert time.monotonic() < deadline, "the generator made no progress"
            time.sleep(0.001)

        def write(params: dict[str, torch.Tensor]) -> int:
            for param in params.values():
                param.mul_(scale)
            return len(params)

        return self.write_weights(write, version)


def prompts(tokenizer_path: str) -> Batch:
    tokenizer = load_tokenizer(tokenizer_path)
    texts = [f"{a}+{b}=" for a, b in [(1, 2), (12, 7), (3, 45), (9, 9), (20, 1), (5, 66)]]
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    return Batch.from_dict(
        {"prompt_ids": ids, "prompt_mask": mask, "seed": torch.arange(NUM_PROMPTS, dtype=torch.long)},
        non_tensors={"uid": [f"p{i}" for i in range(NUM_PROMPTS)], "ground_truth": texts},
    )


def test_stream_into_the_store_with_a_weight_write_mid_generation(tmp_path):
    cfg = load_config(
        None,
        [
            *tiny_model(tmp_path / "model"),
            "data.task.type=arithmetic",
            f"data.max_prompt_length={PROMPT_WIDTH}",
            f"rollout.sampling.n={N}",
            f"rollout.sampling.max_new_tokens={MAX_NEW}",
            "rollout.sampling.temperature=1.0",
        ],
    )
    prepare_model(cfg.model, cfg.data)
    store = StreamStore(("train",), capacity=NUM_PROMPTS * N)
    group = WorkerGroup(
        ResourcePool("rollout_stream", PoolConfig(num_workers=2, cpus_per_worker=0.5)),
        {"rollout": WeightWritingRollout},
        cfg,
    )
    try:
        group.rollout.stream_start(store, StreamingConfig(wait_timeout_s=60, interrupt_on_sync=True))
        batch = prompts(cfg.model.path)
        assert group.rollout.stream_submit(batch) == [3, 3]  # DP_SPLIT: three groups per rank
        # Two tokens per running sequence, then new weights (version 1) on both ranks.
        written = group.rollout.write_after(2 * 3 * N, 1.5, 1)
        assert len(set(written)) == 1 and written[0] > 0  # what `write` returned, per rank
        finished, deadline = [], time.monotonic() + 60
        while len(finished) < NUM_PROMPTS:
            assert time.monotonic() < deadline, finished
            polls = group.rollout.stream_poll()
            finished += [f for poll in polls for f in poll["finished"]]
            time.sleep(0.02)
        assert [poll["rank"] for poll in polls] == [0, 1]
        assert sum(poll["generated_tokens"] for poll in polls) == sum(f[4] for f in finished)
        assert all(poll["weights_version"] == 1 and poll["running_sequences"] == 0 for poll in polls)
        assert group.rollout.stream_stop() == [[], []]

        got = store.take("train", COLUMNS, NUM_PROMPTS * N, sampler="group")
        assert sorted(got.ids) == sorted(f"p{i}/{j}" for i in range(NUM_PROMPTS) for j in range(N))
        samples = got.fetch()
        assert sorted(samples.keys()) == sorted(COLUMNS)
        assert samples["response_ids"].shape == (NUM_PROMPTS * N, MAX_NEW)
        assert samples["prompt_ids"].shape == (NUM_PROMPTS * N, PROMPT_WIDTH)
        by_uid = {f[0]: f for f in finished}
        mask = samples["response_mask"].bool()
        spans = 0
        for row in range(len(samples)):
            uid = samples["uid"][row]
            assert samples["ground_truth"][row] == batch["ground_truth"][int(uid[1:])]
            versions = samples["token_versions"][row][mask[row]].tolist()
            assert versions == sorted(versions) and set(versions) <= {0, 1}  # never back in time
            assert (samples["token_versions"][row][~mask[row]] == 0).all()
            assert int(samples["policy_version"][row]) == min(versions) == got.versions[row]
            assert by_uid[uid][2] == "done" and not bool(samples["truncated"][row])
            spans += set(versions) == {0, 1}
        assert spans > 0, "no response spans the weight update"
        assert (samples["rollout_log_probs"][mask] < 0).all()
    finally:
        group.shutdown()
        store.shutdown()
