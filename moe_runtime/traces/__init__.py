"""Routing traces: the format (``format``), its checks, the recorder, importers, statistics and synthesis.

This package is the one import for the format and the recorder
(``from moe_runtime.traces import load_trace, TraceRecorder``); ``importers``,
``stats`` and ``synth`` are imported by name where needed. It imports no torch.
"""

from moe_runtime.traces.format import (FORMAT_VERSION, PHASE_DECODE, PHASE_PREFILL, Trace, TraceMeta, load_trace, save_trace,
                                       write_atomic)
from moe_runtime.traces.recorder import TraceRecorder, make_trace

__all__ = ["FORMAT_VERSION", "PHASE_DECODE", "PHASE_PREFILL", "Trace", "TraceMeta", "TraceRecorder", "load_trace", "make_trace",
           "save_trace", "write_atomic"]
