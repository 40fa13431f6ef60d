from __future__ import annotations

import subprocess
import sys

import psutil

from lepton.agent.fingerprint import FAKE_GPU_MEMORY, Fingerprinter


def test_capacity_is_the_real_machine(tmp_path):
    cap = Fingerprinter(str(tmp_path)).capacity()
    assert cap.cpu_logical == psutil.cpu_count(logical=True)
    assert cap.memory_bytes == psutil.virtual_memory().total
    assert cap.disk_bytes == psutil.disk_usage(str(tmp_path)).total
    assert cap.cpu_model


def test_no_gpu_is_an_empty_list_not_an_error(tmp_path):
    # CI has no NVIDIA driver; on a GPU host this still holds for the type.
    cap = Fingerprinter(str(tmp_path)).capacity()
    assert isinstance(list(cap.gpus), list)


def test_overrides(tmp_path):
    cap = Fingerprinter(str(tmp_path), cpus=3, memory_bytes=1 << 30, fake_gpus=2).capacity()
    assert cap.cpu_logical == 3
    assert cap.memory_bytes == 1 << 30
    assert [g.index for g in cap.gpus] == [0, 1]
    assert cap.gpus[0].memory_total_bytes == FAKE_GPU_MEMORY


def test_usage_reports_free_disk(tmp_path):
    usage = Fingerprinter(str(tmp_path)).usage()
    assert 0 < usage.disk_free_bytes <= psutil.disk_usage(str(tmp_path)).total
    assert usage.memory_used_bytes > 0


def test_the_daemon_never_imports_torch():
    code = (
        "import sys, lepton.agent.daemon, lepton.agent.main, lepton.coordinator.coordinator;"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
