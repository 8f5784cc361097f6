"""The offloading options, defined once for `moe-runtime generate`, `moe-sim replay` and sweeps.

``OffloadOptions`` is a frozen dataclass: each field holds its default, its
command-line flag (and hidden aliases kept so old commands still run) and its
help text in the field's metadata; ``__post_init__`` validates against the
policy and predictor registries and does no I/O. ``cli/options.py`` builds
argparse flags from these fields, the simulator's ``ReplayOptions`` extends the
class, and a sweep's experiment keys name the same fields (``budgets`` ->
``budget``, ...), so no default or name is typed twice.

Where the commands differ on purpose, it is said here: ``budget`` is None by
default; ``generate`` then keeps every expert resident unless another
offloading option is given, and uses ``DEFAULT_BUDGET["generate"]`` if one is;
``moe-sim replay`` uses ``DEFAULT_BUDGET["replay"]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from moe_runtime.core.policies import EVICTION_POLICIES
from moe_runtime.core.predictors import predictor_names
from moe_runtime.core.config_files import short
from moe_runtime.core.errors import MoeError
from moe_runtime.core.budget import parse_budget

DEFAULT_BUDGET = {"generate": "100%", "replay": "fit"}
# ``miss_policy`` None: the commands (`moe-sim replay`, sweeps) use "auto"; options built in code without one
# copy every miss, as before hybrid execution existed (what the reference and differential tests pin)
DEFAULT_MISS_POLICY = {"command": "auto", "code": "copy"}
DEFAULT_HOST_PROFILE = "ddr5-desktop"  # the simulator's host when a policy computes on it and none is named
MISS_POLICIES = ("copy", "host", "auto")
SCOPES = ("global", "per-layer")
SOURCES = ("memory", "disk")


def option(default, flag: str, help: str, *, type=str, aliases: tuple[str, ...] = (), choices=None,
           metavar: str | None = None):
    """A dataclass field that carries its flag: ``choices`` is a callable returning the allowed names;
    ``metavar`` names the value in help (default: the field's name in capitals)."""
    return field(default=default, metadata=dict(flag=flag, help=help, type=type, aliases=aliases, choices=choices,
                                                metavar=metavar))


def parse_expert_source(text) -> tuple[str, str | None]:
    """``memory`` | ``disk`` | ``disk:FILE`` -> (kind, file or None); MoeError on anything else."""
    kind, colon, path = str(text).partition(":")
    if not isinstance(text, str) or kind not in SOURCES or (kind == "memory" and colon) or (
            kind == "disk" and colon and not path):
        raise MoeError(f"--expert-source must be memory, disk or disk:FILE, not {short(text)}")
    return kind, path or None


def _check_int(name: str, v, lo: int) -> None:
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
        raise MoeError(f"{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")


@dataclass(frozen=True)
class OffloadOptions:
    """The settings of the expert cache and its prefetching, shared by the executor and the simulator."""

    budget: str | None = option(
        None, "--expert-budget", aliases=("--budget",),
        help="expert cache: bytes (4GiB), a share of all experts (25%%) or a count of experts (48)")
    eviction: str = option("lru", "--eviction", aliases=("--policy",), choices=lambda: list(EVICTION_POLICIES),
                           help="eviction policy")
    scope: str = option("global", "--cache-scope", choices=lambda: list(SCOPES),
                        help="one pool for all MoE layers, or an equal share per MoE layer")
    predictor: str = option("none", "--predictor", help="prefetch predictor: {predictors} or recorded:NAME")
    lookahead: int = option(1, "--lookahead", type=int, help="predict MoE layers l+1..l+D")
    prefetch_width: int | None = option(None, "--prefetch-width", type=int,
                                        help="experts prefetched per predicted layer (default: what one "
                                             "layer needs, top-k x batch)")
    max_inflight: int = option(4, "--max-inflight", type=int, help="prefetches in flight at most")
    expert_source: str = option(
        "memory", "--expert-source",
        help="where experts live: host memory, or storage (disk: the checkpoint's safetensors, disk:FILE: a "
             "file made by `moe-runtime pack`; the simulator models the device profile's storage link)")
    host_budget: str | None = option(
        None, "--host-budget",
        help="a host-RAM tier of this many experts between storage and the device (GPU runs with "
             "--expert-source disk; on a CPU the expert budget is the RAM tier)")

    def __post_init__(self) -> None:
        if self.eviction not in EVICTION_POLICIES:
            raise MoeError(f"unknown eviction policy {self.eviction!r}; choose one of {', '.join(EVICTION_POLICIES)}")
        if self.scope not in SCOPES:
            raise MoeError(f"cache scope must be 'global' or 'per-layer', not {self.scope!r}")
        known = predictor_names()
        if not (self.predictor in known or (self.predictor.startswith("recorded:") and len(self.predictor) > 9)):
            raise MoeError(f"unknown predictor {self.predictor!r}; choose one of {', '.join(known)} or recorded:NAME")
        for name in ("lookahead", "max_inflight", "prefetch_width"):
            _check_int(name, getattr(self, name), 1)
        parse_expert_source(self.expert_source)
        for flag, b in (("--expert-budget", self.budget), ("--host-budget", self.host_budget)):
            if b is not None:  # its syntax now ('' is no default, 5,000 digits no number); its size per model later
                try:
                    parse_budget(b, expert_bytes=1, total_experts=1 << 62, free_bytes=1 << 62)  # fit: syntax only
                except MoeError as e:
                    raise MoeError(f"{flag}: {e}") from None
        if self.host_budget is not None and self.source_kind == "memory":
            raise MoeError("--host-budget sizes the host tier under --expert-source disk; experts in memory "
                           "are all in host memory already")

    @property
    def source_kind(self) -> str:
        """``memory`` or ``disk`` (a ``disk:FILE`` source's file is the executor's business)."""
        return parse_expert_source(self.expert_source)[0]

    @property
    def prefetching(self) -> bool:
        return self.predictor != "none"

    def check_model(self, n_moe_layers: int) -> None:
        """Refuse a lookahead that reaches past the model's MoE layers (the same rule everywhere)."""
        if self.prefetching and self.lookahead >= n_moe_layers:
            raise MoeError(f"lookahead {self.lookahead} must be below the number of MoE layers ({n_moe_layers})")


def parse_layer_list(text, n_moe_layers: int | None = None) -> tuple[int, ...]:
    """``"0,1,5"`` (or a list) -> sorted MoE-layer indices; MoeError on anything else or past the model."""
    if text is None or text == "":
        return ()
    items = text if isinstance(text, (list, tuple)) else str(text).replace(" ", "").split(",")
    try:
        out = sorted({int(i) for i in items if not isinstance(i, bool)})
        if len(out) != len(items) or any(isinstance(i, float) and not i.is_integer() for i in items):
            raise ValueError
    except (TypeError, ValueError):
        raise MoeError(f"--host-layers must be MoE-layer indices like 0,1,5, not {short(text)}") from None
    if out and out[0] < 0:
        raise MoeError(f"--host-layers indices must be >= 0, got {out[0]}")
    if n_moe_layers is not None and out and out[-1] >= n_moe_layers:
        raise MoeError(f"--host-layers index {out[-1]} is past the model's {n_moe_layers} MoE layers (0-based)")
    return tuple(out)


@dataclass(frozen=True)
class HybridOptions:
    """Hybrid execution: a miss copied or computed on the host, and layers always on the host.

    Used by `moe-sim replay` and sweeps (``ReplayOptions``) and by the executor (``ExecutorOptions``
    extends it). See docs/design.md for the semantics.
    """

    miss_policy: str | None = option(
        None, "--miss-policy", choices=lambda: list(MISS_POLICIES),
        help="a missed expert: copy it to the device, compute it on the host, or auto (the cheaper by the "
             "host profile and the link's queue, per expert)")
    n_host_layers: int = option(0, "--n-host-layers", type=int,
                                help="the first N MoE layers' experts are always computed on the host")
    host_layers: str | None = option(None, "--host-layers",
                                     help="MoE-layer indices (0-based, e.g. 0,1,5) always computed on the host")
    host_profile: str | None = option(None, "--host-profile",
                                      help="host profile: a name in configs/hosts or a YAML file "
                                           f"(default for the simulator: {DEFAULT_HOST_PROFILE}; for the "
                                           "executor: a short measurement at start-up)")

    def __post_init__(self) -> None:
        if self.miss_policy is not None and self.miss_policy not in MISS_POLICIES:
            raise MoeError(f"--miss-policy must be one of {', '.join(MISS_POLICIES)}, got {short(self.miss_policy)}")
        _check_int("n_host_layers", self.n_host_layers, 0)
        parse_layer_list(self.host_layers)
        if self.host_profile is not None and (not isinstance(self.host_profile, str) or not self.host_profile):
            raise MoeError(f"--host-profile must be a name or a file, got {short(self.host_profile)}")

    @property
    def policy(self) -> str:
        """The miss policy in force for options built in code (None: copy; commands fill in auto)."""
        return self.miss_policy or DEFAULT_MISS_POLICY["code"]

    def host_layer_set(self, n_moe_layers: int) -> frozenset:
        """The MoE layers computed on the host: the first ``n_host_layers`` and ``host_layers``."""
        if self.n_host_layers > n_moe_layers:
            raise MoeError(f"--n-host-layers {self.n_host_layers} is more than the model's {n_moe_layers} MoE layers")
        return frozenset(range(self.n_host_layers)) | frozenset(parse_layer_list(self.host_layers, n_moe_layers))

    @property
    def computes_on_host(self) -> bool:
        return self.policy != "copy" or self.n_host_layers > 0 or bool(parse_layer_list(self.host_layers))

    def for_source(self, source_kind: str):
        """These options as a command runs them with experts in ``source_kind`` ("memory" or "disk"): an unset
        miss policy becomes the commands' default (auto; copy with experts on disk, whose host copies are on
        storage). Host compute with experts on disk is refused, in the executor and the simulator alike."""
        hybrid = self if self.miss_policy is not None else replace(
            self, miss_policy="copy" if source_kind == "disk" else DEFAULT_MISS_POLICY["command"])
        if source_kind == "disk" and hybrid.computes_on_host:
            layers = [f for f, on in (("--n-host-layers", hybrid.n_host_layers > 0),
                                      ("--host-layers", bool(parse_layer_list(hybrid.host_layers)))) if on]
            policy = [f"--miss-policy {hybrid.policy}"] if hybrid.policy != "copy" else []
            cure = ["--miss-policy copy"] * bool(policy) + [f"no {f}" for f in layers]
            raise MoeError(f"host compute ({', '.join(policy + layers)}) reads the experts' host copies, which "
                           f"--expert-source disk keeps on storage: give {' and '.join(cure)}")
        return hybrid


@dataclass(frozen=True)
class MemoryOptions:
    """What a budget must fit beside in the device's memory (the dense weights too): the simulator's check."""

    context: int = option(4096, "--context", type=int,
                          help="positions per sequence the KV cache is sized for (device memory check)")
    workspace: str = option("512MiB", "--workspace",
                            help="device memory kept for the CUDA context, activations and kernel workspace")

    def __post_init__(self) -> None:
        _check_int("context", self.context, 1)
        from moe_runtime.core.budget import parse_bytes
        parse_bytes(self.workspace, "--workspace")
