"""The predictor registry: one place that maps a name to a predictor class.

Used unchanged by the executor and the simulator. The trace-based predictors
live here; the router-based ones (``gate``, ``aligned``) read the model's
hidden states, so their classes live with the model code
(``moe_runtime.predictors``) and register themselves when it is imported. Their
names are known here so that options validate everywhere; building one without
the executor says that it needs hidden states. Imports no torch.
"""

from __future__ import annotations

from dataclasses import replace

from moe_runtime.core.errors import MoeError
from moe_runtime.core.predictors.base import (PredictContext, Predictor, PredictorOptions, RoutingHistory,
                                              plan_prefetch, rank_scores)
from moe_runtime.core.predictors.history import History
from moe_runtime.core.predictors.trace_based import NoisyOracle, NonePredictor, Oracle, Popularity, Recorded

PREDICTORS: dict[str, type[Predictor]] = {
    cls.name: cls for cls in (NonePredictor, Popularity, History, Oracle, NoisyOracle, Recorded)
}
ROUTER_BASED = ("gate", "aligned")  # need hidden states: registered by moe_runtime.predictors


def register(cls: type[Predictor]) -> type[Predictor]:
    """Add a predictor class under its ``name`` (the executor's router-based ones)."""
    PREDICTORS[cls.name] = cls
    return cls


def predictor_names(*, hidden: bool = True) -> list[str]:
    """Every predictor name (without the router-based ones when ``hidden`` is False), for help and checks."""
    names = [n for n in PREDICTORS if n != "recorded"]
    if hidden:
        names += [n for n in ROUTER_BASED if n not in names]
    return names


def make_predictor(name: str, opts: PredictorOptions) -> Predictor:
    """Build a registered predictor; ``recorded:NAME`` replays predictions stored in a trace."""
    if name.startswith("recorded:"):
        return Recorded(replace(opts, recorded=name.split(":", 1)[1]))
    cls = PREDICTORS.get(name)
    if cls is None and name in ROUTER_BASED:
        raise MoeError(f"predictor {name!r} needs hidden states: it runs only in the executor")
    if cls is None or cls is Recorded:
        raise MoeError(f"unknown predictor {name!r}; choose one of {', '.join(predictor_names())} or recorded:NAME")
    return cls(opts)


__all__ = ["PREDICTORS", "ROUTER_BASED", "make_predictor", "predictor_names", "register", "Predictor",
           "PredictContext", "PredictorOptions", "RoutingHistory", "plan_prefetch", "rank_scores"]
