"""`data put` and `data get` of a Parquet file against pyarrow reading and writing the same
file locally, in one run.

- pyarrow_read_MBps: stream the file's record batches (`iter_batches`) into numpy arrays,
  the least any reader of it does;
- pyarrow_write_MBps: write those batches back as a Parquet file (`ParquetWriter`);
- put_MBps: `lepton-ctl data put FILE` to one real agent (one replica): read in batches,
  shards cut and hashed, uploaded, verified, committed;
- get_MBps: `lepton-ctl data get NAME OUT.parquet`: pulled, verified, written back with the
  file's own columns and types;
- put_peak_rss_MB / get_peak_rss_MB: the client process's peak RSS for each (each runs in
  its own process), against file_MB.

The file: `--size-mb` MiB (default 1024) of rows holding a float32 embedding of `--dim`
(a fixed-size list) and an int64 label, uncompressed, 64 Ki-row groups; read once before
the pyarrow read and before the put, so both find it in the page cache. Files go under
`--dir` (default: a temp dir). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Agent, emit  # noqa: E402

MIB = 1 << 20
# Runs lepton-ctl's main in a fresh process and reports its own time and peak RSS: VmHWM,
# since ru_maxrss keeps the forking parent's RSS across exec.
_CHILD = """
import json, sys, time
from lepton.client.cli import main
t = time.perf_counter()
rc = main(sys.argv[1:])
s = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "s": s, "rss_MB": hwm / 1024}), file=sys.stderr)
"""


def make_file(path: Path, size_mb: int, dim: int) -> int:
    """A Parquet file of about `size_mb` MiB; returns its rows."""
    row_bytes = dim * 4 + 8
    rows = max(1, size_mb * MIB // row_bytes)
    group = 65536
    rng = np.random.default_rng(0)
    schema = pa.schema([("emb", pa.list_(pa.float32(), dim)), ("label", pa.int64())])
    with pq.ParquetWriter(path, schema, compression="none", use_dictionary=False) as w:
        for at in range(0, rows, group):
            n = min(group, rows - at)
            emb = pa.FixedSizeListArray.from_arrays(pa.array(rng.random(n * dim, dtype=np.float32)), dim)
            w.write_batch(pa.record_batch([emb, pa.array(np.arange(at, at + n) % 10)], schema=schema))
    return rows


def warm(path: Path) -> None:
    """Read the file once so every reader below finds it in the page cache alike."""
    with open(path, "rb") as f:
        while f.read(16 * MIB):
            pass


def pyarrow_baseline(path: Path, out: Path) -> tuple[float, float]:
    """(read seconds, write seconds) of streaming the file through pyarrow."""
    warm(path)
    pf = pq.ParquetFile(path)
    batches, t = [], time.perf_counter()
    for b in pf.iter_batches(batch_size=16384):
        b.column(0).flatten().to_numpy()
        b.column(1).to_numpy()
        batches.append(b)
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    with pq.ParquetWriter(out, pf.schema_arrow) as w:
        for b in batches:
            w.write_batch(b)
    write_s = time.perf_counter() - t
    return read_s, write_s


def ctl(server: str, *args: str) -> dict:
    cmd = [sys.executable, "-c", _CHILD, "--server", server, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    if report["rc"] != 0:
        raise RuntimeError(f"lepton-ctl {' '.join(args)} failed: {done.stderr.strip()}")
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=int, default=1024)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lepton-bench-formats-", dir=args.dir))
    root.chmod(0o711)  # a root agent runs tasks as nobody, who must pass through
    agent = None
    try:
        src = root / "in.parquet"
        rows = make_file(src, args.size_mb, args.dim)
        file_mb = src.stat().st_size / MIB
        read_s, write_s = pyarrow_baseline(src, root / "pyarrow-out.parquet")
        (root / "pyarrow-out.parquet").unlink()
        agent = Agent(root=str(root / "agent"))
        warm(src)
        put = ctl(agent.address, "data", "put", str(src), "--name", "bench", "--replicas", "1")
        get = ctl(agent.address, "data", "get", "bench", str(root / "out.parquet"))
        same = pq.ParquetFile(root / "out.parquet").metadata.num_rows == rows
        doc = {
            "file_MB": round(file_mb, 1),
            "rows": rows,
            "dim": args.dim,
            "pyarrow_read_MBps": round(file_mb / read_s, 1),
            "pyarrow_write_MBps": round(file_mb / write_s, 1),
            "put_MBps": round(file_mb / put["s"], 1),
            "get_MBps": round(file_mb / get["s"], 1),
            "put_vs_pyarrow_read": round(read_s / put["s"], 3),
            "get_vs_pyarrow_write": round(write_s / get["s"], 3),
            "put_peak_rss_MB": round(put["rss_MB"], 1),
            "get_peak_rss_MB": round(get["rss_MB"], 1),
            "rows_back": same,
        }
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(root, ignore_errors=True)
    emit(doc)


if __name__ == "__main__":
    main()
