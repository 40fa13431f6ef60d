"""A graceful stop that never finishes still ends the agent's process, in bounded time, with a
line naming what was stuck (agent/daemon.py `run_agent`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

STUCK_AGENT = textwrap.dedent("""
    import asyncio, os, signal, sys
    from lepton.agent import daemon
    from lepton.common.config import AgentConfig

    class StuckAgent:
        def __init__(self, config):
            self.data_dir = config.data_dir
            self.failed = asyncio.Event()
            self.refusal = self.failure = None

        async def start(self):  # SIGTERM once running, as a supervisor would send it
            asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)

        async def stop(self, *, leave=True):
            await asyncio.Event().wait()  # a step that never ends

    daemon.Agent = StuckAgent
    daemon.STOP_SLACK_S = 1.0  # the bound: 2 x 0.2 s of grace + this
    asyncio.run(daemon.run_agent(AgentConfig(data_dir=sys.argv[1], shutdown_grace_s=0.2)))
    print("returned")  # never: the process ends in run_agent
""")


def test_a_stop_that_never_finishes_exits_1_naming_the_stuck_task(tmp_path):
    done = subprocess.run([sys.executable, "-c", STUCK_AGENT, str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "returned" not in done.stdout
    [line] = [x for x in done.stderr.splitlines() if x.startswith("lepton-agent: ")]
    assert "stopping took over 1.4s; still running:" in line, line
    assert "at stop (<string>" in line, line  # the stuck coroutine and where it waits
