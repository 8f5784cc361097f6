"""The machine's resources, asked in one place: will this fit in memory, and how many compute threads.

Contract:
- ``available_bytes()`` is what a new host allocation can take now:
  /proc/meminfo's MemAvailable (else free pages from ``os.sysconf``), lowered
  to the process's RLIMIT_DATA where one is set. A CUDA device's free memory
  is asked by ``model/device.py`` (torch), which calls ``check_fits`` with it.
- ``check_fits(what, nbytes, device)`` raises one ``MoeError`` line saying
  what needs how much and what the machine has, before anything is allocated:
  "--tokens 1000000000 needs 12.3 TiB of memory; 21.4 GiB is available".
  Callers estimate ``nbytes`` from sizes alone (no allocation) and err on the
  large side; an estimate is not a promise that the run fits.

Imports no torch (the core's rule).
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


def available_bytes() -> int:
    """Bytes a new allocation in host memory can take now (see the module docstring)."""
    return _host_available()


def check_fits(what: str, nbytes: int, available: int | None = None, where: str = "memory") -> None:
    """MoeError naming ``what``, its size and what there is, when ``nbytes`` exceed ``available`` (default:
    host memory available now; ``model/device.py`` passes a CUDA device's free memory)."""
    avail = available_bytes() if available is None else available
    if nbytes > avail:
        raise MoeError(f"{what} needs {fmt_bytes(nbytes)} of {where}; this machine has {fmt_bytes(avail)} "
                       "available")
