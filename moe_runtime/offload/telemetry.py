"""GPU telemetry through NVML (pynvml): memory in use and PCIe throughput, when a GPU is there.

Contract: ``gpu_telemetry(device) -> dict | None``. For a CUDA device with NVML
available it returns ``{"name", "memory_used_bytes", "memory_total_bytes",
"pcie_tx_kbps", "pcie_rx_kbps"}`` (PCIe counters are NVML's ~20 ms samples, in
KB/s; a field NVML cannot read is None). For a CPU device, without the
``pynvml`` module, or when NVML cannot start (no driver), it returns None and
raises nothing: telemetry is optional and never stops a run.
"""

from __future__ import annotations

import torch


def gpu_telemetry(device: torch.device | str) -> dict | None:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError subclasses: no driver, no permission
        return None
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        out = {"name": _read(lambda: pynvml.nvmlDeviceGetName(h))}
        mem = _read(lambda: pynvml.nvmlDeviceGetMemoryInfo(h))
        out["memory_used_bytes"] = int(mem.used) if mem is not None else None
        out["memory_total_bytes"] = int(mem.total) if mem is not None else None
        out["pcie_tx_kbps"] = _read(lambda: pynvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_TX_BYTES))
        out["pcie_rx_kbps"] = _read(lambda: pynvml.nvmlDeviceGetPcieThroughput(h, pynvml.NVML_PCIE_UTIL_RX_BYTES))
        if isinstance(out["name"], bytes):
            out["name"] = out["name"].decode()
        return out
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _read(fn):
    try:
        return fn()
    except Exception:  # a counter this GPU or driver does not support
        return None
