"""What this host has (capacity) and uses (usage): psutil for CPU, memory and disk, NVML for GPUs.

Never imports torch: the daemon stays light. No GPU, no driver or no NVML library is not
an error; the GPU list is simply empty.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path

import psutil

from lepton.v1 import common_pb2

logger = logging.getLogger(__name__)

FAKE_GPU_MEMORY = 16 * 1024**3


def cpu_model() -> str:
    """The CPU's marketing name; /proc/cpuinfo on Linux, platform elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


class Gpus:
    """NVML access that degrades to "no GPUs" when there is no driver."""

    def __init__(self, fake: int | None = None):
        self._fake = fake
        self._nvml = None
        if fake is not None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as err:  # noqa: BLE001 - NVMLError, ImportError, OSError all mean "none"
            logger.info("no NVIDIA GPUs visible (%s)", err.__class__.__name__)

    def read(self) -> list[common_pb2.Gpu]:
        if self._fake is not None:
            return [
                common_pb2.Gpu(
                    index=i, uuid=f"GPU-fake-{i}", name="Fake GPU", memory_total_bytes=FAKE_GPU_MEMORY
                )
                for i in range(self._fake)
            ]
        if self._nvml is None:
            return []
        nv = self._nvml
        out = []
        try:
            for i in range(nv.nvmlDeviceGetCount()):
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                try:
                    util = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                except nv.NVMLError:
                    util = 0.0
                name = nv.nvmlDeviceGetName(h)
                uuid = nv.nvmlDeviceGetUUID(h)
                out.append(
                    common_pb2.Gpu(
                        index=i,
                        uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                        name=name.decode() if isinstance(name, bytes) else name,
                        memory_total_bytes=int(mem.total),
                        memory_used_bytes=int(mem.used),
                        utilization_percent=util,
                    )
                )
        except Exception:  # noqa: BLE001 - a GPU falling off the bus must not kill heartbeats
            logger.exception("NVML read failed")
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
            self._nvml = None


class Fingerprinter:
    """Capacity once at start (with overrides), usage on every heartbeat."""

    def __init__(
        self,
        data_dir: str,
        *,
        cpus: float | None = None,
        memory_bytes: int | None = None,
        fake_gpus: int | None = None,
    ):
        self._data_dir = data_dir
        self._cpus = cpus
        self._memory = memory_bytes
        self.gpus = Gpus(fake_gpus)
        self._proc_prime = psutil.cpu_percent(interval=None)  # first call primes the counter

    def capacity(self) -> common_pb2.Capacity:
        logical = psutil.cpu_count(logical=True) or 1
        physical = psutil.cpu_count(logical=False) or logical
        if self._cpus is not None:
            logical = max(1, int(self._cpus))
            physical = min(physical, logical)
        return common_pb2.Capacity(
            cpu_logical=logical,
            cpu_physical=physical,
            cpu_model=cpu_model()[:256],
            memory_bytes=self._memory or psutil.virtual_memory().total,
            disk_bytes=psutil.disk_usage(self._data_dir).total,
            gpus=self.gpus.read(),
        )

    def usage(self) -> common_pb2.Usage:
        vm = psutil.virtual_memory()
        try:
            load1 = os.getloadavg()[0]
        except OSError:
            load1 = 0.0
        return common_pb2.Usage(
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_used_bytes=vm.total - vm.available,
            disk_free_bytes=psutil.disk_usage(self._data_dir).free,
            gpus=self.gpus.read(),
            load1=load1,
        )

    def close(self) -> None:
        self.gpus.close()
