"""The task process of one node of a torch.distributed job (what torchrun is for torchrun).

The agent's runner starts `python -m lepton.workloads.torch_task LAUNCH_JSON` as an ordinary
task attempt, so it gets a process group, an output file, timeouts and cancellation like
any task, and the agent's own process never imports torch. This process:

1. fetches the shards its ranks read (dataset shard i goes to global rank i % world size)
   into the node's shard store, straight from a peer holding them; when it runs as a
   --task-user (`node_store` false: the node's store and key are not its to read), into a
   store of its own in its scratch folder instead, with its own credential, this node
   serving its copies like any peer;
2. runs `TorchLauncher`: the node's workers with torchrun's exact environment;
3. copies every worker's rank-prefixed output to its stdout, live, so `lepton-ctl logs`
   shows all ranks (`--rank K` filters by the prefix). The rank logs it reads are capped
   like task output (`log_max_bytes`, the agent's `--task-log-max-bytes`): see
   `RankLogTail`;
4. exits 0 when every worker succeeded, else with the first failing worker's code. The
   coordinator then stops the whole gang at once and restarts it (a new rendezvous,
   TORCHELASTIC_RESTART_COUNT + 1) while `max_restarts` allows.

Checkpoints: the recipes' rank 0 writes `epoch_NNNNNN.safetensors` into LEPTON_CHECKPOINT_DIR
(`<data dir>/jobs/<job id>/checkpoints`). On the node of rank 0 this process copies each
new one into the data plane as dataset `ckpt-<job id>` (a new version each time, verified
and replicated like any shard), and before starting it fetches the newest one from there.
So a job whose rank 0 lands on another node after a restart resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton.workloads.torch_launcher import NodeLaunch, TorchLauncher

logger = logging.getLogger("lepton.workloads.torch_task")


CHECKPOINT_SYNC_S = 1.0
COPY_POLL_S = 0.1
COPY_BYTES = 1 << 20
_CHECKPOINT_RE = re.compile(r"^epoch_(\d+)\.safetensors$")


def checkpoint_dataset(job_id: str) -> str:
    return f"ckpt-{job_id}"


def newest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir()
                   if (m := _CHECKPOINT_RE.match(p.name)))
    return found[-1][1] if found else None


def _client(launch: dict[str, Any]):
    """A client of the cluster, with the node's TLS identity when the agent has one."""
    from lepton.client import Client
    from lepton.common.channels import TlsConfig

    tls = TlsConfig.from_env()
    # A rank rides out a coordinator restart: the whole budget, not the CLI's quick 2 s.
    return Client(launch["servers"], timeout=30, connect_timeout=30, tls_dir=tls and tls.dir, cert_name=tls and tls.name)


NO_CHECKPOINT = "no stored checkpoint"


def say(text: str) -> None:
    """A launcher message: a `lepton:` line on the task's stderr, never in its stdout (the
    job's own output)."""
    print(f"lepton: {text}", file=sys.stderr, flush=True)


def fetch_checkpoint(launch: dict[str, Any], ckpt_dir: Path) -> str:
    """Bring the job's newest stored checkpoint here unless a newer one is already here."""
    from lepton.client import NotFound
    from lepton.workloads.recipes.cluster import get_file

    with _client(launch) as client:
        try:
            ds = client.dataset(checkpoint_dataset(launch["job_id"]))
        except NotFound:
            return NO_CHECKPOINT
        # Only what this job stored: a name taken first by another user must not seed it.
        owner = client.job(launch["job_id"]).owner
        if ds.kind != "checkpoint" or ds.owner != owner:
            return f"ignoring {ds.name}: kind {ds.kind}, owner {ds.owner or '-'}; not this job's checkpoint"
        m = _CHECKPOINT_RE.match(ds.source)
        local = newest_checkpoint(ckpt_dir)
        if m is None:
            return f"stored checkpoint has an unexpected name {ds.source!r}"
        if local is not None and local.name >= ds.source:
            return f"local checkpoint {local.name} is current"
        get_file(client, ds.name, ckpt_dir / ds.source)
        return f"fetched checkpoint {ds.source}"


def store_checkpoint(launch: dict[str, Any], path: Path) -> None:
    from lepton.workloads.recipes.cluster import put_file

    with _client(launch) as client:
        # Kind "checkpoint": internal, hidden from `data ls` unless --all. Falls back to 1 copy.
        put_file(client, checkpoint_dataset(launch["job_id"]), path, kind="checkpoint")


async def sync_checkpoints(launch: dict[str, Any], ckpt_dir: Path, done: asyncio.Event) -> None:
    """Copy each new checkpoint into the data plane, until the workers are done."""
    stored = ""
    while True:
        finished = done.is_set()
        newest = newest_checkpoint(ckpt_dir)
        if newest is not None and newest.name != stored:
            try:
                await asyncio.to_thread(store_checkpoint, launch, newest)
                stored = newest.name
                say(f"stored checkpoint {newest.name}")
            except Exception as err:  # noqa: BLE001 - keep training; try again next round
                logger.warning("cannot store checkpoint %s: %s", newest.name, err)
        if finished:
            return
        try:
            await asyncio.wait_for(done.wait(), CHECKPOINT_SYNC_S)
        except asyncio.TimeoutError:
            pass


def shard_assignment(shard_ids: list[str], world: int) -> list[list[str]]:
    """Global rank r reads shards r, r + world, r + 2*world, ... (round robin)."""
    return [shard_ids[r::world] for r in range(world)]


def scratch_root(job_dir: Path) -> str:
    """Where encrypted shards are decrypted for the workers: memory (/dev/shm) when there is
    one, so plaintext does not land on the disk the encryption protects; else the job dir."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else str(job_dir)


def local_shards(launch: dict[str, Any], scratch: Path) -> tuple[tuple[str, ...], ...]:
    """Paths of each local rank's shards, fetched into this node's store when missing (or,
    without `node_store`, into a store of the task's own in `scratch`). The node's encrypted
    shards are decrypted into `scratch` (private; the caller removes it)."""
    dataset = launch.get("dataset", "")
    if not dataset:
        return ()
    from lepton.client import Client
    from lepton.dataplane.shard_crypto import ShardCipher
    from lepton.dataplane.shards import ShardStore
    from lepton.dataplane.transfer import Puller

    nproc, node_rank = launch["nproc_per_node"], launch["node_rank"]
    world = nproc * launch["nnodes"]
    from lepton.common.channels import TlsConfig

    # The agent puts its TLS folder and certificate name in every task's environment.
    tls = TlsConfig.from_env()
    with Client(launch["servers"], timeout=30, connect_timeout=30, tls_dir=tls and tls.dir, cert_name=tls and tls.name) as client:
        ds = client.dataset(dataset)
    per_rank = shard_assignment([s.id for s in ds.shards], world)
    mine = [per_rank[node_rank * nproc + i] for i in range(nproc)]
    if launch.get("node_store", True):
        key_file = launch.get("shard_key_file", "")
        cipher = ShardCipher.from_file(key_file) if key_file else None
        # The agent's live store: leave its writes in progress alone (clean_tmp=False).
        store = ShardStore(Path(launch["data_dir"]) / "shards", cipher=cipher, clean_tmp=False)
    else:  # plaintext, private to this attempt (in memory when /dev/shm is there)
        store = ShardStore(scratch / "store")
    by_id = {s.id: s for s in ds.shards}
    missing = [sid for ranks in mine for sid in ranks if not store.has(sid)]
    if missing:
        puller = Puller(store, tls=tls, token=os.environ.get("LEPTON_TOKEN"))  # the task's credential
        try:
            items = [(sid, by_id[sid].size, [ds.addresses[n] for n in by_id[sid].replicas
                                             if n in ds.addresses]) for sid in missing]
            result = puller.pull_many(items, parallel=4)
        finally:
            puller.close()
        if result.failed:
            sid, why = next(iter(result.failed.items()))
            raise OSError(f"cannot fetch shard {sid[:12]}: {why}")
    return tuple(tuple(str(store.plain_path(sid, scratch)) for sid in ranks) for ranks in mine)


@dataclass
class _Tailed:
    fd: int
    ino: int
    pos: int = 0


class RankLogTail:
    """Copies the node's rank logs (`log_dir/rank_*.log`) to `out`, every line once, across
    the launcher's rotations. Each file is held open (readable after its rename) and known
    by its inode: when the path names another file, the held one is read to its end, then
    the new one from its start. The launcher also calls `drain` just before each rotation,
    so several rotations between two polls lose nothing either. Lines are copied whole;
    a partial last line waits for the next poll unless `final`."""

    def __init__(self, log_dir: Path, out: Any):
        self._log_dir = Path(log_dir)
        self._out = out
        self._files: dict[str, _Tailed] = {}  # by file name: the launcher's paths may be spelled otherwise

    def poll(self, final: bool = False) -> None:
        for path in sorted(self._log_dir.glob("rank_*.log")):
            self._follow(path, final)

    def drain(self, path: Path) -> None:
        """`on_log_rotate`: `path` is complete and about to be renamed away: copy all of it."""
        self._follow(Path(path), True)

    def close(self) -> None:
        for t in self._files.values():
            os.close(t.fd)
        self._files.clear()

    def _follow(self, path: Path, whole: bool) -> None:
        t = self._files.get(path.name) or self._open(path)
        try:
            while t is not None:
                try:
                    rotated = os.stat(path).st_ino != t.ino
                except FileNotFoundError:
                    rotated = False  # renamed, not reopened yet: the held file is still the newest
                # Renamed away means closed by the launcher: the held file is complete.
                self._copy(t, whole or rotated)
                if not rotated:
                    return
                os.close(t.fd)
                del self._files[path.name]
                t = self._open(path)
        finally:
            self._out.flush()

    def _open(self, path: Path) -> _Tailed | None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        t = self._files[path.name] = _Tailed(fd, os.fstat(fd).st_ino)
        return t

    def _copy(self, t: _Tailed, whole: bool) -> None:
        if os.fstat(t.fd).st_size < t.pos:
            t.pos = 0  # cut in place (the launcher could not rename it): all of it is new
        while True:
            data = os.pread(t.fd, COPY_BYTES, t.pos)
            if not data:
                return
            cut = len(data) if whole else data.rfind(b"\n") + 1
            if not cut and len(data) == COPY_BYTES:
                cut = len(data)  # no line end in a whole chunk: do not stall on it
            if cut:
                self._out.write(data[:cut])
                t.pos += cut
            if cut < len(data):
                return  # a partial line: the rest of it comes later


async def _copy_output(tail: RankLogTail, done: asyncio.Event) -> None:
    """Poll `tail` until the workers are done and drained, then copy what is left."""
    while True:
        finished = done.is_set()
        tail.poll(final=finished)
        if finished:
            return
        await asyncio.sleep(COPY_POLL_S)


async def run(launch: dict[str, Any]) -> int:
    # Made by the agent (the task user's when there is one); older agents left it to us.
    job_dir = Path(launch.get("job_dir") or Path(launch["data_dir"]) / "jobs" / launch["job_id"])
    job_dir.mkdir(parents=True, exist_ok=True)
    # The agent's name for it (lepton.agent.shard_scratch), so it can remove what a SIGKILL leaves.
    if prefix := launch.get("scratch_prefix", ""):
        scratch = Path(tempfile.mkdtemp(prefix=os.path.basename(prefix), dir=os.path.dirname(prefix)))
    else:
        scratch = Path(tempfile.mkdtemp(prefix=f"lepton-shards-{launch['job_id']}-", dir=scratch_root(job_dir)))
    try:
        return await _run(launch, job_dir, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # decrypted shards live only as long as the job


async def _run(launch: dict[str, Any], job_dir: Path, scratch: Path) -> int:
    log_dir = job_dir / f"restart-{launch['restart_count']}" / f"node-{launch['node_rank']}"
    checkpoints = job_dir / "checkpoints"
    log_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.mkdir(parents=True, exist_ok=True)
    try:
        shards = await asyncio.to_thread(local_shards, launch, scratch)
        if launch["node_rank"] == 0 and launch.get("servers"):
            found = await asyncio.to_thread(fetch_checkpoint, launch, checkpoints)
            if found == NO_CHECKPOINT:
                logger.info("job %s: %s", launch["job_id"], found)  # the usual first start
            else:
                say(found)
    except Exception as err:  # noqa: BLE001 - any failure to stage data fails this attempt
        say(f"cannot stage the dataset: {err}")
        return 1
    spec = NodeLaunch(
        job_id=launch["job_id"],
        argv=tuple(launch["argv"]),
        nproc_per_node=launch["nproc_per_node"],
        node_rank=launch["node_rank"],
        nnodes=launch["nnodes"],
        master_addr=launch["master_addr"],
        master_port=launch["master_port"],
        log_dir=log_dir,
        restart_count=launch["restart_count"],
        max_restarts=launch["max_restarts"],
        run_id=f"{launch['job_id']}-{launch['restart_count']}",
        env=launch.get("env", {}),
        dataset=launch.get("dataset", ""),
        shards=shards,
        checkpoint_dir=str(checkpoints),
        grace_s=launch.get("grace_s", 10.0),
        log_max_bytes=int(launch.get("log_max_bytes", 0)),
    )
    tail = RankLogTail(log_dir, sys.stdout.buffer)
    try:
        return await _launch(launch, spec, tail, checkpoints)
    finally:
        tail.close()


async def _launch(launch: dict[str, Any], spec: NodeLaunch, tail: RankLogTail, checkpoints: Path) -> int:
    # The tail finishes each rank log before the launcher rotates it away.
    launcher = TorchLauncher(spec, on_log_rotate=tail.drain)
    loop = asyncio.get_running_loop()
    # The agent stops a node of a failed gang with SIGTERM: pass it on to the workers.
    loop.add_signal_handler(signal.SIGTERM, launcher.stop, "stopped by the agent")
    done = asyncio.Event()
    copier = asyncio.create_task(_copy_output(tail, done))
    syncer = None
    if launch["node_rank"] == 0 and launch.get("servers"):
        syncer = asyncio.create_task(sync_checkpoints(launch, checkpoints, done))
    try:
        await launcher.start()
        result = await launcher.wait()
    except OSError as err:
        say(f"failed to start the workers: {err}")
        return 127
    finally:
        done.set()
        await copier
        if syncer is not None:
            await syncer
    if result.ok:
        return 0
    detail = f": {result.error_message}" if result.error_message else ""
    say(f"node {spec.node_rank}: {result.reason}{detail}")  # reason: "rank R ...", R global
    code = result.failed_code
    if code is None:
        return 143
    return code if code > 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m lepton.workloads.torch_task LAUNCH_JSON", file=sys.stderr)
        return 2
    logging.basicConfig(level=os.environ.get("LEPTON_LOG_LEVEL", "WARNING"))
    return asyncio.run(run(json.loads(args[0])))


if __name__ == "__main__":
    sys.exit(main())
