"""AReaL's admission rule (controller/streaming/admission.py) and the deterministic schedule's versions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.controller.streaming.admission import Admission
from tidal.controller.streaming.feeders import batch_of, batch_sample_ids, generation_version


def test_room_follows_the_rule_and_grows_with_the_trainer_version():
    adm = Admission(max_staleness=1, batch_samples=8)
    assert adm.room(version=0) == 16  # (eta + v + 1) * B with nothing accepted or running
    adm.submit(0, 12)
    assert adm.room(0) == 4 and adm.groups_allowed(0, group_size=4) == 1
    adm.finish(0, 12, kept=12)
    assert adm.room(0) == 4  # finished samples stay counted until trained or given back
    assert adm.room(1) == 12  # the trainer moved on: one more batch of room


def test_dropped_samples_give_their_budget_back():
    adm = Admission(max_staleness=0, batch_samples=8)
    adm.submit(0, 8)
    adm.finish(0, 8, kept=5)  # 3 dropped on the rollout side (straggler cap)
    assert adm.room(0) == 3 and adm.returned == 3
    adm.give_back(4)  # filtered by dynamic sampling / refused as stale at the trainer
    assert adm.room(0) == 7 and adm.returned == 7
    with pytest.raises(ValueError, match="cannot give back"):
        adm.give_back(2)


def test_ranks_share_one_budget_and_work_goes_to_the_least_loaded():
    adm = Admission(max_staleness=1, batch_samples=4, num_ranks=2)
    adm.submit(adm.least_loaded_rank(), 4)
    assert adm.least_loaded_rank() == 1
    adm.submit(1, 4)
    assert adm.room(0) == 0  # 8 running across both ranks fill (1 + 0 + 1) * 4
    with pytest.raises(ValueError, match="rollout rank 0 finished 8"):
        adm.finish(0, 8, kept=8)


@settings(max_examples=80, deadline=None)
@given(
    eta=st.integers(0, 3),
    ops=st.lists(st.tuples(st.sampled_from(["submit", "finish", "train", "drop"]), st.integers(1, 3)), max_size=60),
)
def test_accepted_plus_running_never_exceeds_the_bound(eta, ops):
    """Whatever the interleaving, what was ever kept or is running stays within (eta + v + 1) * B."""
    group, batch = 2, 4
    adm = Admission(max_staleness=eta, batch_samples=batch)
    version = trained = 0
    for op, k in ops:
        if op == "submit":
            for _ in range(min(k, adm.groups_allowed(version, group))):
                adm.submit(0, group)
        elif op == "finish" and adm.running[0] >= group:
            adm.finish(0, group, kept=group if k > 1 else 0)
        elif op == "train" and adm.accepted - trained >= batch:
            trained += batch
            version += 1
        elif op == "drop" and adm.accepted - trained >= 1:
            adm.give_back(1)
        assert adm.accepted + adm.total_running <= (eta + version + 1) * batch


def test_deterministic_schedule_versions_and_ids():
    assert [generation_version(k, 0) for k in (1, 2, 3)] == [0, 1, 2]  # sync: batch k by version k-1
    assert [generation_version(k, 2) for k in (1, 2, 3, 4, 5)] == [0, 0, 0, 1, 2]
    ids = batch_sample_ids(12, 3)
    assert ids == sorted(ids) and {batch_of(i) for i in ids} == {12}
    assert sorted(batch_sample_ids(9, 2) + batch_sample_ids(10, 2)) == batch_sample_ids(9, 2) + batch_sample_ids(10, 2)


def test_checkpoint_keeps_accepted_and_forgets_running():
    adm = Admission(max_staleness=1, batch_samples=4)
    adm.submit(0, 4)
    adm.finish(0, 4, kept=4)
    adm.submit(0, 2)
    restored = Admission(max_staleness=1, batch_samples=4)
    restored.load_state_dict(adm.state_dict())
    assert restored.accepted == 4 and restored.total_running == 0  # running ones are re-issued
