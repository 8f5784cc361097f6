"""The executor's predictors: the router-based ones (``gate``, ``aligned``) and their adapters.

Importing this package registers ``gate`` and ``aligned`` in the one registry
(``moe_runtime.core.predictors``), which holds the trace-based predictors;
``make_predictor`` and the base classes are re-exported from there.
"""

from __future__ import annotations

from moe_runtime.core.predictors import (PREDICTORS, PredictContext, Predictor, PredictorOptions, RoutingHistory,
                                         make_predictor, plan_prefetch, rank_scores, register)
from moe_runtime.predictors.model_based import Aligned, Gate

register(Gate)
register(Aligned)

__all__ = ["PREDICTORS", "make_predictor", "Predictor", "PredictContext", "PredictorOptions",
           "RoutingHistory", "plan_prefetch", "rank_scores"]
