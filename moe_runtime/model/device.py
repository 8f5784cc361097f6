"""The compute device's resources, asked in one place (torch): will this fit, and how many CPU threads.

- ``check_fits(what, nbytes, device)``: ``core.resources.check_fits`` against host memory, or a CUDA
  device's free memory, before anything is allocated.
- ``use_cpu_threads(device)``: the one thread rule of every CPU run (resident or offloading): all cores
  but one for compute, so a copy or reader thread has a core of its own instead of starving behind
  spinning compute threads; nothing on a GPU run.
"""

from __future__ import annotations

import os

import torch

from moe_runtime.core import resources
from moe_runtime.core.errors import MoeError


def check_fits(what: str, nbytes: int, device="cpu") -> None:
    """MoeError naming ``what``, its size and what ``device`` ("cpu", "cuda", "cuda:1") has, when it won't fit."""
    if not str(device).startswith("cuda"):
        return resources.check_fits(what, nbytes)
    if not torch.cuda.is_available():
        raise MoeError("device cuda requested but CUDA is not available")
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    resources.check_fits(what, nbytes, available=int(free), where="device memory")


def use_cpu_threads(device) -> None:
    """On a CPU run, compute on all cores but one (see the module docstring); nothing on a GPU run."""
    if str(device).startswith("cpu"):
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
