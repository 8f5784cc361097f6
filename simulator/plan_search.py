"""The plan's search: configurations the executor can run, scored by the replay, pruned by the bounds.

A ``Point`` is one configuration, with its budgets given as shares of what
fits (``budget_share`` of the largest device budget that fits beside the dense
weights, the KV cache and the workspace; ``host_share`` of the host RAM left
for a disk tier's host budget), so that one point means the same thing for
every expert format. ``Planner.evaluate`` turns a point into ``ReplayOptions``
(router-based predictors become ``noisy-oracle`` with their measured recall
and precision), replays it on the plan's workload and returns its row;
``Planner.bound`` is the cheap cached bound of the same point in its own
expert format (bounds.py: the copy-only bound for ``copy``, the hybrid floor
for points that compute on the host), computed without a replay; a row's
``bound_tokens_per_s`` is the same bound, so no row is above it.

``Planner.search`` is cyclic coordinate ascent from the plain default and the
hybrid default: for each axis in turn, the best point so far with that axis
changed is replayed unless its bound is not above the best score so far
(pruned), and the best is kept; it stops when every other axis has been
scanned since the last improvement (no axis can improve alone), or after
``max_rounds`` passes. The answer is the best point simulated (ties: the
earlier one). A point that cannot run is counted with its reason
(``reasons``); a search where none of the starting points runs says the first
reasons. ``Planner.run_all``
replays every point of a space (the exhaustive comparison of
``benchmarks/plan.py``).

This module prints nothing and knows nothing about the command line.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace

from moe_runtime.core.budget import (
    layer_demand,
    minimum_slots,
    parse_bytes,
)
from moe_runtime.core.errors import MoeError
from moe_runtime.core.memory import memory_plan
from moe_runtime.core.policies import EVICTION_POLICIES

from .bounds import BoundsCache, bounds, hybrid_floor, trace_digest
from .cost_model import CostModel
from .plan_inputs import ROUTER_PREDICTORS, quality_at
from .replay import Replay, ReplayOptions, build_workload

HOST_RAM_RESERVE = 0.10  # of --host-ram kept for the OS and the process, never planned for experts


@dataclass(frozen=True)
class Point:
    """One configuration the executor can run (budgets as shares of what fits)."""

    miss_policy: str = "copy"
    predictor: str = "none"
    lookahead: int = 1
    eviction: str = "lru"
    n_host_layers: int = 0
    scope: str = "global"
    budget_share: float = 1.0
    expert_dtype: str | None = None  # None: the model's own
    expert_source: str = "memory"
    host_share: float = 1.0  # with expert_source disk: share of the host RAM for experts as the host tier

    def key(self) -> tuple:
        return tuple(self.__dict__.values())


PLAIN = Point()  # LRU, no prefetch, copy-only, the largest budget that fits


@dataclass(frozen=True)
class Space:
    """The values searched per axis (``predictors``: (name, lookahead) pairs)."""

    miss_policies: tuple = ("copy", "auto", "host")
    predictors: tuple = (("none", 1), ("history", 1), ("history", 2), ("popularity", 1))
    evictions: tuple = ("lru", "lfu", "fifo", "layer-cyclic")
    n_host_layers: tuple = (0,)
    scopes: tuple = ("global", "per-layer")
    budget_shares: tuple = (1.0, 0.75, 0.5)
    expert_dtypes: tuple = (None,)
    sources: tuple = (("memory", 1.0),)

    def axes(self) -> list[tuple[str, list[dict]]]:
        """(axis name, the point fields each value sets) in the order coordinate ascent visits them."""
        return [("miss_policy", [{"miss_policy": m} for m in self.miss_policies]),
                ("predictor", [{"predictor": p, "lookahead": la} for p, la in self.predictors]),
                ("eviction", [{"eviction": e} for e in self.evictions]),
                ("n_host_layers", [{"n_host_layers": n} for n in self.n_host_layers]),
                ("scope", [{"scope": s} for s in self.scopes]),
                ("budget", [{"budget_share": b} for b in self.budget_shares]),
                ("expert_dtype", [{"expert_dtype": d} for d in self.expert_dtypes]),
                ("source", [{"expert_source": s, "host_share": h} for s, h in self.sources])]

    def points(self) -> list[Point]:
        """Every point of the grid (the exhaustive comparison), invalid combinations included."""
        out = []
        for combo in itertools.product(*(vals for _, vals in self.axes())):
            d = {}
            for part in combo:
                d.update(part)
            out.append(Point(**d))
        return list(dict.fromkeys(out))


def is_cpu(device) -> bool:
    """A profile of a CPU-only machine (`moe-runtime profile --device cpu`): host and device are one."""
    return device.name.startswith("cpu") or "profile on cpu" in (device.source or "")


def evictions_for_executor() -> tuple:
    """Eviction policies the executor runs from the options alone (no future, no popularity file)."""
    return tuple(n for n, p in EVICTION_POLICIES.items() if not p.needs_future and not p.needs_popularity)


def size(n: int) -> str:
    """Bytes as GB, MB or kB, with enough digits to see what does not fit."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


class Planner:
    """Scores points of one (model, device, host, trace, batch, context) on one workload."""

    def __init__(self, spec, device, trace, *, batch: int, context: int, workspace: str, host_profile: str,
                 host_ram_bytes: int, quality: dict | None = None, seed: int = 0) -> None:
        self.spec, self.device, self.trace = spec, device, trace
        self.cpu = is_cpu(device)
        self.batch, self.context, self.workspace = batch, context, workspace
        self.host_profile, self.host_ram = host_profile, host_ram_bytes
        self.host_avail = int(host_ram_bytes * (1 - HOST_RAM_RESERVE))
        self.quality, self.seed = quality or {}, seed
        self.cost = CostModel(spec, device)
        self.workload = build_workload(trace, batch)
        self.digest = trace_digest(trace)
        self.bounds_cache = BoundsCache()
        self.rows: dict[tuple, dict] = {}  # point key -> row (every point simulated)
        self.pruned = 0
        self.invalid = 0
        self.floors: dict[tuple, dict] = {}  # (expert format, source) -> its hybrid floor (bounds.hybrid_floor)
        self.reasons: dict[str, int] = {}  # why points could not run: message -> points, first seen first
        self.sim_wall_s = 0.0

    # -- memory ------------------------------------------------------------------------------
    def fmt_spec(self, expert_dtype):
        return self.spec if expert_dtype is None else self.spec.with_expert_dtype(expert_dtype)

    def memory(self, expert_dtype=None):
        return memory_plan(self.fmt_spec(expert_dtype), device_name=self.device.name,
                           device_bytes=self.device.memory_bytes, context=self.context, batch=self.batch,
                           workspace_bytes=parse_bytes(self.workspace, "--workspace"))

    def max_slots(self, expert_dtype=None) -> int:
        s = self.fmt_spec(expert_dtype)
        free = self.memory(expert_dtype).free_for_experts
        return max(0, min(free // s.expert_bytes, s.n_moe_layers * s.n_experts))

    def host_slots(self, point: Point) -> int | None:
        if point.expert_source != "disk":
            return None
        s = self.fmt_spec(point.expert_dtype)
        return min(int(self.host_avail * point.host_share) // s.expert_bytes, s.n_moe_layers * s.n_experts)

    def minimum_slots(self) -> int:
        """The smallest budget any configuration runs with (no prefetch, one global pool)."""
        demand = layer_demand(top_k=self.spec.top_k, batch=self.batch, n_experts=self.spec.n_experts)
        return minimum_slots(experts_per_layer=demand, max_inflight=0, prefetching=False,
                             scope="global", n_moe_layers=self.spec.n_moe_layers)

    def fits_host(self, point: Point) -> bool:
        """Experts in host memory need all of them in the RAM left for experts."""
        return point.expert_source == "disk" or self.fmt_spec(point.expert_dtype).total_expert_bytes <= self.host_avail

    # -- one point -----------------------------------------------------------------------------
    def options(self, point: Point) -> ReplayOptions:
        """The replay's options for ``point`` (MoeError when the executor could not run it)."""
        if point.expert_source == "disk" and (point.miss_policy != "copy" or point.n_host_layers):
            raise MoeError("host compute reads the host copy: experts on disk are copied (miss policy copy)")
        if not self.fits_host(point):
            raise MoeError("the experts do not fit in host RAM")
        pred, extra = point.predictor, {}
        if pred in ROUTER_PREDICTORS:
            q = self.quality.get(pred)
            rp = quality_at(q, point.lookahead) if q else None
            if rp is None:
                raise MoeError(f"no measured quality of {pred} at lookahead {point.lookahead}")
            pred, extra = "noisy-oracle", {"recall": rp[0], "precision": rp[1]}
        host = None if self.cpu else self.host_slots(point)  # a CPU's expert budget is the RAM tier itself
        budget = "fit" if point.budget_share == 1.0 else f"fit:{100 * point.budget_share:g}%"  # as sweeps spell it
        return ReplayOptions(budget=budget, eviction=point.eviction, scope=point.scope, predictor=pred,
                             lookahead=point.lookahead, miss_policy=point.miss_policy,
                             n_host_layers=point.n_host_layers, host_profile=self.host_profile,
                             context=self.context, workspace=self.workspace, expert_dtype=point.expert_dtype,
                             expert_source=point.expert_source, host_budget=None if host is None else str(host),
                             batch=self.batch, seed=self.seed, **extra)

    def replay(self, point: Point) -> Replay:
        return Replay(self.trace, self.cost, self.options(point), workload=self.workload, fit_check=True)

    def bound(self, point: Point) -> float:
        """Tokens/s no run of ``point`` beats, in its own expert format (bounds.py): copy-only, Belady's misses
        at full bandwidth; computing on the host, the hybrid floor (the same for every such point of one
        format: it ranges over every choice of host experts)."""
        r = self.replay(point)
        if r.opts.computes_on_host:
            key = (point.expert_dtype, point.expert_source)
            if key not in self.floors:
                self.floors[key] = hybrid_floor(r.cost, self.workload, r.host_cost.host_s)
            return self.floors[key]["hybrid_floor_tokens_per_s"]
        n_tok = int(self.workload.n_tokens.sum())
        b = bounds(self.workload.ids, n_slots=r.n_slots, scope=r.opts.scope, n_moe_layers=self.trace.n_layers,
                   expert_bytes=r.expert_bytes, compute_s=r.resident_s, n_tokens=n_tok,
                   h2d_bytes_per_s=r._link_bytes_per_s(), copy_engines=r.link_engines,
                   key=BoundsCache.key(self.digest, r.n_slots, r.opts.scope, self.trace.n_tokens, self.batch),
                   cache=self.bounds_cache)
        return b["best_tokens_per_s"]

    @staticmethod
    def row_bound(rep: dict) -> float:
        """The proven bound of a replay's report: the hybrid floor when it computed on the host (host compute
        takes work off the device, so the copy-only bound and the all-resident time do not hold), else the
        copy-only bound."""
        b = rep["bounds"]
        return b["hybrid_floor_tokens_per_s"] if "hybrid_floor_tokens_per_s" in b else b["best_tokens_per_s"]

    def evaluate(self, point: Point) -> dict:
        """Replay ``point`` (once; later calls return the same row)."""
        if point.key() in self.rows:
            return self.rows[point.key()]
        t = time.perf_counter()
        rep = self.replay(point).run()
        self.sim_wall_s += time.perf_counter() - t
        row = {"point": point, "tokens_per_s": rep["tokens_per_s"], "bound_tokens_per_s": self.row_bound(rep),
               "n_slots": rep["n_slots"], "expert_bytes": rep["expert_bytes"], "memory": rep["memory"],
               "host_slots": self.host_slots(point), "hits": rep["hits"], "misses": rep["misses"],
               "host_computed": rep.get("host_computed", 0), "options": rep["options"], "order": len(self.rows)}
        self.rows[point.key()] = row
        return row

    def try_point(self, point: Point, best: float | None) -> dict | None:
        """The row of ``point``, or None when it cannot run or its bound cannot beat ``best``."""
        if point.key() in self.rows:
            return self.rows[point.key()]
        try:
            if best is not None and self.bound(point) <= best:
                self.pruned += 1
                return None
            return self.evaluate(point)
        except MoeError as e:
            self.invalid += 1
            self.reasons[str(e)] = self.reasons.get(str(e), 0) + 1
            return None

    # -- search --------------------------------------------------------------------------------
    def fits_device(self, expert_dtype) -> bool:
        """The device holds the dense weights, the KV cache, the workspace and the smallest expert budget."""
        return self.memory(expert_dtype).free_for_experts >= \
            self.minimum_slots() * self.fmt_spec(expert_dtype).expert_bytes

    def plain(self, space: Space) -> Point:
        """The plain default in ``space``: LRU, no prefetch, copy-only, the largest budget that fits, in the
        first expert format of the space (the model's own first) that fits the device and, on the first
        source of the space that holds its experts, the host."""
        for d in space.expert_dtypes:
            if not self.fits_device(d):
                continue
            for src, share in space.sources:
                p = replace(PLAIN, expert_dtype=d, expert_source=src, host_share=share)
                if self.fits_host(p):
                    return p
        return replace(PLAIN, expert_source=space.sources[0][0], host_share=space.sources[0][1])

    def why_none(self) -> str:
        """The first distinct reasons points could not run, for the error of a search that found none."""
        if not self.reasons:
            return "no point was tried"
        first = [f"{m if len(m) <= 160 else m[:157] + '...'} ({n} point{'s' * (n != 1)})"
                 for m, n in list(self.reasons.items())[:2]]  # each cut: the error stays one short line
        more = len(self.reasons) - len(first)
        return "; ".join(first) + (f"; and {more} other reason(s)" if more > 0 else "")

    def search(self, space: Space, max_rounds: int = 4) -> dict:
        """Coordinate ascent over ``space`` from the plain and the hybrid defaults (module docstring)."""
        best = None
        plain = self.plain(space)
        seeds = [plain] + [replace(plain, miss_policy=m) for m in space.miss_policies if m != plain.miss_policy][:1]
        for seed in seeds:
            row = self.try_point(seed, None)
            if row is not None and (best is None or row["tokens_per_s"] > best["tokens_per_s"]):
                best = row
        if best is None:
            raise MoeError(f"no configuration of the search space can run here: {self.why_none()}")
        axes = [values for _, values in space.axes()]
        since, scans = -1, 0  # axes scanned since the last improvement (the improving one included: 0)
        while since < len(axes) - 1 and scans < max_rounds * len(axes):
            values = axes[scans % len(axes)]
            scans += 1
            improved = False
            for v in values:
                row = self.try_point(replace(best["point"], **v), best["tokens_per_s"])
                if row is not None and row["tokens_per_s"] > best["tokens_per_s"]:
                    best, improved = row, True
            since = 0 if improved else since + 1
        return self.best()

    def run_all(self, space: Space) -> dict:
        """Replay every runnable point of ``space``; the best row."""
        for p in space.points():
            self.try_point(p, None)
        return self.best()

    def best(self) -> dict:
        """The best point simulated (the first of equals)."""
        return max(self.rows.values(), key=lambda r: (r["tokens_per_s"], -r["order"]))

    def top(self, n: int = 5) -> list[dict]:
        return sorted(self.rows.values(), key=lambda r: (-r["tokens_per_s"], r["order"]))[:n]

    def check_runnable(self, space: Space) -> None:
        """MoeError naming the numbers when no configuration can run: device memory, then host RAM."""
        g = size
        fits = [d for d in space.expert_dtypes if self.fits_device(d)]
        if not fits:
            d = space.expert_dtypes[-1]
            mem, need = self.memory(d), self.minimum_slots() * self.fmt_spec(d).expert_bytes
            raise MoeError(
                f"{self.spec.name} cannot run on {self.device.name} ({g(mem.device_bytes)}): dense weights "
                f"{g(mem.dense_bytes)} + KV cache {g(mem.kv_bytes)} (context {self.context} x batch {self.batch}) + "
                f"workspace {g(mem.workspace_bytes)} leave {g(max(mem.free_for_experts, 0))} for experts, below "
                f"the minimum of {self.minimum_slots()} experts ({g(need)}); lower --context or --batch, or give "
                "more --device-memory")
        disk = any(s == "disk" for s, _ in space.sources)
        if not disk and not any(self.fits_host(Point(expert_dtype=d)) for d in fits):
            d = min(fits, key=lambda x: self.fmt_spec(x).total_expert_bytes)
            names = {x or self.spec.expert_dtype or self.spec.dtype for x in space.expert_dtypes}
            shrink = "" if "int4" in names else "--allow-dtype int4 to shrink them, "
            raise MoeError(
                f"{self.spec.name}'s experts ({g(self.fmt_spec(d).total_expert_bytes)}"
                f"{' in ' + d if d else ''}) do not fit in host RAM: {g(self.host_ram)} less a "
                f"{HOST_RAM_RESERVE:.0%} reserve leaves {g(self.host_avail)}; give --disk to keep them on storage, "
                f"{shrink}or --host-ram")
