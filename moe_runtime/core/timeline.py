"""Chrome/Perfetto trace-event timelines, shared by the executor and the simulator.

A timeline is a list of complete events ("ph": "X") on named lanes (a compute
lane, one lane per copy engine). Times are seconds on the caller's clock
(wall time or simpy time); the file holds microseconds, as the format wants.
Open the file in https://ui.perfetto.dev or chrome://tracing.
"""

from __future__ import annotations

import os

from moe_runtime.core.outputs import write_json_atomic


class Timeline:
    def __init__(self, process_name: str = "moe") -> None:
        self.process_name = process_name
        self._lanes: dict[str, int] = {}
        self.events: list[dict] = []

    def lane(self, name: str) -> int:
        """Thread id for a lane, created in order of first use (so 'compute' can come first)."""
        return self._lanes.setdefault(name, len(self._lanes))

    def add(self, lane: str, name: str, start_s: float, dur_s: float, **args) -> None:
        ev = {"name": name, "ph": "X", "pid": 0, "tid": self.lane(lane),
              "ts": start_s * 1e6, "dur": max(dur_s, 0.0) * 1e6}
        if args:
            ev["args"] = args
        self.events.append(ev)

    def to_json(self) -> dict:
        meta = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": self.process_name}}]
        meta += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": lane}}
                 for lane, tid in self._lanes.items()]
        return {"traceEvents": meta + self.events, "displayTimeUnit": "ms"}

    def write(self, path: str | os.PathLike) -> None:
        """Write atomically (``moe_runtime.core.outputs``): a crash never leaves a half-written file."""
        write_json_atomic(path, self.to_json())
