"""DeviceSpec: what the simulator knows about a GPU (or a profiled machine), loaded from YAML.

Schema of ``configs/devices/<name>.yaml`` — also what ``moe-runtime profile``
writes, so a measured profile is passed to ``--device`` exactly like a bundled
nominal device::

    name: rtx-4060-8gb          # str, required
    nominal: true               # bool, required: true = public spec sheet, false = measured
    h2d_bandwidth_gbps: 12.5    # float > 0, required: host-to-device GB/s (decimal, 1e9 B/s) of ONE copy engine
    h2d_latency_us: 10          # float >= 0, required: fixed cost of one expert copy (launch + DMA setup)
    copy_engines: 1             # int >= 1, required: copies that run at the same time, each at full bandwidth
    hbm_bandwidth_gbps: 272     # float > 0, required: device memory GB/s (decimal)
    peak_tflops: 30             # float > 0, required: dense bf16/fp16 tensor TFLOP/s
    memory_gib: 8               # float > 0, required: device memory, GiB
    layer_compute_ms: 0.42      # float > 0, optional: measured all-resident decode step of one token / MoE layers
    host_layer_us: 0            # float >= 0, optional (0): host time per MoE layer that offloading adds with
                                #   misses (classify, admit, evict, submit), beyond the all-hit path
    demand_us: 0                # float >= 0, optional (0): hand-off per layer that waits on copies (the copy
                                #   thread's wake-up), on top of the copies themselves
    copy_slowdown: 0            # float >= 0, optional (0): how much longer the compute takes while a copy
                                #   runs (CPU: the copy thread shares cores and memory bandwidth with it;
                                #   0.25 = 25% longer); the analytic copies stretch compute by it
    predictor_us:               # optional: host time per MoE layer of prediction and prefetch planning,
      history: {1: 30, 2: 45}   #   per predictor and lookahead (a lookahead not listed: the nearest below)
    read_bandwidth_gbps: 1.2    # float > 0, optional: the storage link (experts on disk): direct-I/O GB/s
    read_latency_us: 250        #   reached with read_queue_depth reads in flight, and what a read alone
    read_queue_depth: 4         #   pays on top; all three or none. The disk is modelled as serving reads
                                #   one after another at that aggregate rate (the depth is folded into it);
                                #   a read queued behind another is pipelined with it (the reader threads
                                #   keep the disk busy), so only a read that starts the idle disk pays the
                                #   latency (two tiers; the host tier's reader charges it to every read)
    model: deepseek-v2-lite     # str, optional: the model layer_compute_ms was measured with
    source: "..."               # str, optional: where the numbers come from

Every number must be finite and within a range no real machine leaves
(``_NUMBERS``: e.g. bandwidths at most 1e6 GB/s); ``1e-3``-style spellings work.

Copy engines are modelled as independent: each moves one expert at a time at
``h2d_bandwidth_gbps``. A PCIe GPU has one host-to-device link, so the bundled
nominal devices use ``copy_engines: 1``; a value above 1 means copies truly
overlap (their latencies at least), and the bounds use the aggregate rate.

This module knows nothing about models, traces or time; the cost model
(``cost_model.py``) turns a device and a model into seconds.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

from moe_runtime.core import config_files
from moe_runtime.core.config_files import check_number, names, short
from moe_runtime.core.errors import MoeError


# (field, low, low excluded, high): every number finite and in a range no real machine leaves,
# so .inf, 1e308 or a negative value never reaches the cost model
# rates that divide a size have a floor (1 MB/s, 1 GFLOP/s): 1e-300 would turn a copy into a 300-digit stall
_NUMBERS = (("h2d_bandwidth_gbps", 1e-3, False, 1e6), ("h2d_latency_us", 0, False, 1e7),
            ("copy_engines", 1, False, 1024), ("hbm_bandwidth_gbps", 1e-3, False, 1e6),
            ("peak_tflops", 1e-3, False, 1e6), ("memory_gib", 0, True, 1e6), ("layer_compute_ms", 0, True, 1e7),
            ("host_layer_us", 0, False, 1e7), ("demand_us", 0, False, 1e7), ("copy_slowdown", 0, False, 100),
            ("read_bandwidth_gbps", 1e-3, False, 1e6), ("read_latency_us", 0, False, 1e7),
            ("read_queue_depth", 1, False, 1024))
_OPTIONAL = ("layer_compute_ms", "read_bandwidth_gbps", "read_latency_us", "read_queue_depth")
_STORAGE = ("read_bandwidth_gbps", "read_latency_us", "read_queue_depth")


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    nominal: bool
    h2d_bandwidth_gbps: float
    h2d_latency_us: float
    copy_engines: int
    hbm_bandwidth_gbps: float
    peak_tflops: float
    memory_gib: float
    layer_compute_ms: float | None = None
    host_layer_us: float = 0.0
    demand_us: float = 0.0
    copy_slowdown: float = 0.0
    predictor_us: dict | None = None
    read_bandwidth_gbps: float | None = None
    read_latency_us: float | None = None
    read_queue_depth: int | None = None
    model: str | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise MoeError(f"name must be a non-empty string, got {short(self.name)}")
        if not isinstance(self.nominal, bool):
            raise MoeError(f"nominal must be true or false, got {short(self.nominal)}")
        for f, lo, lo_open, hi in _NUMBERS:
            v = getattr(self, f)
            if v is not None or f not in _OPTIONAL:
                check_number(f, v, lo=lo, lo_open=lo_open, hi=hi, integer=f in ("copy_engines", "read_queue_depth"))
        given = [f for f in _STORAGE if getattr(self, f) is not None]
        if given and len(given) < len(_STORAGE):
            raise MoeError(f"the storage link needs all of {', '.join(_STORAGE)}; missing "
                           f"{', '.join(f for f in _STORAGE if f not in given)}")
        if self.predictor_us is not None:
            if not isinstance(self.predictor_us, dict):
                raise MoeError(f"predictor_us must map predictor names to {{lookahead: us}}, got "
                               f"{short(self.predictor_us)}")
            for name, per in self.predictor_us.items():
                if not isinstance(name, str) or not isinstance(per, dict) or not per:
                    raise MoeError(f"predictor_us.{short(name)} must map lookaheads to microseconds")
                for la, us in per.items():
                    check_number(f"predictor_us.{name} lookahead", la, lo=1, hi=64, integer=True)
                    check_number(f"predictor_us.{name}.{la}", us, lo=0, hi=1e7)
        for f in ("model", "source"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, str):
                raise MoeError(f"{f} must be a string, got {short(v)}")

    # -- derived, in SI units ---------------------------------------------------------
    @property
    def h2d_bytes_per_s(self) -> float:
        return self.h2d_bandwidth_gbps * 1e9

    @property
    def h2d_latency_s(self) -> float:
        return self.h2d_latency_us * 1e-6

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_bandwidth_gbps * 1e9

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    def predictor_seconds(self, predictor: str, lookahead: int) -> float:
        """Host seconds per MoE layer of ``predictor`` (``name`` or ``name:arg``) at ``lookahead``: the
        profiled value at the nearest lookahead at or below it (else the smallest); 0 if not profiled."""
        per = (self.predictor_us or {}).get(predictor.split(":", 1)[0])
        if not per:
            return 0.0
        below = [la for la in per if la <= lookahead]
        return per[max(below) if below else min(per)] * 1e-6

    def copy_seconds(self, n_bytes: int) -> float:
        """Time one copy engine takes to move ``n_bytes``: latency + bytes / bandwidth."""
        return self.h2d_latency_s + n_bytes / self.h2d_bytes_per_s

    @property
    def has_storage(self) -> bool:
        return self.read_bandwidth_gbps is not None

    def read_seconds(self, n_bytes: int) -> float:
        """Time the storage link takes for one read of ``n_bytes`` that starts the idle disk: latency + bytes /
        aggregate bandwidth (reads are served one after another at the rate ``read_queue_depth`` reads in
        flight reach; the two-tier replay charges the latency only to a read that starts the idle disk)."""
        return self.read_latency_us * 1e-6 + n_bytes / (self.read_bandwidth_gbps * 1e9)


_FIELDS = {f.name for f in fields(DeviceSpec)}
_REQUIRED = [f.name for f in fields(DeviceSpec) if f.default is MISSING]


def device_from_dict(d) -> DeviceSpec:
    """Validate a parsed YAML mapping; errors name the field."""
    if not isinstance(d, dict):
        raise MoeError("device spec must be a mapping of field: value")
    unknown = sorted(set(map(str, d)) - _FIELDS)
    if unknown:
        raise MoeError(f"unknown field(s): {names(unknown)}")
    missing = [f for f in _REQUIRED if f not in d]
    if missing:
        raise MoeError(f"missing field(s): {', '.join(missing)}")
    return DeviceSpec(**d)


def available_devices() -> list[str]:
    return config_files.available(config_files.DEVICES_DIR)


def load_device(name_or_path) -> DeviceSpec:
    """A name in configs/devices/ (e.g. ``t4``) or a path to a YAML file of the schema above."""
    return config_files.load_yaml(config_files.resolve(name_or_path, config_files.DEVICES_DIR, "device"), device_from_dict)
