"""DRAFT. Job launch latency: "submit -> every rank past init_process_group", 2 nodes x 2
processes, gloo on CPU, all on this host.

- torchrun_s: two bare `python -m torch.distributed.run` processes (static rendezvous, node
  ranks 0 and 1), started together; the clock starts just before they are spawned.
- launcher_s: the same job through Lepton's `TorchLauncher` alone (two NodeLaunch, one per
  node rank, in this process): what our worker start-up costs, no coordinator involved.
- lepton_s: submit through the coordinator of 2 local agents -> all ranks ready
  (`lepton-ctl run --nodes 2 --nproc-per-node 2`'s path); overhead_s = lepton_s - torchrun_s.

Each rank writes the wall time right after `init_process_group` returns; a sample is the
latest of the four minus the start. The median of --repeats samples is reported, with all
samples. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, free_port  # noqa: E402

from lepton.workloads.torch_env import python_argv  # noqa: E402
from lepton.workloads.torch_launcher import NodeLaunch, run_node  # noqa: E402

NNODES, NPROC = 2, 2

WORKER = """import os, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
t = time.time()
with open(os.path.join(sys.argv[1], "ready_" + os.environ["RANK"]), "w") as f:
    f.write(repr(t))
dist.barrier()
dist.destroy_process_group()
"""


def _wait_ready(out: Path, start: float, procs_alive, timeout: float) -> float:
    """Seconds from `start` to the last rank's ready time. Raises RuntimeError on timeout."""
    deadline = time.monotonic() + timeout
    want = [out / f"ready_{r}" for r in range(NNODES * NPROC)]
    while True:
        if all(p.exists() and p.stat().st_size for p in want):
            return max(float(p.read_text()) for p in want) - start
        if time.monotonic() > deadline or not procs_alive():
            raise RuntimeError(f"not every rank got ready (see {out})")
        time.sleep(0.01)


def measure_torchrun(root: Path, script: Path, env: dict[str, str], timeout: float) -> float:
    out = Path(tempfile.mkdtemp(dir=root, prefix="torchrun-"))
    port = free_port()
    logs = [open(out / f"node{r}.log", "wb") for r in range(NNODES)]  # noqa: SIM115
    start = time.time()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NNODES), "--nproc-per-node",
         str(NPROC), "--node-rank", str(r), "--rdzv-backend", "static", "--master-addr", "127.0.0.1",
         "--master-port", str(port), "--rdzv-id", out.name, str(script), str(out)],
        env=env, stdout=logs[r], stderr=subprocess.STDOUT) for r in range(NNODES)]
    try:
        return _wait_ready(out, start, lambda: all(p.poll() in (None, 0) for p in procs), timeout)
    finally:
        for p in procs:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs:
            f.close()


def measure_launcher(root: Path, script: Path, env: dict[str, str], timeout: float) -> float:
    out = Path(tempfile.mkdtemp(dir=root, prefix="launcher-"))
    port = free_port()

    async def both() -> float:
        specs = [NodeLaunch(job_id=out.name, argv=tuple(python_argv(str(script), [str(out)], env=env)),
                            nproc_per_node=NPROC, node_rank=r, nnodes=NNODES, master_addr="127.0.0.1",
                            master_port=port, log_dir=out / f"node{r}") for r in range(NNODES)]
        start = time.time()
        runs = [asyncio.create_task(run_node(s, base_env=env)) for s in specs]

        def alive() -> bool:  # no node's run has ended badly
            return not any(t.done() and (t.exception() is not None or not t.result().ok) for t in runs)

        ready = await asyncio.to_thread(_wait_ready, out, start, alive, timeout)
        results = await asyncio.wait_for(asyncio.gather(*runs), timeout)
        if not all(r.ok for r in results):
            raise RuntimeError(f"launcher run failed: {results}")
        return ready

    return asyncio.run(both())


_CLUSTER: list = []


def _cluster(root: Path):
    """Two agents (a one-voter coordinator and a worker), started once for all repeats."""
    if not _CLUSTER:
        from _common import Agent

        from lepton.client import Client

        a = Agent(name="node-a", root=str(root))
        b = Agent("--join", a.address, name="node-b", root=str(root))
        client = Client(a.address, timeout=60)
        deadline = time.monotonic() + 60
        while len([n for n in client.nodes() if n.state == "ready"]) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the agents did not become ready")
            time.sleep(0.05)
        _CLUSTER.extend([a, b, client])
    return _CLUSTER


def measure_lepton(root: Path, script: Path, env: dict[str, str], timeout: float) -> float | None:
    """Submit the 2x2 job through the coordinator (what `lepton-ctl run --nodes 2
    --nproc-per-node 2` does) and time submit -> the last rank past init_process_group."""
    _, _, client = _cluster(root)
    out = Path(tempfile.mkdtemp(dir=root, prefix="lepton-"))
    start = time.time()
    job = client.submit_job([sys.executable, "-u", str(script), str(out)], nodes=NNODES,
                            nproc_per_node=NPROC, cpu=0.5, env={"OMP_NUM_THREADS": "1"})

    def alive() -> bool:
        return not client.job(job.id).done or all(
            (out / f"ready_{r}").exists() for r in range(NNODES * NPROC))

    seconds = _wait_ready(out, start, alive, timeout)
    client.wait_job(job.id, timeout=timeout)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lepton-bench-launch-"))
    script = root / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [measure_torchrun(root, script, env, args.timeout) for _ in range(args.repeats)]
    launcher = [measure_launcher(root, script, env, args.timeout) for _ in range(args.repeats)]
    lepton = [v for v in (measure_lepton(root, script, env, args.timeout) for _ in range(args.repeats))
              if v is not None]
    emit({
        "nnodes": NNODES, "nproc_per_node": NPROC, "backend": "gloo", "repeats": args.repeats,
        "torchrun_s": round(statistics.median(torchrun), 3),
        "torchrun_samples_s": [round(v, 3) for v in torchrun],
        "launcher_s": round(statistics.median(launcher), 3),
        "launcher_samples_s": [round(v, 3) for v in launcher],
        "lepton_s": round(statistics.median(lepton), 3) if lepton else None,
        "lepton_samples_s": [round(v, 3) for v in lepton],
        "overhead_s": round(statistics.median(lepton) - statistics.median(torchrun), 3) if lepton else None,
    })
    if _CLUSTER:
        a, b, client = _CLUSTER
        client.close()
        b.stop()
        a.stop()


if __name__ == "__main__":
    main()
