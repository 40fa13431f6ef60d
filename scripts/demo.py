"""`make demo`: the main job, end to end on real local agents.

Today: start 3 agents, show the cluster, run a task through the scheduler, shut down.
Later issues grow this into the full data + training pipeline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

CTL = [sys.executable, "-m", "lepton.client.cli"]


def ctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    print(f"\n$ lepton-ctl {' '.join(args)}", flush=True)
    out = subprocess.run([*CTL, *args], text=True, capture_output=True)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    if check and out.returncode != 0:
        raise SystemExit(f"demo: lepton-ctl {args[0]} failed with exit code {out.returncode}")
    return out


def main() -> int:
    data_dir = tempfile.mkdtemp(prefix="lepton-demo-")
    up = ctl("local", "up", "--agents", "3", "--data-dir", data_dir)
    servers = next((line.split("=", 1)[1].strip() for line in up.stdout.splitlines()
                    if "LEPTON_SERVER=" in line), "")
    if servers:
        os.environ["LEPTON_SERVER"] = servers
    try:
        ctl("nodes", "list")
        ctl("cluster", "status")
        if "run" in subprocess.run([*CTL, "--help"], text=True, capture_output=True).stdout:
            ctl("run", "--cpu", "0.5", "--", "sh", "-c", "echo hello from $(hostname), task $LEPTON_TASK_ID")
            ctl("tasks", "list")
    finally:
        ctl("local", "down", "--data-dir", data_dir, "--wipe", check=False)
    print("\ndemo: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
