"""The machine's resources, asked in one place: will this fit in memory, and how many compute threads.

Contract:
- ``available_bytes(device)`` is what a new allocation can take now: on the
  host, /proc/meminfo's MemAvailable (else free pages from ``os.sysconf``),
  lowered to the process's RLIMIT_DATA where one is set; on a CUDA device,
  the free device memory.
- ``check_fits(what, nbytes, device)`` raises one ``MoeError`` line saying
  what needs how much and what the machine has, before anything is allocated:
  "--tokens 1000000000 needs 12.3 TiB of memory; 21.4 GiB is available".
  Callers estimate ``nbytes`` from sizes alone (no allocation) and err on the
  large side; an estimate is not a promise that the run fits.
- ``use_cpu_threads(device)``: the one thread rule of every CPU run (resident or
  offloading): all cores but one for compute, so a copy or reader thread has a
  core of its own instead of starving behind spinning compute threads.

Imports torch only for a CUDA device or to set threads, so the simulator can use it.
"""

from __future__ import annotations

import os
import resource

from moe_runtime.core.errors import MoeError


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': how sizes are quoted in errors."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def _host_available() -> int:
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:  # not Linux, or an old kernel: free pages (an underestimate: no page cache)
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 1 << 62  # unknown: do not refuse
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    if soft != resource.RLIM_INFINITY:  # a ulimit -d, or the test suite's bound: malloc fails above it
        avail = min(avail, soft)
    return avail


def available_bytes(device="cpu") -> int:
    """Bytes a new allocation on ``device`` ("cpu", "cuda", "cuda:1" or a torch.device) can take now."""
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise MoeError("device cuda requested but CUDA is not available")
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return _host_available()


def check_fits(what: str, nbytes: int, device="cpu") -> None:
    """MoeError naming ``what``, its size and what ``device`` has, when ``nbytes`` exceed what is available."""
    avail = available_bytes(device)
    if nbytes > avail:
        where = "device memory" if str(device).startswith("cuda") else "memory"
        raise MoeError(f"{what} needs {fmt_bytes(nbytes)} of {where}; this machine has {fmt_bytes(avail)} "
                       "available")


def use_cpu_threads(device) -> None:
    """On a CPU run, compute on all cores but one (see the module docstring); nothing on a GPU run."""
    if str(device).startswith("cpu"):
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
