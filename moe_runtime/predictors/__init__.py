"""The predictor registry: one place that maps a name to a predictor class.

Used unchanged by the executor and the simulator; the simulator can build only
the predictors that do not need hidden states (``needs_hidden`` is False).
"""

from __future__ import annotations

from dataclasses import replace

from moe_runtime.errors import MoeError
from moe_runtime.predictors.base import PredictContext, Predictor, PredictorOptions, RoutingHistory, plan_prefetch, rank_scores
from moe_runtime.predictors.model_based import Aligned, Gate
from moe_runtime.predictors.history import History
from moe_runtime.predictors.trace_based import NoisyOracle, NonePredictor, Oracle, Popularity, Recorded

PREDICTORS: dict[str, type[Predictor]] = {
    cls.name: cls for cls in (NonePredictor, Gate, Aligned, Popularity, History, Oracle, NoisyOracle, Recorded)
}


def make_predictor(name: str, opts: PredictorOptions) -> Predictor:
    """Build a registered predictor; ``recorded:NAME`` replays predictions stored in a trace."""
    if name.startswith("recorded:"):
        return Recorded(replace(opts, recorded=name.split(":", 1)[1]))
    cls = PREDICTORS.get(name)
    if cls is None or cls is Recorded:
        raise MoeError(f"unknown predictor {name!r}; choose one of {', '.join(n for n in PREDICTORS if n != 'recorded')}"
                       " or recorded:NAME")
    return cls(opts)


__all__ = ["PREDICTORS", "make_predictor", "Predictor", "PredictContext", "PredictorOptions",
           "RoutingHistory", "plan_prefetch", "rank_scores"]
