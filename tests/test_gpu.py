"""GPU probe: the CPU fallback everywhere, the NVML path only where a GPU exists."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from workers import gpu

TELEMETRY_KEYS = {"name", "vram_total_mb", "memory_used_mb", "utilization_pct", "temperature_c"}

GPUS = gpu.list_gpus()
needs_gpu = pytest.mark.skipif(not GPUS, reason="no NVIDIA GPU (NVML unavailable)")
needs_no_gpu = pytest.mark.skipif(bool(GPUS), reason="an NVIDIA GPU is present")


def test_cpu_telemetry():
    info = gpu.cpu_telemetry()
    assert set(info) == TELEMETRY_KEYS
    assert info["name"] == f"cpu ({os.cpu_count()} cores)"
    assert info["temperature_c"] is None
    if os.path.exists("/proc/meminfo"):
        assert info["vram_total_mb"] > 0
        assert 0 <= info["memory_used_mb"] <= info["vram_total_mb"]
    assert info["utilization_pct"] is None or 0 <= info["utilization_pct"] <= 100


@needs_no_gpu
def test_without_nvml_lists_nothing_and_describes_the_cpu():
    assert gpu.nvml_available() is False
    assert gpu.list_gpus() == []
    info = gpu.telemetry(0)
    assert set(info) == TELEMETRY_KEYS
    assert info["name"].startswith("cpu (")


def test_probe_never_imports_torch():
    # The worker parent must not load CUDA; importing and using the probe must not pull torch.
    code = "import sys; from workers import gpu; gpu.list_gpus(); gpu.telemetry(0); print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.stdout.strip() == "False"


@needs_gpu
def test_list_gpus():
    assert [g.index for g in GPUS] == list(range(len(GPUS)))
    for g in GPUS:
        assert g.name and g.uuid.startswith(("GPU-", "MIG-"))
        assert g.vram_total_mb > 1000


@needs_gpu
def test_gpu_telemetry():
    info = gpu.telemetry(0)
    assert set(info) == TELEMETRY_KEYS
    assert info["name"] == GPUS[0].name
    assert info["vram_total_mb"] == pytest.approx(GPUS[0].vram_total_mb)
    assert 0 <= info["memory_used_mb"] <= info["vram_total_mb"]
    with pytest.raises(IndexError):
        gpu.telemetry(len(GPUS))
