"""HostSpec: what the runtime and the simulator know about a host CPU computing experts, loaded from YAML.

Schema of ``configs/hosts/<name>.yaml`` (what ``moe-runtime profile`` writes for the machine it runs on;
``--host-profile NAME|FILE`` selects one, as ``--device`` selects a device)::

    name: ddr5-desktop               # str, required
    nominal: true                    # bool, required: true = cited bandwidth x measured efficiency, false = measured
    memory_bandwidth_gbps: 89.6      # float > 0, required: memcpy GB/s (decimal) of the host's memory
    threads: 8                       # int >= 1, optional: the threads the throughput was measured with
    formats:                         # required: per expert format, per batch (tokens), the expert throughput
      bf16:                          #   as GB/s of the expert's stored weights, and GFLOP/s
        1: {gbps: 40.1, gflops: 40.1}
        32: {gbps: 30.0, gflops: 960.0}
    source: "..."                    # str, optional: sources of the cited numbers
    measurement: "..."               # str, optional: the measurement the efficiencies come from

Formats are ``bf16 fp16 fp32 int8 int4 mxfp4`` (``FORMATS``: the expert codecs' names). A throughput is
never above the memory bandwidth (weights are read at least once). ``expert_seconds`` gives the host's
time for one expert of any shape at n tokens: at a listed batch, max(bytes / GB/s, n x FLOPs / GFLOP/s);
between two listed batches, linear in n between their times; below the smallest, the smallest's time;
above the largest, its rates (so the time grows with n at its GFLOP/s). This module imports no torch.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

from moe_runtime.core import config_files
from moe_runtime.core.config_files import check_number, names, short
from moe_runtime.core.errors import MoeError

# host-profile format name <- expert codec name (format_sizes.CODECS)
FORMATS = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int8": "int8", "int4": "int4",
           "mxfp4": "mxfp4"}


@dataclass(frozen=True)
class HostSpec:
    name: str
    nominal: bool
    memory_bandwidth_gbps: float
    formats: dict  # format -> {batch: (gbps, gflops)}, batches ascending (normalised by host_from_dict)
    threads: int | None = None
    source: str | None = None
    measurement: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise MoeError(f"name must be a non-empty string, got {short(self.name)}")
        if not isinstance(self.nominal, bool):
            raise MoeError(f"nominal must be true or false, got {short(self.nominal)}")
        check_number("memory_bandwidth_gbps", self.memory_bandwidth_gbps, lo=0, lo_open=True, hi=1e5)
        if self.threads is not None:
            check_number("threads", self.threads, lo=1, hi=4096, integer=True)
        if not isinstance(self.formats, dict) or not self.formats:
            raise MoeError("formats must map formats (bf16, int4, ...) to {batch: {gbps, gflops}}")
        for fmt, per in self.formats.items():
            if fmt not in FORMATS.values():
                raise MoeError(f"formats: unknown format {short(fmt)}; one of {', '.join(FORMATS.values())}")
            if not isinstance(per, dict) or not per:
                raise MoeError(f"formats.{fmt} must map batch sizes to {{gbps, gflops}}")
            for b, (gbps, gflops) in per.items():
                check_number(f"formats.{fmt} batch", b, lo=1, hi=1 << 16, integer=True)
                check_number(f"formats.{fmt}.{b}.gbps", gbps, lo=0, lo_open=True, hi=self.memory_bandwidth_gbps)
                check_number(f"formats.{fmt}.{b}.gflops", gflops, lo=0, lo_open=True, hi=1e7)
        for f in ("source", "measurement"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, str):
                raise MoeError(f"{f} must be a string, got {short(v)}")

    def format_of(self, codec: str) -> str:
        """The profile's format name for an expert codec; MoeError when the profile has no figures for it."""
        fmt = FORMATS.get(codec, codec)
        if fmt not in self.formats:
            raise MoeError(f"host profile {self.name} has no figures for {fmt} experts (it has "
                           f"{', '.join(self.formats)}); measure them with benchmarks/host_experts.py")
        return fmt

    def expert_seconds(self, codec: str, nbytes: int, flops_per_token: float, n_tokens: int) -> float:
        """Host seconds for one expert of ``nbytes`` stored in ``codec`` applied to ``n_tokens`` tokens."""
        per = self.formats[self.format_of(codec)]
        batches = list(per)

        def at(b: int, n: int) -> float:
            gbps, gflops = per[b]
            return max(nbytes / (gbps * 1e9), n * flops_per_token / (gflops * 1e9))
        if n_tokens <= batches[0]:
            return at(batches[0], batches[0])
        if n_tokens >= batches[-1]:
            return at(batches[-1], n_tokens)
        hi = next(b for b in batches if b >= n_tokens)
        lo = batches[batches.index(hi) - 1]
        if hi == n_tokens:
            return at(hi, hi)
        f = (n_tokens - lo) / (hi - lo)
        return at(lo, lo) + f * (at(hi, hi) - at(lo, lo))


_FIELDS = {f.name for f in fields(HostSpec)}
_REQUIRED = [f.name for f in fields(HostSpec) if f.default is MISSING]


def host_from_dict(d) -> HostSpec:
    """Validate a parsed YAML mapping (errors name the field); batches are sorted."""
    if not isinstance(d, dict):
        raise MoeError("host profile must be a mapping of field: value")
    unknown = sorted(set(map(str, d)) - _FIELDS)
    if unknown:
        raise MoeError(f"unknown field(s): {names(unknown)}")
    missing = [f for f in _REQUIRED if f not in d]
    if missing:
        raise MoeError(f"missing field(s): {', '.join(missing)}")
    d = dict(d)
    fm = d["formats"]
    if isinstance(fm, dict):
        out = {}
        for fmt, per in fm.items():
            if not isinstance(per, dict) or not per:
                raise MoeError(f"formats.{short(fmt)} must map batch sizes to {{gbps, gflops}}")
            rows = {}
            for b, v in per.items():
                if not isinstance(v, dict) or set(v) != {"gbps", "gflops"}:
                    raise MoeError(f"formats.{fmt}.{short(b)} must be {{gbps: X, gflops: Y}}, got {short(v)}")
                check_number(f"formats.{fmt} batch", b, lo=1, hi=1 << 16, integer=True)
                rows[b] = (v["gbps"], v["gflops"])
            out[fmt] = dict(sorted(rows.items()))
        d["formats"] = out
    return HostSpec(**d)


def available_hosts() -> list[str]:
    return config_files.available(config_files.HOSTS_DIR)


def load_host(name_or_path) -> HostSpec:
    """A name in configs/hosts/ (e.g. ``ddr5-desktop``) or a path to a YAML file of the schema above."""
    return config_files.load_yaml(config_files.resolve(name_or_path, config_files.HOSTS_DIR, "host profile"),
                                  host_from_dict)
