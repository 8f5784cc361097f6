"""An experiment: the grid a sweep runs (``Experiment``), read and checked from YAML.

Experiment YAML (frozen ``Experiment``; lists are swept, scalars fixed)::


    name: quickstart                 # required
    trace: traces/deepseek-v2-lite-law.npz   # one trace; relative paths: to the cwd, else the repo root
    traces: [traces/a.npz, traces/b.npz]     # or several (exactly one of trace, traces)
    model: deepseek-v2-lite          # optional (default: the trace's meta.model)
    tokens: 1000                     # optional: first N tokens
    budgets: ["10%", "50%", 2GiB, 48]
    evictions: [lru, belady]
    predictors: [none, history]      # "none" is run once, not once per lookahead
    lookaheads: [1, 2]               # default [ReplayOptions.lookahead]
    devices: [rtx-4060-8gb]          # names or YAML files
    scopes: [global]                 # default [ReplayOptions.scope]
    batch, max_inflight, prefetch_width, recall, precision, seed: scalars, defaults from ReplayOptions
    miss_policies: [copy, auto]      # optional axis: copy | host | auto (default [auto]; docs/design.md)
    host_profiles: [ddr5-desktop]    # optional axis: hosts (names in configs/hosts or YAML files)
    n_host_layers: [0, 4]            # optional axis: the first N MoE layers computed on the host
    host_layers: "0,5"               # optional: MoE layers always on the host (scalar)
    context: 4096                    # optional: positions per sequence the KV cache is sized for
    workspace: 512MiB                # optional: device memory kept for workspace
    expert_source: disk              # optional: experts on storage (the devices' storage link)
    host_budget: "25%"               # optional, with disk: a host-RAM tier between storage and the device
    out: out/quickstart              # optional (default out/<name>)

``Experiment.points()`` lists (key, trace, device, ReplayOptions) of every
point; ``size()`` counts them without building them, and ``check_size`` refuses
a grid above ``MAX_POINTS`` unless raised. ``fingerprint()`` is what the
results depend on besides the grid: a resumed sweep must match it. The hybrid
axes add ``|policy``, ``|host`` and ``|hN`` to a point's key only when the
experiment names them, so old keys keep their form. ``name`` is a plain name
(it names ``out/<name>``). Every field is checked by type and range here, with
no I/O: budgets are checked against a model's sizes by the sweep.

This module knows nothing about running a point.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from moe_runtime.core import config_files
from moe_runtime.core.budget import parse_budget
from moe_runtime.core.config_files import check_number, short
from moe_runtime.core.errors import MoeError
from moe_runtime.core.options import DEFAULT_MISS_POLICY

from .replay import ReplayOptions

_OPT = {f.name: f.default for f in fields(ReplayOptions)}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SWEPT = {"budgets": "budget", "evictions": "eviction", "predictors": "predictor", "lookaheads": "lookahead",
         "scopes": "scope"}
FIXED = ("batch", "max_inflight", "prefetch_width", "recall", "precision", "seed", "expert_dtype", "expert_source",
         "host_budget", "host_layers", "context", "workspace")
HYBRID_AXES = {"miss_policies": "miss_policy", "host_profiles": "host_profile", "n_host_layers": "n_host_layers"}
MAX_POINTS = 100_000  # a larger grid is refused unless --max-points raises it (871,200 points: 406 hours)


@dataclass(frozen=True)
class Experiment:
    name: str
    trace: str | None
    budgets: tuple
    evictions: tuple
    predictors: tuple
    devices: tuple
    lookaheads: tuple = (_OPT["lookahead"],)
    scopes: tuple = (_OPT["scope"],)
    model: str | None = None
    tokens: int | None = None
    batch: int = _OPT["batch"]
    max_inflight: int = _OPT["max_inflight"]
    prefetch_width: int | None = _OPT["prefetch_width"]
    recall: float = _OPT["recall"]
    precision: float = _OPT["precision"]
    seed: int = _OPT["seed"]
    expert_dtype: str | None = _OPT["expert_dtype"]  # overrides the model's (int4, mxfp4, ...)
    expert_source: str = _OPT["expert_source"]  # memory | disk (the devices' storage link)
    host_budget: str | None = _OPT["host_budget"]  # a host tier above the disk (three tiers)
    host_layers: str | None = _OPT["host_layers"]
    context: int = _OPT["context"]
    workspace: str = _OPT["workspace"]
    miss_policies: tuple | None = None  # None: [auto], and keys without the axis
    host_profiles: tuple | None = None  # None: the default host, and keys without the axis
    n_host_layers: tuple | None = None  # None: [0], and keys without the axis
    out: str | None = None
    traces: tuple | None = None

    def __post_init__(self) -> None:
        if (self.trace is None) == (self.traces is None):
            raise MoeError("give exactly one of trace (one file) and traces (a list of files)")
        if self.traces is not None:
            if not isinstance(self.traces, tuple) or not self.traces or not all(
                    isinstance(t, str) and t for t in self.traces):
                raise MoeError("traces must be a non-empty list of file names")
            if len({Path(t).name for t in self.traces}) != len(self.traces):
                raise MoeError("traces must have distinct file names (they name the results' rows)")
        for f in ("name",) + (("trace",) if self.traces is None else ()):
            if not isinstance(getattr(self, f), str) or not getattr(self, f):
                raise MoeError(f"{f} must be a non-empty string")
        if not _NAME.fullmatch(self.name):  # it names the folder out/<name>: no way out of out/
            raise MoeError(f"name must be a plain name (letters, digits, '.', '_', '-', starting with a letter "
                           f"or digit), got {short(self.name)}")
        if self.out is not None and (not isinstance(self.out, str) or not self.out):
            raise MoeError(f"out must be a non-empty string, got {short(self.out)}")
        for f in ("budgets", "evictions", "predictors", "devices", "lookaheads", "scopes"):
            v = getattr(self, f)
            if not isinstance(v, tuple) or not v:
                raise MoeError(f"{f} must be a non-empty list")
            for x in v:  # a list or mapping inside would reach the options as something else
                if f == "lookaheads":
                    check_number("lookahead", x, lo=1, integer=True)
                elif not isinstance(x, str) and not (f == "budgets" and isinstance(x, int)
                                                     and not isinstance(x, bool)):
                    raise MoeError(f"{f} must hold {'budgets' if f == 'budgets' else 'names'}, got {short(x)}")
        for b in self.budgets:  # syntax and "buys nothing", before anything runs; the model's sizes later
            if parse_budget(str(b), expert_bytes=1, total_experts=1 << 62, free_bytes=1 << 62) < 1:
                raise MoeError(f"budget {short(b)} buys no experts")
        for f in ("recall", "precision"):
            check_number(f, getattr(self, f), lo=0, hi=1)
        if self.tokens is not None:
            check_number("tokens", self.tokens, lo=1, integer=True)
        check_number("seed", self.seed, lo=0, hi=2**32 - 1, integer=True)
        for f in ("batch", "max_inflight", "prefetch_width"):  # a batch of 10**9 would allocate 10**9 lanes
            if getattr(self, f) is not None:
                check_number(f, getattr(self, f), lo=1, hi=1 << 16, integer=True)
        for f in HYBRID_AXES:
            v = getattr(self, f)
            if v is not None and (not isinstance(v, tuple) or not v):
                raise MoeError(f"{f} must be a non-empty list")
            for x in v or ():
                if f == "n_host_layers":
                    check_number("n_host_layers", x, lo=0, hi=4096, integer=True)
                elif not isinstance(x, str) or not x:
                    raise MoeError(f"{f} must hold names, got {short(x)}")
        if self.expert_source == "disk":  # the executor's rule: experts on disk are copied, never host-computed
            for mp, nh in itertools.product(self.axis("miss_policies"), self.axis("n_host_layers")):
                ReplayOptions(miss_policy=mp, n_host_layers=nh).for_source("disk")

    def size(self) -> int:
        """The grid's points, counted without building them ("none" once per lookahead list)."""
        none = sum(1 for p in self.predictors if p == "none")
        return (len(self.trace_list()) * len(self.devices) * len(self.scopes) * len(set(map(str, self.budgets)))
                * len(self.evictions) * (none + (len(self.predictors) - none) * len(self.lookaheads))
                * math.prod(len(getattr(self, f) or (None,)) for f in HYBRID_AXES))

    def check_size(self, max_points: int = MAX_POINTS) -> None:
        n = self.size()
        if n > max_points:
            raise MoeError(f"the grid has {n:,} points, above the limit of {max_points:,}; narrow it, or raise the "
                           "limit with --max-points")
        for p in self.points():  # validates every option combination (no I/O)
            pass

    def axis(self, f: str) -> tuple:
        """A hybrid axis's values (its default alone when the experiment does not name it)."""
        v = getattr(self, f)
        if v is not None:
            return v
        return {"miss_policies": ("copy" if self.expert_source == "disk" else DEFAULT_MISS_POLICY["command"],),
                "host_profiles": (None,),
                "n_host_layers": (0,)}[f]

    def options(self, budget, eviction, predictor, lookahead, scope, miss_policy=DEFAULT_MISS_POLICY["command"],
                host_profile=None, n_host_layers=0) -> ReplayOptions:
        return ReplayOptions(budget=str(budget), eviction=eviction, predictor=predictor, lookahead=lookahead,
                             scope=scope, tokens=self.tokens, miss_policy=miss_policy, host_profile=host_profile,
                             n_host_layers=n_host_layers, **{f: getattr(self, f) for f in FIXED})

    def trace_list(self) -> tuple:
        return self.traces if self.traces is not None else (self.trace,)

    def points(self) -> list[tuple[str, str, str, ReplayOptions]]:
        """(key, trace, device, options) of every grid point, "none" predictors once per lookahead list."""
        out, seen = [], set()
        for tr, dev, scope, b, ev, pred, la, mp, host, nh in itertools.product(
                self.trace_list(), self.devices, self.scopes, self.budgets, self.evictions, self.predictors,
                self.lookaheads, *(self.axis(f) for f in HYBRID_AXES)):
            if pred == "none":
                la = self.lookaheads[0]
            key = f"{dev}|{scope}|{b}|{ev}|{pred}|{la}"
            if self.traces is not None:  # one trace keeps the keys of old results
                key = f"{Path(tr).name}|{key}"
            for f, v in zip(HYBRID_AXES, (mp, host, f"h{nh}")):
                if getattr(self, f) is not None:
                    key += f"|{v}"
            if key not in seen:
                seen.add(key)
                out.append((key, tr, dev, self.options(b, ev, pred, la, scope, mp, host, nh)))
        return out

    def fingerprint(self) -> str:
        """What results depend on besides the grid: a resumed sweep must match it."""
        d = {k: v for k, v in asdict(self).items() if k not in SWEPT and k not in ("devices", "out", "name")
             and k not in HYBRID_AXES}
        d["semantics"] = "hybrid"  # results from before a miss could be computed on the host are not resumed
        for f in ("expert_dtype", "host_budget", "host_layers"):
            if d[f] is None:
                del d[f]  # as before it existed: old results still resume
        if d["expert_source"] == "memory":
            del d["expert_source"]
        if d["traces"] is None:
            del d["traces"]  # as before traces existed: old results still resume
        else:
            d["traces"] = sorted(d["traces"])
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def experiment_from_dict(d, max_points: int = MAX_POINTS) -> Experiment:
    if not isinstance(d, dict):
        raise MoeError("experiment must be a mapping of field: value")
    names = {f.name for f in fields(Experiment)}
    unknown = sorted(set(map(str, d)) - names)
    if unknown:
        raise MoeError(f"unknown field(s): {config_files.names(unknown)}")
    missing = [f for f in ("name", "budgets", "evictions", "predictors", "devices") if f not in d]
    if "trace" not in d and "traces" not in d:
        missing.insert(1, "trace")
    if missing:
        raise MoeError(f"missing field(s): {', '.join(missing)}")
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    d.setdefault("trace", None)
    for k in ("budgets", "evictions", "predictors", "devices", "lookaheads", "scopes", "traces", *HYBRID_AXES):
        if k in d and not isinstance(d[k], tuple):
            d[k] = (d[k],)
    try:
        exp = Experiment(**d)
    except TypeError as e:
        raise MoeError(str(e)) from None
    exp.check_size(max_points)
    return exp


def load_experiment(path, max_points: int = MAX_POINTS) -> Experiment:
    p = Path(config_files.bundled(path))  # configs/experiments/... from any working directory
    if not p.exists():
        raise MoeError(f"experiment file not found: {path}")
    if not p.is_file():
        raise MoeError(f"experiment file {path} is not a regular file (a YAML file is needed)")
    return config_files.load_yaml(p, lambda d: experiment_from_dict(d, max_points))
