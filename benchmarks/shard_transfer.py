"""Shard pulls between two real agents against raw loopback TCP, in one run.

- raw_tcp_GBps: Python `sendall` of 1 MiB buffers to a receiver process (`recv_into`), the
  ceiling for anything written in Python on this machine;
- shard_GBps: agent B pulls `--gib` GiB of 64 MiB shards from agent A (`Shards.PullShards`,
  as replication does): gRPC control, raw-socket side channel with `os.sendfile`, every
  4 MiB chunk checked against its checkpoint, the whole hash checked (BLAKE3 ids, as new
  puts make; `--sha256` for older ids), fsync, rename.

Two references beside the baseline (same receiver, same run, not the target's measure):
tcp_store_GBps, the receiver also writing the bytes into files in the same directory as
the stores (fsync'd per 64 MiB file), and tcp_store_hash_GBps, hashing them as well (the
ids' algorithm): the least any pull that keeps and verifies the bytes does, without framing,
gRPC or checkpoints; receiver_cpu_s_per_GiB gives the receiver's CPU per GiB for each
(compare puller_cpu_s_per_GiB).

Both data dirs go under `--dir` (default: /dev/shm when present, so the disk's own speed
does not hide the transfer's; pass a disk path to include it). Each measurement is the best
of `--repeat`; each repeat measures raw TCP right before its pull, so a ratio compares two
runs seconds apart on a shared machine (ratios: each repeat's; ratio: the median).
`--encrypt`: both agents encrypt shards at rest with one cluster secret, so A sends its
sealed chunks as they lie (sendfile) and B authenticates and decrypts each to check it,
keeping the sealed bytes. Prints one JSON object with raw_tcp_GBps, shard_GBps, ratio,
ratios, the CPU seconds per GiB of puller and holder, and encrypt.

cpu_ceiling_GBps: the most a pull could do with every core to itself, all busy: `cpus` /
(puller + holder CPU-s per GiB, medians); cpu_ceiling_ratio: that over raw_tcp_GBps. A
ratio near its ceiling means the pull is bound by CPU (kernel copies and page allocation,
mostly), not by waiting; a busy machine lowers both rates but moves the ceiling less.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Agent, emit  # noqa: E402

from lepton.common import cluster_secret  # noqa: E402
from lepton.dataplane.shard_crypto import ShardCipher  # noqa: E402
from lepton.dataplane.shard_hash import content_id  # noqa: E402
from lepton.dataplane.shards import ShardStore  # noqa: E402
from lepton.v1 import datasets_pb2 as dpb  # noqa: E402
from lepton.v1.datasets_pb2_grpc import ShardsStub  # noqa: E402

MiB = 1 << 20
RECEIVER = """
import os, socket, sys
n, keep, root, per_file, algo = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
if keep == "store+hash":
    import blake3, hashlib
s = socket.create_server(("127.0.0.1", 0)); print(s.getsockname()[1], flush=True)
c, _ = s.accept(); buf = memoryview(bytearray(1 << 20)); got = in_file = 0; fd = -1; files = []; h = None
while got < n:
    k = c.recv_into(buf)
    if not k: break
    if keep != "discard":
        if fd < 0 or in_file >= per_file:
            if fd >= 0:
                os.fsync(fd); os.close(fd)
            files.append(os.path.join(root, str(len(files))))
            fd = os.open(files[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600); in_file = 0
            h = None if keep != "store+hash" else blake3.blake3() if algo == "blake3" else hashlib.sha256()
        if h is not None:
            h.update(buf[:k])
        view = buf[:k]
        while view:
            view = view[os.write(fd, view):]
        in_file += k
    got += k
if fd >= 0:
    os.fsync(fd); os.close(fd)
c.sendall(b"k")
for f in files:
    os.unlink(f)
"""
# What the receiver does with the bytes: the baseline drops them; the other two are what a
# pull cannot avoid (keep them in the store's file system; hash them too), as references.
# The baseline runs last, right before its pull.
KEEPS = ("store", "store+hash", "discard")


def raw_tcp(total: int, keep: str = "discard", root: str = "", per_file: int = 64 * MiB,
            algo: str = "blake3") -> tuple[float, float, float]:
    """(GB/s, CPU seconds per GiB of sender and receiver together, of the receiver alone).
    `keep`: "discard" (the baseline), "store" (os.write into files of `per_file` bytes
    under `root`, fsync'd) or "store+hash" (hashed too, with `algo`: blake3 or sha256)."""
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER, str(total), keep, root, str(per_file), algo],
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    receiver = psutil.Process(proc.pid)
    buf = os.urandom(MiB)
    with socket.create_connection(("127.0.0.1", port)) as s:
        own0, theirs0 = time.thread_time(), _cpu_s(receiver)
        t0 = time.perf_counter()
        for _ in range(total // MiB):
            s.sendall(buf)
        s.recv(1)
        dt = time.perf_counter() - t0
        theirs = _cpu_s(receiver) - theirs0
        own = time.thread_time() - own0
    proc.wait(60)
    gib = total / (1 << 30)
    return total / dt / 1e9, (own + theirs) / gib, theirs / gib


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def make_shards(root: Path, count: int, size: int, key_file: str = "", sha256: bool = False) -> list[tuple[str, int]]:
    store = ShardStore(root, cipher=ShardCipher.from_file(key_file) if key_file else None)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        data = rng.bytes(size)
        sid = hashlib.sha256(data).hexdigest() if sha256 else content_id(data)
        with store.writer(sid, size) as w:
            w.write(data)
            w.commit()
        out.append((sid, size))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="GiB of shards to pull (default 1)")
    ap.add_argument("--shard-mib", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--encrypt", action="store_true", help="shards encrypted at rest on both agents")
    ap.add_argument("--sha256", action="store_true", help="SHA-256 ids (shards stored before BLAKE3)")
    args = ap.parse_args()
    total = int(args.gib * (1 << 30))
    count = max(1, -(-total // (args.shard_mib * MiB)))

    root = tempfile.mkdtemp(prefix="lepton-bench-shards-", dir=args.dir)
    os.chmod(root, 0o711)  # a root agent's task user (nobody) must pass to its data dir
    a = b = None
    try:
        key: list[str] = []
        if args.encrypt:
            key = ["--shard-key-file", str(cluster_secret.create(Path(root) / "cluster.secret"))]
        shards = make_shards(Path(root) / "a" / "shards", count, args.shard_mib * MiB, *key[1:], sha256=args.sha256)
        a = Agent(*key, name="a", root=root)
        b = Agent("--join", a.address, *key, name="b", root=root)
        a_id = json.loads((a.data_dir / "agent.json").read_text())["node_id"]  # sources are node ids
        req = dpb.PullShardsRequest(shards=[
            dpb.ShardSource(shard_id=sid, size=size, source_nodes=[a_id]) for sid, size in shards])
        raws, pulls, cpu_b, cpu_a, cpu_raw = [], [], [], [], []
        tcp = {keep: {"rate": [], "receiver": []} for keep in KEEPS}
        tcp_dir = Path(root) / "tcp"
        tcp_dir.mkdir()
        procs = [psutil.Process(agent.proc.pid) for agent in (a, b)]
        with grpc.insecure_channel(b.address) as ch:
            stub = ShardsStub(ch)
            for _ in range(args.repeat):
                for keep in KEEPS:
                    rate, cpu, receiver = raw_tcp(count * args.shard_mib * MiB, keep, str(tcp_dir),
                                                  args.shard_mib * MiB, "sha256" if args.sha256 else "blake3")
                    tcp[keep]["rate"].append(rate)
                    tcp[keep]["receiver"].append(receiver)
                    if keep == "discard":
                        raws.append(rate)
                        cpu_raw.append(cpu)
                cpu0 = [_cpu_s(p) for p in procs]
                t0 = time.perf_counter()
                resp = stub.PullShards(req, timeout=600)
                dt = time.perf_counter() - t0
                gib = resp.bytes / (1 << 30)
                cpu_a.append((_cpu_s(procs[0]) - cpu0[0]) / gib)
                cpu_b.append((_cpu_s(procs[1]) - cpu0[1]) / gib)
                if resp.failed or len(resp.pulled) != len(shards):
                    raise SystemExit(f"pull failed: {dict(resp.failed)}")
                pulls.append(resp.bytes / dt / 1e9)
                stub.DeleteShards(dpb.DeleteShardsRequest(shard_ids=[s for s, _ in shards]), timeout=60)
        ratios = [p / r for p, r in zip(pulls, raws, strict=True)]
        stored = tcp["store+hash"]["rate"]
        cpu_per_gib = statistics.median(cpu_a) + statistics.median(cpu_b)
        ceiling = (os.cpu_count() or 1) / cpu_per_gib * (1 << 30) / 1e9
        emit({
            "raw_tcp_GBps": round(max(raws), 3),
            "shard_GBps": round(max(pulls), 3),
            "ratio": round(statistics.median(ratios), 3),
            "ratios": [round(x, 3) for x in ratios],
            # CPU seconds per GiB pulled (median): less at the mercy of a busy machine than rates.
            "puller_cpu_s_per_GiB": round(statistics.median(cpu_b), 3),
            "holder_cpu_s_per_GiB": round(statistics.median(cpu_a), 3),
            "raw_tcp_cpu_s_per_GiB": round(statistics.median(cpu_raw), 3),  # sender + receiver
            # References, not the target's baseline: the same receiver keeping the bytes
            # in files beside the stores (and hashing them), as any verifying pull must.
            "tcp_store_GBps": round(max(tcp["store"]["rate"]), 3),
            "tcp_store_hash_GBps": round(max(stored), 3),
            "ratio_to_tcp_store_hash": round(statistics.median(p / r for p, r in zip(pulls, stored, strict=True)), 3),
            "receiver_cpu_s_per_GiB": {keep: round(statistics.median(t["receiver"]), 3) for keep, t in tcp.items()},
            "cpu_ceiling_GBps": round(ceiling, 3),
            "cpu_ceiling_ratio": round(ceiling / max(raws), 3),
            "bytes": count * args.shard_mib * MiB,
            "shards": count,
            "storage": args.dir or tempfile.gettempdir(),
            "cpus": os.cpu_count(),
            "encrypt": args.encrypt,
            "ids": "sha256" if args.sha256 else "blake3",
        })
    finally:
        for agent in (b, a):
            if agent is not None:
                agent.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
