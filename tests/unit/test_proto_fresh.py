"""The committed stubs must be exactly what scripts/gen_proto.sh makes from the .proto files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_stubs_are_fresh(tmp_path):
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    for f in (tmp_path / "proto/lepton/v1").glob("*_pb2*"):
        f.unlink()
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", "--python_out=proto",
         "--grpc_python_out=proto", "--pyi_out=proto", *sorted(p.relative_to(tmp_path).as_posix()
         for p in (tmp_path / "proto/lepton/v1").glob("*.proto"))],
        cwd=tmp_path, check=True,
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "proto/lepton/v1").glob("*_pb2*")}
    committed = {p.name: p.read_bytes() for p in (ROOT / "proto/lepton/v1").glob("*_pb2*")}
    stale = sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))
    assert not stale, f"stale generated stubs {stale}: run `make proto`"
