"""signal_group never signals the caller's own process group or init's."""

from __future__ import annotations

import signal

from lepton.agent.tasks import task_proc as tp


def test_pid_zero_or_one_is_never_signalled(monkeypatch):
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(tp.os, "killpg", lambda pgid, sig: sent.append((pgid, sig)))
    # An attempt whose spawn is pending has pid 0: killpg(0) would kill the agent's own group.
    assert tp.signal_group(0, signal.SIGKILL) is False
    assert tp.signal_group(1, signal.SIGKILL) is False
    assert tp.signal_group(-5, signal.SIGKILL) is False
    assert sent == []
    assert tp.signal_group(4242, signal.SIGTERM) is True
    assert sent == [(4242, signal.SIGTERM)]
