"""The predictor interface shared by the executor and the simulator.

At MoE layer ``l`` of a step, a predictor returns, for each distance
d = 1..D with l+d < n_moe_layers, the expert ids of layer l+d ranked by score,
best first; the prefetch planner takes as many as the budget allows. What a
predictor may look at is in ``PredictContext``: the residual stream entering
layer l's MoE block (executor only), the routing already seen
(``RoutingHistory``), and, for oracles, the step's true routing.
"""

from __future__ import annotations

import abc
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from moe_runtime.core.keys import Key


class RoutingHistory:
    """Expert ids chosen per layer by the current step so far, and by the last ``window`` steps.

    ``record`` keeps the sequence it is given (a list or an int array), not a copy: callers pass ids
    they do not change afterwards (the executor's are fresh per layer, a replay's are its workload's)."""

    def __init__(self, n_moe_layers: int, window: int = 4) -> None:
        self.n_moe_layers = n_moe_layers
        self.current: list[Sequence[int] | None] = [None] * n_moe_layers
        self.recent: deque[list[Sequence[int] | None]] = deque(maxlen=window)

    def record(self, layer: int, ids: Sequence[int]) -> None:
        self.current[layer] = ids

    def end_step(self) -> None:
        self.recent.append(self.current)
        self.current = [None] * self.n_moe_layers


@dataclass
class PredictContext:
    step: int
    layer: int
    history: RoutingHistory
    hidden: Any = None  # torch.Tensor [N, H] entering layer's MoE block; None in the simulator
    token: int | None = None  # trace index of the step's first token, when replaying or forcing a trace
    future: Callable[[int], Sequence[int]] | None = None  # true ids of this step at a layer (oracles)
    ranked: Any = None  # router-based predictors' rankings [D', E], already on the host (see model_based.py)


@dataclass(frozen=True)
class PredictorOptions:
    """Everything a predictor may be built from; each predictor checks what it needs."""

    n_moe_layers: int
    n_experts: int
    top_k: int
    lookahead: int
    model: Any = None  # moe_runtime.model.transformer.MoeModel, for router-based predictors
    adapters: Any = None  # predictors.adapters.AlignedAdapters, for 'aligned'
    trace: Any = None  # moe_runtime.traces.format.Trace: prior counts, or recorded predictions
    seed: int = 0
    recall: float = 0.9  # noisy-oracle
    precision: float = 0.9  # noisy-oracle
    recorded: str | None = None  # name of predictions recorded in the trace


class Predictor(abc.ABC):
    name: ClassVar[str] = ""
    needs_hidden: ClassVar[bool] = False  # only usable where hidden states exist (the executor)
    needs_future: ClassVar[bool] = False  # reads the step's true routing: needs a forced or replayed trace
    # reads RoutingHistory in predict, so the caller records it (it does too for one that overrides observe)
    reads_history: ClassVar[bool] = False

    def __init__(self, opts: PredictorOptions) -> None:
        self.opts = opts
        L, D = opts.n_moe_layers, opts.lookahead
        self._distances = [range(1, min(D, L - 1 - l) + 1) for l in range(L)]  # made once (host time)

    @abc.abstractmethod
    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        """Ranked expert ids for layers l+1..l+D (clipped at the last layer); [] predicts nothing."""

    def predict_step(self, routing: Sequence[np.ndarray], history: RoutingHistory) -> list[list] | None:
        """Every layer's ``predict`` of a step whose routing is known before it runs (a replay), at once:
        item l is what ``predict`` returns at layer l once ``routing[:l+1]`` is recorded, and uses nothing
        of ``routing`` past layer l unless the predictor is an oracle (``needs_future``). None: not
        supported here (the caller asks ``predict`` per layer)."""
        return None

    def device_ranking(self, layer: int, hidden: Any) -> Any:
        """Device-side rankings to fetch with the layer's expert ids (router-based predictors); None here."""
        return None

    def observe(self, history: RoutingHistory) -> None:
        """Called once a step is complete (its routing is in ``history.current``): online learning."""

    def distances(self, layer: int) -> range:
        """The distances d with layer + d a MoE layer, up to the lookahead."""
        return self._distances[layer]


def rank_scores(scores: np.ndarray) -> np.ndarray:
    """Expert ids by descending score, ties by id (deterministic)."""
    return np.lexsort((np.arange(scores.shape[-1]), -scores))


def plan_prefetch(predictions: Sequence[np.ndarray], layer: int, width: int) -> list[Key]:
    """Keys to prefetch in priority order: nearest layer first, then rank; ``width`` per layer."""
    plan: list[Key] = []
    for target, ranked in enumerate(predictions, start=layer + 1):
        top = ranked[:width]
        plan += [(target, e) for e in (top if isinstance(top, list) else
                                       top.tolist() if hasattr(top, "tolist") else list(top))]
    return plan


def dense_routing(cur: list) -> np.ndarray | None:
    """The step's routing as one [L, k] array when every layer has k distinct experts, else None."""
    if any(x is None for x in cur) or len({len(x) for x in cur}) != 1:
        return None
    return np.array(cur, dtype=np.int64)  # one conversion (the ids may be lists or arrays)


def count_routing(counts: np.ndarray, cur: list, dense=False) -> None:
    """counts[l, e] += 1 for each expert e the step chose at layer l (each listed once per layer)."""
    dense = dense_routing(cur) if dense is False else dense
    if dense is not None:
        counts[np.arange(len(cur))[:, None], dense] += 1
        return
    for layer, ids in enumerate(cur):
        if ids is not None:
            counts[layer, ids] += 1
