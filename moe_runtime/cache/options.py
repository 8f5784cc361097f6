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

from dataclasses import dataclass, field, fields

from moe_runtime.cache.policies import EVICTION_POLICIES
from moe_runtime.errors import MoeError

DEFAULT_BUDGET = {"generate": "100%", "replay": "25%"}
SCOPES = ("global", "per-layer")


def option(default, flag: str, help: str, *, type=str, aliases: tuple[str, ...] = (), choices=None):
    """A dataclass field that carries its flag: ``choices`` is a callable returning the allowed names."""
    return field(default=default, metadata=dict(flag=flag, help=help, type=type, aliases=aliases, choices=choices))


def predictor_names(*, hidden: bool = True) -> list[str]:
    """Registered predictors (without the router-based ones when ``hidden`` is False), for help and checks."""
    from moe_runtime.predictors import PREDICTORS  # the registry imports no torch

    return [n for n, c in PREDICTORS.items() if n != "recorded" and (hidden or not c.needs_hidden)]


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

    @property
    def prefetching(self) -> bool:
        return self.predictor != "none"

    def check_model(self, n_moe_layers: int) -> None:
        """Refuse a lookahead that reaches past the model's MoE layers (the same rule everywhere)."""
        if self.prefetching and self.lookahead >= n_moe_layers:
            raise MoeError(f"lookahead {self.lookahead} must be below the number of MoE layers ({n_moe_layers})")

    @classmethod
    def shared_fields(cls) -> list:
        """The fields every command has (subclasses add their own after these)."""
        return list(fields(OffloadOptions))
