"""Issue 7 end to end: shards encrypted at rest on real agents. Tampering with a stored
blob is detected, the blob is never served, is quarantined and re-replicated, and
downloads, processing and torch jobs still get the right data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lepton.client import Client
from lepton.common.errors import Unavailable
from lepton.dataplane import shard_crypto as sc
from lepton.dataplane import shard_hash
from lepton.dataplane.shards import CHUNK, KEY_ID_FILE, ShardStore
from lepton.dataplane.transfer import Puller
from tests.integration.cluster import AgentProcess, run_ctl, wait_until


def shard_id_of(data: bytes, like: str) -> str:
    """`data`'s id under the hash `like` (a shard id) names."""
    h = shard_hash.hash_for(like)
    h.update(data)
    return h.shard_id()


# Torch workers are started from inside the task: see tasks_exec_python (conftest).
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("tasks_exec_python")]

NPY_MAGIC = b"\x93NUMPY"


def make_secret(tmp_path, name: str = "cluster.secret") -> str:
    path = tmp_path / name
    out = run_ctl("-o", "json", "secret", "init", "--out", str(path), server="127.0.0.1:1")
    assert out.returncode == 0, out.stderr
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert json.loads(out.stdout)["key_id"] == sc.ShardCipher.from_file(path).key_id
    return str(path)


def blob_files(agent, sid: str = "*") -> list:
    """The agent's blob files (plaintext .npy or sealed .enc), not their checkpoint files."""
    found = (agent.data_dir / "shards" / "blobs").glob(f"*/{sid}.*")
    return sorted(p for p in found if p.suffix in (".npy", ".enc"))


def flip(path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))


def fetch_from(address: str, shard, tmp_path, name: str) -> tuple[bytes | None, int]:
    """Pull one shard from one node only, as a client does (no key): (bytes or None, bytes
    that arrived)."""
    store = ShardStore(tmp_path / name)
    got = []
    puller = Puller(store)
    try:
        puller.pull(shard.id, shard.size, [address], progress=got.append)
    except Unavailable:
        return None, sum(got)
    finally:
        puller.close()
    return store.path(shard.id).read_bytes(), sum(got)


def test_tampered_blob_is_never_served_and_the_cluster_heals(agents, tmp_path):
    key = make_secret(tmp_path)
    voter = agents("voter", "--shard-key-file", key)
    workers = [agents(f"w{i}", "--join", voter.address, "--shard-key-file", key) for i in (1, 2)]
    everyone = [voter, *workers]
    c = Client(voter.address, timeout=30)
    wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == 3, what="3 nodes")
    x = np.random.default_rng(7).normal(size=(600_000, 4)).astype(np.float32)  # 2 shards of 4.8 MB
    np.save(tmp_path / "in.npy", x)
    ds = c.put_dataset(tmp_path / "in.npy", "enc", shards=2, replicas=2)

    # On disk: sealed blobs only, no plaintext, each store marked with the cluster's key id.
    key_id = sc.ShardCipher.from_file(key).key_id
    for a in everyone:
        assert (a.data_dir / "shards" / KEY_ID_FILE).read_text().strip() == key_id
        for path in blob_files(a):
            raw = path.read_bytes()
            assert path.suffix == ".enc" and path.stem in {s.id for s in ds.shards}
            assert NPY_MAGIC not in raw and shard_id_of(bytes(raw), path.stem) != path.stem
            assert x[:1000].tobytes() not in raw and x[-1000:].tobytes() not in raw
    holders = {s.id: [a for a in everyone if a.node_id in s.replicas] for s in ds.shards}
    assert all(len(h) == 2 and all(blob_files(a, sid) for a in h) for sid, h in holders.items())

    # Flip one ciphertext byte in the second chunk of each shard's first-listed replica.
    bad, tampered = {}, {}
    for s in ds.shards:
        first = next(a for a in everyone if a.node_id == s.replicas[0])
        flip(blob_files(first, s.id)[0], sc.HEADER.size + CHUNK + sc.TAG + 1000)
        bad[s.id] = first
        tampered[s.id] = blob_files(first, s.id)[0].read_bytes()
    s0, s1 = ds.shards

    # Shard 0 straight from its bad holder: only the authenticated first chunk arrives,
    # the tampered one is never sent, and the holder drops its copy.
    data, arrived = fetch_from(bad[s0.id].address, s0, tmp_path, "direct")
    assert data is None and arrived == CHUNK
    assert not blob_files(bad[s0.id], s0.id)

    # Processing runs where the shards are; shard 1's first holder (tried first) fails the
    # tag check, so its other replica does the work. The result equals numpy's.
    out = run_ctl("-o", "json", "data", "process", "enc", "--steps", "normalize", "--out", "enc-norm",
                  server=voter.address, timeout=120)
    assert out.returncode == 0, out.stderr
    # The tampered copy is gone. Re-replication may already have put a fresh sealed copy back
    # on that node (it no longer held one), so "gone" means: no file with the tampered bytes.
    assert all(f.read_bytes() != tampered[s1.id] for f in blob_files(bad[s1.id], s1.id))
    c.get_dataset("enc-norm", tmp_path / "norm.npy")
    x64 = x.astype(np.float64)
    want = ((x64 - x64.mean(axis=0)) / x64.std(axis=0)).astype(np.float32)
    np.testing.assert_allclose(np.load(tmp_path / "norm.npy")["x"], want, rtol=1e-5, atol=1e-5)

    # A download still returns the right bytes, from the good replicas.
    c.get_dataset("enc", tmp_path / "out.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), x)

    # The leader learnt of both lost replicas and re-replicated them; every copy is sealed
    # and serves the right bytes.
    def healed():
        d = c.dataset("enc")
        return all(len(s.replicas) == 2 for s in d.shards) and d

    d = wait_until(healed, timeout=60, what="re-replicated after tampering")
    for s in d.shards:
        for a in everyone:
            assert bool(blob_files(a, s.id)) == (a.node_id in s.replicas)
            if a.node_id in s.replicas:
                assert blob_files(a, s.id)[0].suffix == ".enc"
                data, _ = fetch_from(a.address, s, tmp_path, f"check-{a.name}-{s.id[:8]}")
                assert data is not None and shard_id_of(data, s.id) == s.id
    for a in everyone:
        assert all(p.suffix == ".enc" for p in blob_files(a))  # the processed shards too
    logs = "".join(a.log_path.read_text(errors="replace") for a in {bad[s0.id], bad[s1.id]})
    assert logs.count("fails authentication): removed from the store") == 2
    c.close()


def test_restart_with_another_key_or_none_fails_clearly(tmp_path):
    key, other = make_secret(tmp_path, "a.secret"), make_secret(tmp_path, "b.secret")
    node = AgentProcess(tmp_path, "solo", ["--shard-key-file", key]).start()
    try:
        np.save(tmp_path / "in.npy", np.arange(4000, dtype=np.float32).reshape(-1, 4))
        with Client(node.address, timeout=30) as c:
            wait_until(lambda: c.nodes(), what="node")
            shard = c.put_dataset(tmp_path / "in.npy", "d", replicas=1).shards[0]
        assert node.terminate() == 0
    finally:
        node.stop()
    before = {p: p.read_bytes() for p in blob_files(node)}
    assert before
    for args, why in ((["--shard-key-file", other], "was encrypted with key id"),
                      ([], "is encrypted"),
                      (["--shard-key-file", str(tmp_path / "missing")], "no such file")):
        cmd = [sys.executable, "-m", "lepton.agent.main", "--data-dir", str(node.data_dir),
               "--listen", node.address, "--metrics-listen", "127.0.0.1:0", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert out.returncode in (1, 2) and why in out.stderr, out.stderr[-2000:]
        assert {p: p.read_bytes() for p in blob_files(node)} == before  # nothing dropped
    # With the right key it starts and serves the shard (the replica list forgot the node
    # when it left, so ask the node itself).
    again = AgentProcess(tmp_path, "solo", ["--shard-key-file", key], port=node.port).start()
    try:
        data, _ = fetch_from(again.address, shard, tmp_path, "after")
        assert data is not None and shard_id_of(data, shard.id) == shard.id
    finally:
        again.stop()


READER = textwrap.dedent("""
    import os
    import numpy as np
    for p in os.environ["LEPTON_SHARDS"].split(","):
        recs = np.load(p, mmap_mode="r")
        print(f"shard {p} rows={len(recs)} sum={float(recs['x'].astype('float64').sum()):.1f}", flush=True)
""")


def test_a_job_reads_encrypted_shards(agents, tmp_path):
    key = make_secret(tmp_path)
    voter = agents("node-a", "--shard-key-file", key)
    agents("node-b", "--join", voter.address, "--shard-key-file", key)
    script = tmp_path / "reader.py"
    script.write_text(READER)
    x = np.arange(8000, dtype=np.float32).reshape(-1, 4)
    np.save(tmp_path / "in.npy", x)
    with Client(voter.address, timeout=60) as c:
        wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == 2, what="2 nodes")
        ds = c.put_dataset(tmp_path / "in.npy", "jobdata", shards=2, replicas=1)
        job = c.submit_job([sys.executable, str(script)], nodes=2, nproc_per_node=1, cpu=0.5,
                           dataset="jobdata")
        done = c.wait_job(job.id, timeout=180)
        logs = b"".join(c.job_logs(job.id)).decode()
    assert done.state == "succeeded", (done.reason, logs[-2000:])
    lines = sorted(line.split("] ", 1)[1] for line in logs.splitlines() if "rows=" in line)
    assert len(lines) == 2
    halves = (x[:1000].astype(np.float64).sum(), x[1000:].astype(np.float64).sum())
    assert sorted(float(line.rsplit("sum=", 1)[1]) for line in lines) == sorted(halves)
    for line in lines:  # decrypted private copies, not the stores' sealed blobs; gone now
        path = line.split()[1]
        assert path.endswith(".npy") and "/shards/blobs/" not in path
        assert ds.shards[0].id in path or ds.shards[1].id in path
        assert not os.path.exists(path)  # removed before the job's task exited


def test_sealed_shards_over_the_tls_side_channel(agents, tmp_path):
    d = str(tmp_path / "tls")
    run_ctl("certs", "init", "--dir", d, server="-", check=True)
    run_ctl("certs", "issue", "admin", "--kind", "user", "--role", "admin", "--dir", d, server="-", check=True)
    key = make_secret(tmp_path)
    voter = agents("voter", "--tls-dir", d, "--shard-key-file", key)
    worker = agents("worker", "--join", voter.address, "--tls-dir", d, "--shard-key-file", key)
    x = np.random.default_rng(2).normal(size=(400_000, 4)).astype(np.float32)  # 6.4 MB: 2 chunks
    np.save(tmp_path / "x.npy", x)
    with Client(voter.address, timeout=30, tls_dir=d) as c:
        wait_until(lambda: len([n for n in c.nodes() if n.state == "ready"]) == 2, what="2 nodes")
        ds = c.put_dataset(tmp_path / "x.npy", "toy", shards=1, replicas=2)  # the worker pulls it
        c.get_dataset("toy", tmp_path / "y.npy")  # the client pulls it, no key needed
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), x)
    for a in (voter, worker):
        assert [p.suffix for p in blob_files(a)] == [".enc"] and blob_files(a, ds.shards[0].id)
        log = a.log_path.read_text(errors="replace")
        assert "encrypted at rest (AES-256-GCM" in log and "without --tls-dir" not in log
