"""What a rollout pool restart decides without any process (controller/streaming/recovery.py): which
requests of the dead pool are kept (their whole group reached the store) and which are issued again,
with the admission budget settled; and which errors mean an actor died."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import ray
import torch

from tidal.controller.streaming.admission import Admission
from tidal.controller.streaming.feeders import settle_in_flight
from tidal.controller.streaming.recovery import RolloutRecovery, complete_groups, is_actor_death
from tidal.dataflow.batch import Batch

N = 4  # samples per group


def row(uid: str) -> Batch:
    return Batch.from_dict({"prompt_ids": torch.ones(1, 3, dtype=torch.long)}, {"uid": [uid]})


def test_a_group_in_the_store_is_kept_and_the_others_are_issued_again_with_their_budget():
    adm = Admission(max_staleness=1, batch_samples=8, num_ranks=2)
    in_flight = {uid: (rank, row(uid), 0.0) for uid, rank in (("r1", 0), ("r2", 1), ("r3", 0), ("r4", 1))}
    for rank, _, _ in in_flight.values():
        adm.submit(rank, N)
    stored = {"r2": True, "r3": False}  # r3: admitted by a put that never committed
    kept, lost = settle_in_flight(in_flight, stored, adm, N)
    assert list(kept) == ["r2"]
    assert [r["uid"][0] for r in lost] == ["r1", "r3", "r4"]  # in issue order
    assert adm.running == [0, 0] and adm.accepted == N  # nothing counted twice or left running
    assert adm.room(0) == 2 * 8 - N


def test_only_groups_whose_fields_are_committed_count_as_stored():
    samples = [(f"r1/{j}", {}, {"response_ids": (0, "c", j)}, []) for j in range(N)]
    samples += [(f"r2/{j}", {}, {}, []) for j in range(N)]  # admitted, the worker died before commit
    assert complete_groups(samples) == {"r1": True, "r2": False}


def test_an_actor_death_is_recognised_through_the_errors_raised_from_it():
    died = ray.exceptions.ActorDiedError()
    try:
        try:
            raise died
        except ray.exceptions.RayActorError as err:
            raise RuntimeError("WeightBridge x: rollout rank 0 (rollout) failed syncing version 3") from err
    except RuntimeError as wrapped:
        assert is_actor_death(wrapped)
    assert not is_actor_death(RuntimeError("a gloo error"))


def test_a_death_after_max_rollout_restarts_ends_the_run_naming_the_setting():
    gone = SimpleNamespace(workers=[])  # a pool with no live worker to ask
    job = SimpleNamespace(
        cfg=SimpleNamespace(rollout=SimpleNamespace(pool="rollout")),
        cluster=SimpleNamespace(group_of=lambda role: gone),
    )
    source = SimpleNamespace(settings=SimpleNamespace(max_rollout_restarts=0), deterministic=False, job=job)
    recovery = RolloutRecovery(source)
    with pytest.raises(RuntimeError, match=r"giving up \(trainer.streaming.max_rollout_restarts=0\)"):
        recovery.restart(3, ray.exceptions.ActorDiedError())
    assert recovery.restarts == 0
    source.deterministic = True
    with pytest.raises(RuntimeError, match="deterministic schedule does not restart"):
        RolloutRecovery(source).restart(3, ray.exceptions.ActorDiedError())
