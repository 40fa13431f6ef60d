"""The leader-freeze chaos scenario, shared by test_raft_cluster (a few rounds) and
benchmarks/chaos.py (20 rounds, figures as JSON).

3 voters (or 3 etcd candidates) + 2 workers. Each round submits tasks that run across the fault, then stops the
leader with SIGSTOP for 2-8 s and continues it once a new leader is elected. Figures: how
many tasks were acknowledged, lost (acknowledged, then missing), failed (not succeeded),
overlapped (their completion recorded more than once), and the nodes marked down that were
not a frozen leader (from the voters' logs).
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

from lepton.client import Client, LeptonError
from tests.integration.cluster import (
    leader_of,
    servers,
    start_etcd_candidates,
    start_voters,
    wait_until,
)

TASKS_PER_ROUND = 4
DOWN_LINE = re.compile(r"node (\S+) \(\S+\) is down: ")


def submit_retrying(c: Client, request_id: str, **kw) -> str:
    """Submit until acknowledged (the same request id: never stored twice)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return c.submit(request_id=request_id, **kw).id
        except LeptonError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def freeze_the_leader(start, workdir: Path, rounds: int, seed: int = 1, *,
                      etcd_endpoints: list[str] | None = None) -> dict:
    """Run `rounds` leader freezes; returns the figures. `start` is the agents fixture.
    With `etcd_endpoints`: 3 candidates keeping the state in that etcd instead of 3 Raft voters."""
    rng = random.Random(seed)
    voters = start_etcd_candidates(start, etcd_endpoints, 3) if etcd_endpoints else start_voters(start, 3)
    workers = [start(f"worker-{i}", "--join", servers(voters), "--labels", "pool=work", "--cpus", "8")
               for i in (1, 2)]
    ran = workdir / "ran"
    acked: list[str] = []
    frozen: set[str] = set()
    freezes: list[float] = []
    with Client(servers(voters), timeout=30) as c:
        wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == 5, timeout=60, what="5 nodes")
        for round_ in range(rounds):
            freeze = rng.uniform(2.0, 8.0)
            batch = [submit_retrying(c, f"freeze-{round_}-{i}", constraints={"pool": "work"}, cpu=0.1,
                                     max_retries=0,
                                     shell=f'sleep {freeze + 3:.1f}; echo "$LEPTON_TASK_ID $LEPTON_ATTEMPT" >> {ran}')
                     for i in range(TASKS_PER_ROUND)]
            acked += batch
            wait_until(lambda b=batch: all(t.state == "running" for t in c.list() if t.id in b),
                       timeout=60, what="the round's tasks running")
            victim = leader_of(c, voters)
            frozen.add(victim.name)
            os.kill(victim.proc.pid, signal.SIGSTOP)
            try:
                time.sleep(freeze)
            finally:
                os.kill(victim.proc.pid, signal.SIGCONT)
            freezes.append(round(freeze, 1))
            wait_until(lambda: c.cluster_status().leader and
                       len([n for n in c.nodes() if n.state == "ready"]) == 5,
                       timeout=60, what="a leader and 5 ready nodes after the freeze")
        tasks = wait_until(lambda: (ts := [t for t in c.list() if t.id in set(acked)]) and
                           all(t.done for t in ts) and len(ts) == len(acked) and ts,
                           timeout=120, what="every acknowledged task to finish")
    completions = Counter(line.split()[0] for line in ran.read_text().splitlines())
    down = set()
    for agent in [*voters, *workers]:
        down |= set(DOWN_LINE.findall(agent.log_path.read_text(errors="replace")))
    return {
        "rounds": rounds,
        "faults": len(freezes),
        "freeze_s": freezes,
        "acked": len(acked),
        "lost": len(set(acked) - {t.id for t in tasks}),
        "failed": sum(t.state != "succeeded" for t in tasks),
        "failed_reasons": sorted({t.reason for t in tasks if t.state != "succeeded"}),
        "overlaps": sum(n > 1 for n in completions.values()),
        "never_completed": len(set(acked) - set(completions)),
        "requeued": sum(t.attempt > 1 for t in tasks),
        "wrongly_down": sorted(down - frozen),
    }


def kill_and_stop_while_submitting(start, workdir: Path, voters: list, rounds: int = 4) -> tuple[list, list, list]:
    """A client submits continuously (retrying each request id until acknowledged) while the
    leader is killed (-9, then restarted) and SIGSTOPped in turn, `rounds` times, with 2
    workers running the tasks. Returns (acknowledged request ids, every task at the end,
    the lines "$LEPTON_TASK_ID $LEPTON_ATTEMPT" the attempts wrote). `voters`: Raft voters
    or etcd candidates, already started with `start` (the agents fixture)."""
    # A SIGSTOPped leader holds the workers' streams until they give up on its answers: the
    # new leader's failover grace (common/failover.py) covers that.
    ran = workdir / "ran"
    for i in (1, 2):
        start(f"worker-{i}", "--join", servers(voters), "--labels", "pool=work")
    acked: list[str] = []
    stop = threading.Event()

    def submitter() -> None:
        with Client(servers(voters), timeout=30) as c:
            i = 0
            while not stop.is_set():
                rid = f"chaos-{i}"
                while not stop.is_set():  # retry the same request id until acknowledged
                    try:
                        c.submit(shell=f'echo "$LEPTON_TASK_ID $LEPTON_ATTEMPT" >> {ran}',
                                 constraints={"pool": "work"}, cpu=0.1, request_id=rid)
                        acked.append(rid)
                        break
                    except LeptonError:
                        time.sleep(0.05)
                i += 1

    # A daemon, stopped however this ends: after a failed wait it retried against dead agents
    # for ever and the test process never exited.
    thread = threading.Thread(target=submitter, daemon=True)
    with Client(servers(voters), timeout=30) as c:
        wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == len(voters) + 2,
                   timeout=60, what="every node ready")
        thread.start()
        try:
            for round_ in range(rounds):
                wait_until(lambda r=round_: len(acked) > 5 * (r + 1), timeout=60, what="progress")
                victim = leader_of(c, voters)
                if round_ % 2 == 0:
                    victim.kill9()
                    wait_until(lambda v=victim: c.cluster_status().leader not in ("", v.address), timeout=60,
                               what="failover")
                    victim.start(timeout=60)  # beside a busy cluster a start takes a while
                else:
                    os.kill(victim.proc.pid, signal.SIGSTOP)
                    wait_until(lambda v=victim: c.cluster_status().leader not in ("", v.address), timeout=60,
                               what="failover")
                    os.kill(victim.proc.pid, signal.SIGCONT)
            wait_until(lambda: len(acked) > 30, timeout=60, what="more progress after the chaos")
        finally:
            stop.set()
            thread.join(60)
        tasks = wait_until(lambda: (ts := c.list()) and all(t.done for t in ts) and ts,
                           timeout=60, what="every task to finish")
    return acked, tasks, ran.read_text().split("\n")[:-1]


def check_each_acked_once(acked: list, tasks: list, lines: list) -> None:
    """Every acknowledged submission stored exactly once, every task succeeded, no attempt ran twice."""
    by_request = Counter(t.request_id for t in tasks)
    assert set(acked) <= set(by_request), "an acknowledged submission was lost"
    assert all(n == 1 for n in by_request.values()), "a submission was stored twice"
    assert all(t.state == "succeeded" for t in tasks), [(t.id, t.state, t.reason, t.history) for t in tasks if t.state != "succeeded"]
    assert len(lines) == len(set(lines)), "an attempt ran twice"
    assert {line.split()[0] for line in lines} == {t.id for t in tasks}
