"""Issue 4, voter changes end to end: real agents on loopback, `lepton-ctl cluster peers`."""

from __future__ import annotations

import json

import pytest

from lepton.client import Client
from tests.integration.cluster import (
    RAFT_FAST,
    leader_of,
    run_ctl,
    servers,
    start_voters,
    wait_until,
)

pytestmark = pytest.mark.integration


def voter_addresses(status) -> set[str]:
    return {v.address for v in status.voters if v.role != "learner"}


def test_add_a_voter_kill_the_leader_then_remove_one(agents):
    voters = start_voters(agents)
    extra = agents("extra", "--join", servers(voters), "--join-as-voter", *RAFT_FAST)
    worker = agents("worker", "--join", servers(voters))
    everyone = voters + [extra]
    with Client(servers(everyone), timeout=30) as c:
        wait_until(lambda: c.cluster_status().leader, what="a leader")
        acked = [c.submit(["true"], constraints={"pool": "none"}).id for _ in range(5)]

        out = run_ctl("-o", "json", "cluster", "peers", "add", extra.address, server=servers(voters), check=True)
        assert extra.address in {v["address"] for v in json.loads(out.stdout)["voters"]}
        status = c.cluster_status()
        assert voter_addresses(status) == {v.address for v in everyone}
        out = run_ctl("cluster", "status", server=servers(voters), check=True)
        assert extra.address in out.stdout

        # Kill -9 the old leader: 3 of 4 voters are left, so every commit needs the new one.
        old = leader_of(c, voters)
        old.kill9()
        wait_until(lambda: c.cluster_status().leader not in ("", old.address), timeout=60, what="a new leader")
        acked += [c.submit(["true"], constraints={"pool": "none"}).id for _ in range(5)]
        assert voter_addresses(c.cluster_status()) == {v.address for v in everyone}

        # Remove the dead voter; the three left still commit.
        run_ctl("cluster", "peers", "remove", old.address, server=servers(everyone), check=True)
        status = c.cluster_status()
        assert voter_addresses(status) == {v.address for v in everyone if v is not old}
        acked.append(c.submit(["true"], constraints={"pool": "none"}).id)
        assert {t.id for t in c.list()} >= set(acked)

        # Refusals: one line on stderr, non-zero exit, nothing changed.
        for args, words in [
            (("add", "not-an-address"), "not HOST:PORT"),
            (("add", extra.address), "already a voter"),
            (("remove", old.address), "not a voter"),
            (("add", worker.address), "runs no Raft node"),
        ]:
            out = run_ctl("cluster", "peers", *args, server=servers(everyone))
            assert out.returncode != 0, out
            assert words in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert voter_addresses(c.cluster_status()) == {v.address for v in everyone if v is not old}
