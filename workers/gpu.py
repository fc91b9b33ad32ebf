"""GPU probe through NVML (package nvidia-ml-py, module pynvml), with a CPU fallback.

Used by the worker parent process for pool registration and heartbeats. It never imports torch
or touches CUDA: CUDA does not survive fork, and the worker forks its pool children.

Indices are NVML's, i.e. physical GPU indices, which is what a worker is pinned to with
CUDA_VISIBLE_DEVICES=<index>. NVML itself ignores CUDA_VISIBLE_DEVICES.

On a machine without an NVIDIA driver, list_gpus() returns [] and telemetry() describes the
CPU instead, so the same code runs on laptops and in CI.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import pynvml

MIB = 1024 * 1024


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML (physical) index
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    uuid: str  # stable across reboots and index changes, e.g. "GPU-5f3c..."
    vram_total_mb: float


# ---------------------------------------------------------------------------
# NVML initialisation: once per process, on first use

_nvml_lock = threading.Lock()
_nvml_pid: int | None = None  # the process that last tried nvmlInit
_nvml_ok = False  # whether that attempt succeeded


def nvml_available() -> bool:
    """Initialise NVML on first use in this process; True if it works (driver present).

    Keyed by pid: a process forked after the parent's init initialises again for itself, as
    NVML state is not meant to be shared across fork.
    """
    global _nvml_pid, _nvml_ok
    with _nvml_lock:
        if _nvml_pid != os.getpid():
            _nvml_pid = os.getpid()
            try:
                pynvml.nvmlInit()
                _nvml_ok = True
            except pynvml.NVMLError:  # no driver, no libnvidia-ml.so, or no device
                _nvml_ok = False
        return _nvml_ok


# ---------------------------------------------------------------------------
# Queries


def list_gpus() -> list[GpuInfo]:
    """Every GPU NVML sees, in index order; [] without NVML."""
    if not nvml_available():
        return []
    gpus = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        gpus.append(
            GpuInfo(
                index=index,
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                vram_total_mb=pynvml.nvmlDeviceGetMemoryInfo(handle).total / MIB,
            )
        )
    return gpus


def driver_version() -> str:
    return _text(pynvml.nvmlSystemGetDriverVersion())


def telemetry(index: int) -> dict:
    """Current state of GPU `index`: name, vram_total_mb, memory_used_mb, utilization_pct,
    temperature_c. Without NVML, the same keys describe the CPU (see cpu_telemetry()).

    A reading the GPU does not support (utilization under MIG, for one) is None rather than an
    error, so a heartbeat never fails because of one missing number. An index NVML does not
    have raises IndexError: that is a configuration mistake, not a reading.
    """
    if not nvml_available():
        return cpu_telemetry()
    count = pynvml.nvmlDeviceGetCount()
    if not 0 <= index < count:
        raise IndexError(f"GPU index {index} out of range: NVML sees {count} GPU(s)")
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = _reading(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
    utilization = _reading(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle))
    return {
        "name": _reading(lambda: _text(pynvml.nvmlDeviceGetName(handle))),
        "vram_total_mb": memory.total / MIB if memory else None,
        "memory_used_mb": memory.used / MIB if memory else None,
        "utilization_pct": float(utilization.gpu) if utilization else None,
        "temperature_c": _reading(lambda: float(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))),
    }


def cpu_telemetry() -> dict:
    """The telemetry() keys for the CPU, from the standard library and /proc only.

    RAM stands in for VRAM (a CPU run allocates there). Utilization is the 1-minute load
    average over the core count, capped at 100. Values the platform cannot give are None.
    """
    cores = os.cpu_count() or 1
    total_mb, used_mb = _meminfo_mb()
    try:
        utilization = min(100.0, os.getloadavg()[0] / cores * 100.0)
    except OSError:
        utilization = None
    return {
        "name": f"cpu ({cores} cores)",
        "vram_total_mb": total_mb,
        "memory_used_mb": used_mb,
        "utilization_pct": utilization,
        "temperature_c": None,
    }


# ---------------------------------------------------------------------------
# Helpers


def _reading(read):
    try:
        return read()
    except pynvml.NVMLError:
        return None


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else value


def _meminfo_mb() -> tuple[float | None, float | None]:
    """(total, used) RAM in MiB from /proc/meminfo; (None, None) where there is none."""
    fields = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0])  # kB
    except (OSError, ValueError, IndexError):
        return None, None
    if "MemTotal" not in fields:
        return None, None
    total = fields["MemTotal"] / 1024
    available = fields.get("MemAvailable", fields.get("MemFree", 0)) / 1024
    return total, total - available
