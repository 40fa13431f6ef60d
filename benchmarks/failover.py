"""Leader failover on 3 voters on loopback: kill -9 the leader, time until a submission
succeeds again. Repeated for --trials; the killed voter is restarted between trials.
`--state etcd`: 2 coordinator candidates (--candidates) on a real 3-member etcd instead
(issue 18: failover within the lease TTL + 1 s); `--state both`: both clusters, trials
alternating between them, figures for each under "raft" and "etcd".

Prints one JSON object: median_s, p99_s (kill -> first acknowledged submission, from a
client that starts submitting right at the kill), client_outage_s (median gap between the
last acknowledgement before the kill and the first after it, for a client submitting
continuously), duplicates (request ids stored twice: must be 0).
Compare: etcd 3.4 on the same machine, median 1.24 s, p99 1.75 s, ~5 s client outage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _backends import start_backend  # noqa: E402
from _common import emit  # noqa: E402

from lepton.common.errors import from_rpc_error  # noqa: E402
from lepton.common.grpc_util import CHANNEL_OPTIONS  # noqa: E402
from lepton.v1 import coordinator_pb2, coordinator_pb2_grpc, tasks_pb2  # noqa: E402

ATTEMPT_TIMEOUT_S = 0.5  # what a client that wants fast failover sets per attempt


class Cluster:
    def __init__(self, state: str, voters: int, election_timeout: float, lease_ttl: float):
        extra = (["--etcd-lease-ttl", str(int(lease_ttl))] if state == "etcd"
                 else ["--election-timeout", str(election_timeout)])
        self.backend = start_backend(state, voters, *extra)
        self.addrs = [a.address for a in self.backend.agents]
        self.agents = {a.address: a for a in self.backend.agents}
        self.channels = {a: grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in self.addrs}
        self.current = self.addrs[0]

    def restart(self, addr: str) -> None:
        self.agents[addr] = self.backend.restart(addr)

    def _next(self) -> str:
        return self.addrs[(self.addrs.index(self.current) + 1) % len(self.addrs)]

    async def submit(self, request_id: str) -> bool:
        """One attempt at the current address; follows leader hints. True when acknowledged."""
        stub = coordinator_pb2_grpc.CoordinatorStub(self.channels[self.current])
        spec = tasks_pb2.TaskSpec(argv=["true"], constraints={"bench": "nowhere"}, request_id=request_id)
        try:
            await stub.SubmitTask(coordinator_pb2.SubmitTaskRequest(spec=spec), timeout=ATTEMPT_TIMEOUT_S)
            return True
        except grpc.aio.AioRpcError as rpc_err:
            leader = getattr(from_rpc_error(rpc_err), "leader", "")
            if leader in self.channels:
                self.current = leader
            else:
                self.current = self._next()
            return False

    async def submit_until_acked(self, request_id: str) -> float:
        while not await self.submit(request_id):
            await asyncio.sleep(0.01)
        return time.monotonic()

    async def leader(self) -> str:
        while True:
            stub = coordinator_pb2_grpc.CoordinatorStub(self.channels[self.current])
            try:
                st = await stub.GetClusterStatus(coordinator_pb2.GetClusterStatusRequest(), timeout=1)
                if st.leader and all(v.lag == 0 for v in st.voters):
                    self.current = st.leader
                    return st.leader
            except grpc.aio.AioRpcError as rpc_err:
                leader = getattr(from_rpc_error(rpc_err), "leader", "")
                self.current = leader if leader in self.channels else self._next()
            await asyncio.sleep(0.05)

    async def count_duplicates(self) -> int:
        stub = coordinator_pb2_grpc.CoordinatorStub(self.channels[await self.leader()])
        tasks = (await stub.ListTasks(coordinator_pb2.ListTasksRequest(), timeout=10)).tasks
        ids = [t.spec.request_id for t in tasks]
        return len(ids) - len(set(ids))

    async def stop(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        self.backend.stop()


async def trial(cluster: Cluster) -> tuple[float, float]:
    leader = await cluster.leader()
    # A steady client, submitting every 10 ms, shows the outage a user sees.
    last_ack_before = time.monotonic()
    for _ in range(20):
        if await cluster.submit(uuid.uuid4().hex):
            last_ack_before = time.monotonic()
        await asyncio.sleep(0.01)
    agent = cluster.agents[leader]
    os.kill(agent.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    agent.proc.wait()
    agent.log.close()
    first_ack = await cluster.submit_until_acked(uuid.uuid4().hex)
    cluster.restart(leader)
    await cluster.leader()  # all three caught up before the next trial
    return first_ack - killed_at, first_ack - last_ack_before


def figures(failovers: list[float], outages: list[float]) -> dict:
    failovers = sorted(failovers)
    return {
        "trials": len(failovers),
        "median_s": round(statistics.median(failovers), 3),
        "p99_s": round(failovers[min(len(failovers) - 1, int(0.99 * len(failovers)))], 3),
        "max_s": round(failovers[-1], 3),
        "client_outage_s": round(statistics.median(outages), 3),
        "client_outage_max_s": round(max(outages), 3),
    }


async def run(state: str, trials: int, election_timeout: float, lease_ttl: float, candidates: int) -> dict:
    names = ["raft", "etcd"] if state == "both" else [state]
    clusters: dict[str, Cluster] = {}
    try:
        for name in names:
            clusters[name] = Cluster(name, candidates if name == "etcd" else 3, election_timeout, lease_ttl)
        results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in names}
        for _ in range(trials):
            for name in names:  # alternating, so drift weighs on both alike
                f, o = await trial(clusters[name])
                results[name][0].append(f)
                results[name][1].append(o)
        out = {}
        for name in names:
            doc = figures(*results[name])
            doc["duplicates"] = await clusters[name].count_duplicates()
            if name == "etcd":
                doc.update(candidates=candidates, lease_ttl_s=lease_ttl)
            else:
                doc["election_timeout_s"] = election_timeout
            out[name] = doc
        if state != "both":
            return {"state": state, **out[state]}
        return {"state": "both", **out,
                "etcd_median_over_raft": round(out["etcd"]["median_s"] / out["raft"]["median_s"], 3)}
    finally:
        for cluster in clusters.values():
            await cluster.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--state", choices=["raft", "etcd", "both"], default="raft",
                   help="the built-in Raft (3 voters), etcd (3 members, --candidates agents), or both")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--election-timeout", type=float, default=1.0, help="the agents' default is 1 s")
    p.add_argument("--lease-ttl", type=float, default=2.0, help="etcd: --etcd-lease-ttl (default 2 s)")
    p.add_argument("--candidates", type=int, default=2, help="etcd: coordinator candidates (default 2)")
    args = p.parse_args()
    emit(asyncio.run(run(args.state, args.trials, args.election_timeout, args.lease_ttl, args.candidates)))


if __name__ == "__main__":
    main()
