"""The simulation's invariant checks must be able to fail: break Raft on purpose."""

from __future__ import annotations

import pytest

from lepton.coordinator.raft.core import RaftCore
from lepton.coordinator.raft.sim_checker import Checker, InvariantViolation
from lepton.coordinator.raft.sim_storage import SimLogStore
from lepton.coordinator.raft.simulation import SimulationFailure, run_seed
from lepton.coordinator.storage.log_store import Entry


class AnyLogWinsCore(RaftCore):
    """Sabotaged election restriction: votes for candidates with stale logs."""

    def _log_up_to_date(self, last_term: int, last_index: int) -> bool:
        return True


class EagerCommitCore(RaftCore):
    """Sabotaged commit rule: a leader counts only itself (commits before replicating)."""

    def _maybe_commit(self) -> None:
        if self.term_at(self._stable_last) == self.term and self._stable_last > self.commit:
            self.commit = self._stable_last


class StaleQuorumCore(RaftCore):
    """Sabotaged membership: majorities keep the size of the bootstrap voter set."""

    def _set_config(self, voters, index) -> None:  # type: ignore[no-untyped-def]
        super()._set_config(voters, index)
        self._conf.quorum = len(self._conf.bootstrap) // 2 + 1


def _first_failure(seeds: range, **kwargs: object) -> SimulationFailure:
    for seed in seeds:
        try:
            run_seed(seed, **kwargs)
        except SimulationFailure as err:
            return err
    pytest.fail(f"no seed in {seeds} caught the sabotage")


@pytest.mark.parametrize("core_cls", [AnyLogWinsCore, EagerCommitCore, StaleQuorumCore])
def test_sabotaged_core_is_caught(core_cls: type[RaftCore]) -> None:
    err = _first_failure(range(60), core_cls=core_cls)
    assert f"LEPTON_SIM_SEED={err.seed} .venv/bin/pytest tests/sim -q" in str(err)


def test_disk_that_does_not_fsync_is_caught() -> None:
    err = _first_failure(range(60), fsync=False)
    assert "replay: LEPTON_SIM_SEED=" in str(err)


def test_a_failing_seed_fails_the_same_way_on_replay() -> None:
    first = _first_failure(range(60), core_cls=AnyLogWinsCore)
    with pytest.raises(SimulationFailure) as again:
        run_seed(first.seed, core_cls=AnyLogWinsCore)
    assert again.value.reason == first.reason


def test_checker_rejects_two_leaders_in_one_term() -> None:
    checker = Checker()

    class FakeCore:
        term = 3
        first_index = 1

        def entry_at(self, index: int) -> None:
            return None

    checker.on_leader("n1", FakeCore())  # type: ignore[arg-type]
    with pytest.raises(InvariantViolation, match="election safety"):
        checker.on_leader("n2", FakeCore())  # type: ignore[arg-type]


def test_checker_rejects_different_commands_at_one_index() -> None:
    checker = Checker()
    checker.on_restore("n1", 0)
    checker.on_restore("n2", 0)
    checker.on_apply("n1", 1, b"a")
    with pytest.raises(InvariantViolation, match="state-machine safety"):
        checker.on_apply("n2", 1, b"b")


def test_checker_rejects_lost_and_duplicated_commands() -> None:
    checker = Checker()
    checker.on_ack(7, 3)
    with pytest.raises(InvariantViolation, match="lost"):
        checker.check_final([("n1", [1, 2])])
    with pytest.raises(InvariantViolation, match="more than once"):
        checker.check_final([("n1", [7, 7])])


def test_sim_storage_crash_keeps_synced_writes_and_loses_others() -> None:
    import random

    store = SimLogStore()
    store.append([Entry(1, 1, b"a")])
    store.sync()
    store.append([Entry(2, 1, b"b")])
    store.set_hard_state(2, "n1")
    lost = 0
    for seed in range(20):
        s = SimLogStore()
        s.append([Entry(1, 1, b"a")])
        s.sync()
        s.append([Entry(2, 1, b"b")])
        s.crash(random.Random(seed))
        assert s.last_index() in (1, 2)
        lost += s.last_index() == 1
    assert 0 < lost < 20  # sometimes an unsynced write reaches the disk anyway
    broken = SimLogStore(fsync=False)
    broken.append([Entry(1, 1, b"a")])
    broken.sync()
    broken.crash(random.Random(0))
    assert broken.last_index() == 0
    assert store.hard_state() == (2, "n1")


def test_sim_store_limits_bytes_like_the_real_ones() -> None:
    s = SimLogStore()
    s.append([Entry(i, 1, f"cmd{i}".encode()) for i in range(1, 6)])
    assert len(s.entries(1, 6, max_bytes=1)) == 1  # always at least one
    assert len(s.entries(1, 6, max_bytes=9)) == 2
    assert len(s.entries(1, 6)) == 5
