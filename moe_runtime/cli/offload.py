"""The offloading flags of `moe-runtime generate` (and `serve`): built from ``OffloadOptions`` and
``ExecutorOptions``, read back into them. The run itself is assembled by ``offload/session.py``.

Contract: ``add_arguments(parser)`` adds the flags; ``run_options(args)`` returns (``OffloadOptions`` or
None when no offloading flag differs from its default: every expert resident, the reference;
``ExecutorOptions``). ``summary(report)`` is the one-line offload summary of plain-text output.
"""

from __future__ import annotations

import argparse

from moe_runtime.core.flags import add_option_flags, option_fields, options_from_args
from moe_runtime.core.options import DEFAULT_BUDGET, DEFAULT_MISS_POLICY, OffloadOptions, parse_expert_source
from moe_runtime.offload.session import ExecutorOptions

_OPTION_CLASSES = (OffloadOptions, ExecutorOptions)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("offloading (any of these turns it on; without them every expert is resident)")
    add_option_flags(g, OffloadOptions, default_note={
        "budget": DEFAULT_BUDGET["generate"].replace("%", "%%") + " when another offloading option is given"})
    add_option_flags(g, ExecutorOptions, default_note={
        "miss_policy": f"{DEFAULT_MISS_POLICY['command']} (copy with --expert-source disk)"})


def offloading(args: argparse.Namespace) -> bool:
    """True when any offloading flag differs from its default."""
    return any(getattr(args, f.name) != f.default for cls in _OPTION_CLASSES for f in option_fields(cls))


def run_options(args: argparse.Namespace, **executor) -> tuple[OffloadOptions | None, ExecutorOptions]:
    """(the offloading options, or None for the all-resident run; the executor options plus ``executor``).
    The miss policy left unset is the commands' default (auto), except with experts on disk: copy (host
    compute reads the experts' host copies)."""
    opts = options_from_args(OffloadOptions, args) if offloading(args) else None
    xopts = options_from_args(ExecutorOptions, args, config_file=getattr(args, "config", None), **executor)
    if opts is not None:
        xopts = xopts.for_source(parse_expert_source(opts.expert_source)[0])
    return opts, xopts


def summary(report: dict) -> str:
    """One line: what the cache did (hits, late prefetches, misses and those computed on the host, stall,
    bytes copied, fills)."""
    acc = max(report.get("accesses", 0), 1)
    policy = report.get("miss_policy", "copy")
    hybrid = (f" (miss policy {policy}: {report.get('host_computed', 0)} computed on the host, "
              f"{report.get('fills', 0)} fills)") if policy != "copy" or report.get("host_computed") else ""
    return (f"offload: {report['hits']} hits ({report['hits'] / acc:.0%}), {report['late']} late, "
            f"{report['misses']} misses of {report['accesses']} expert accesses{hybrid}; stall "
            f"{report['stall_s']:.3f} s; {report['bytes_h2d'] / 1e6:.1f} MB copied into {report['budget_slots']} slots")
