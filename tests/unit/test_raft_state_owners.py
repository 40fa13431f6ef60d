"""The owners of RaftCore's leader and membership state, on their own: ProgressTracker's
majority arithmetic and Configuration's fallbacks on truncation, compaction and install."""

from __future__ import annotations

from lepton.coordinator.raft.membership import Configuration, decode_config, encode_config
from lepton.coordinator.raft.progress import ProgressTracker
from lepton.coordinator.storage.log_store import Entry, Snapshot

THREE = {"n1": "a:1", "n2": "a:2", "n3": "a:3"}


def test_the_commit_index_is_what_a_majority_holds():
    t = ProgressTracker()
    t.reset(["n2", "n3", "n4", "n5"], next_index=11, now=0.0)
    for peer, match in (("n2", 9), ("n3", 7), ("n4", 3), ("n5", 0)):
        t[peer].match = match
    others = ["n2", "n3", "n4", "n5"]
    assert t.quorum_match(others, own_match=10, quorum=3) == 7
    # A leader that removed itself does not count itself.
    assert t.quorum_match(others, own_match=None, quorum=3) == 3


def test_read_acks_and_activity_count_voters_only_and_start_a_new_round():
    t = ProgressTracker()
    t.reset(["n2", "n3"], next_index=1, now=0.0)
    t.add("learner", next_index=1, now=0.0)
    t["n2"].read_ack, t["n3"].read_ack, t["learner"].read_ack = 5, 2, 9
    assert t.quorum_read_ack(["n2", "n3"], need=1) == 5
    assert t.quorum_read_ack(["n2", "n3"], need=2) == 2
    t["n3"].recent_active = t["learner"].recent_active = True
    assert t.recently_active(["n2", "n3"]) == 1
    assert t.recently_active(["n2", "n3"]) == 0  # reset by the previous count


def test_tracking_a_new_configuration_keeps_known_progress():
    t = ProgressTracker()
    t.reset(["n2", "n3"], next_index=5, now=0.0)
    t["n2"].match = 4
    assert t.track(["n2", "n4"], next_index=8, now=1.0) == ["n3"]
    assert t.targets == ["n2", "n4"] and t["n2"].match == 4 and t["n4"].next == 8
    assert t.remove("n4") and not t.remove("n4") and t.targets == ["n2"]


def config_entry(index: int, voters: dict) -> Entry:
    return Entry(index, 1, encode_config(voters))


def test_a_truncated_configuration_falls_back_to_the_one_before():
    conf = Configuration("n1", THREE, None)
    conf.set(*conf.initial())
    four = {**THREE, "n4": "a:4"}
    five = {**four, "n5": "a:5"}
    found = conf.appended([Entry(1, 1, b"cmd"), config_entry(2, four), config_entry(3, five)])
    assert found == [(four, 2), (five, 3)]
    for voters, index in found:
        conf.set(voters, index)
    assert conf.quorum == 3 and conf.others == ["n2", "n3", "n4", "n5"]
    assert conf.truncated(4) is None  # no configuration entry was cut
    assert conf.truncated(3) == (four, 2)
    assert conf.truncated(2) == (THREE, 0)  # back to the bootstrap voters


def test_a_compacted_configuration_lives_on_in_the_snapshot():
    conf = Configuration("n1", THREE, None)
    four = {**THREE, "n4": "a:4"}
    conf.appended([config_entry(2, four)])
    assert decode_config(conf.compacted(5)) == four
    assert conf.at_or_before(5) == (5, four)
    assert conf.truncated(6) is None  # the entry is gone with the log; the snapshot holds it


def test_an_installed_snapshot_sets_its_configuration():
    conf = Configuration("n1", THREE, None)
    conf.set(*conf.initial())
    two = {"n1": "a:1", "n2": "a:2"}
    assert conf.installed(Snapshot(9, 2, b"", encode_config(two))) == (two, 9)
    restarted = Configuration("n1", THREE, Snapshot(9, 2, b"", encode_config(two)))
    assert restarted.initial() == (two, 9)
    # A snapshot without a configuration keeps the current one, unless it is newer.
    conf.set(two, 9)
    assert conf.installed(Snapshot(12, 2, b"", b"")) is None and conf.at_or_before(12) == (12, two)
    assert conf.installed(Snapshot(4, 2, b"", b"")) == (THREE, 0)
