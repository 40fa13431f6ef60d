"""A put's commit is its point of no return: a Ctrl-C while the commit is in flight waits for
its outcome (client/data.py `_commit_past_interrupts`), so the caller learns whether the
dataset was recorded instead of guessing."""

from __future__ import annotations

import _thread
import threading

import pytest

from lepton.client.data import DataMethods, DatasetInfo, RecordedDespiteInterrupt
from lepton.common.errors import FailedPrecondition
from lepton.v1 import datasets_pb2 as dpb


class SlowCommit(DataMethods):
    """Only the commit: it interrupts the main thread, as a Ctrl-C would, while in flight."""

    def __init__(self, refuse: bool = False):
        self.refuse = refuse
        self.released = 0

    def commit_dataset(self, ds: dpb.Dataset, *, timeout: float | None = None) -> DatasetInfo:
        _thread.interrupt_main()  # the Ctrl-C lands while this call is on its way
        threading.Event().wait(0.2)  # the leader is still deciding
        if self.refuse:
            raise FailedPrecondition("a node went away")
        return DatasetInfo.from_proto(ds)

    def release(self) -> None:
        self.released += 1


@pytest.fixture(autouse=True)
def in_the_main_thread():
    assert threading.current_thread() is threading.main_thread(), "interrupts reach the main thread only"


def test_a_commit_that_lands_despite_a_ctrl_c_says_so_and_keeps_the_blobs():
    client, recorded = SlowCommit(), []
    with pytest.raises(RecordedDespiteInterrupt) as late:
        client._commit_past_interrupts(dpb.Dataset(name="cut", version=3), client.release, recorded)
    assert (late.value.dataset.name, late.value.dataset.version) == ("cut", 3)
    assert type(late.value.interrupt) is KeyboardInterrupt
    assert [d.name for d in recorded] == ["cut"] and client.released == 0


def test_a_refused_commit_interrupted_releases_the_blobs_and_is_a_plain_interrupt():
    client = SlowCommit(refuse=True)
    with pytest.raises(KeyboardInterrupt) as stopped:
        client._commit_past_interrupts(dpb.Dataset(name="cut"), client.release, [])
    assert type(stopped.value) is KeyboardInterrupt and client.released == 1


def test_a_ctrl_c_before_the_commit_is_sent_sends_nothing(monkeypatch):
    client = SlowCommit()
    sent = []
    client.commit_dataset = lambda ds, **_: sent.append(ds)  # type: ignore[method-assign]

    class InterruptedStart(threading.Thread):
        def start(self) -> None:
            raise KeyboardInterrupt  # as if Ctrl-C came while the thread was being started

    monkeypatch.setattr("lepton.client.data.threading.Thread", InterruptedStart)
    with pytest.raises(KeyboardInterrupt) as stopped:
        client._commit_past_interrupts(dpb.Dataset(name="cut"), client.release, [])
    assert type(stopped.value) is KeyboardInterrupt and client.released == 1 and not sent
