"""Recall and precision of expert predictors against a model's real routing: `moe-runtime eval-predictors`.

Contract:

- The model runs over token chunks (``forward_chunks``); the truth at MoE
  layer j for each token is the top-k the model routes it to (``model.route``
  of ``model.router_logits(j, h_j)``, exactly what the MoE block computes).
- Predictors are built with the registry (``make_predictor``), so what is
  measured is what the executor runs. At MoE layer l, for each distance d
  (1 <= d <= D, l + d < n_layers), a predictor's ranking for layer l+d is cut
  to its top k (k = the model's top-k) and to its top 2k, and compared with
  the experts layer l+d really used, token by token:
  recall@k = |top-k pred ∩ true| / k, precision@k = |top-k pred ∩ true| /
  |top-k pred| (equal whenever the predictor ranks at least k experts, as all
  built-in ones do), recall@2k = |top-2k pred ∩ true| / k.
- ``gate``/``aligned`` are scored per token with their vectorised ``scores``
  (the per-token probabilities their ``predict`` sums). Every other predictor
  is driven online, token by token: at layer l the token's routing at l is
  recorded in a ``RoutingHistory`` and ``predict(ctx)`` is called (oracles get
  ``ctx.future``); after the token's last layer ``observe`` is called and the
  step ends, so nothing is learnt from the future. A trace may prime
  ``history``/``popularity`` (``--history-trace``).
- Totals are micro-averaged over tokens and source layers; per-layer values
  are indexed by the source layer l (None where l + d >= n_layers).
- ``match_counts(pred, true, k)`` is the counting kernel (hand-checkable).

This module does not fit adapters (calibrate.py) or define predictors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from moe_runtime.predictors.calibrate import forward_chunks
from moe_runtime.core.errors import MoeError
from moe_runtime.core.outputs import check_output, write_atomic
from moe_runtime.model.experts import ExpertProvider
from moe_runtime.model.transformer import Transformer
from moe_runtime.predictors import PredictContext, PredictorOptions, RoutingHistory, make_predictor

DEFAULT_PREDICTORS = ("gate", "aligned", "history", "popularity", "oracle")


def match_counts(pred: np.ndarray, true: np.ndarray, k: int) -> tuple[int, int, int]:
    """pred [N, P] ranked ids (-1 = no prediction), true [N, k] -> (hits in top-k, hits in top-2k, predicted in top-k).

    Ranked ids in a row must be distinct (they are rankings); ``true`` rows hold k distinct ids.
    """
    pred = np.asarray(pred, dtype=np.int64).reshape(len(true), -1)
    true = np.asarray(true, dtype=np.int64)
    hit = (pred[:, :, None] == true[:, None, :]).any(-1) & (pred >= 0)  # [N, P]
    return int(hit[:, :k].sum()), int(hit[:, :2 * k].sum()), int((pred[:, :k] >= 0).sum())


@dataclass
class EvalResult:
    names: list[str]
    n_layers: int
    top_k: int
    lookahead: int
    tokens: int
    counts: dict[str, np.ndarray]  # name -> [4, L, D]: hits@k, hits@2k, predicted@k, tokens

    def _ratio(self, name: str, num: int, den: int, scale: int, per_layer: bool) -> Any:
        c = self.counts[name]
        if per_layer:
            return [[round(float(c[num, l, d] / (scale * c[den, l, d])), 6) if c[den, l, d] else None
                     for l in range(self.n_layers)] for d in range(self.lookahead)]
        n, m = c[num].sum(0), c[den].sum(0)  # [D]
        return [round(float(n[d] / (scale * m[d])), 6) if m[d] else None for d in range(self.lookahead)]

    def metric(self, what: str, name: str, per_layer: bool = False) -> Any:
        """'recall' | 'precision' | 'recall_at_2k' for d = 1..D (or [D][L] per source layer)."""
        num, den, scale = {"recall": (0, 3, self.top_k), "precision": (0, 2, 1),
                           "recall_at_2k": (1, 3, self.top_k)}[what]
        return self._ratio(name, num, den, scale, per_layer)

    def to_json(self) -> dict[str, Any]:
        metrics = ("recall", "precision", "recall_at_2k")
        out: dict[str, Any] = {"tokens": self.tokens, "n_layers": self.n_layers, "top_k": self.top_k,
                               "lookahead": self.lookahead, "distances": list(range(1, self.lookahead + 1)),
                               "predictors": self.names}
        for m in metrics:
            out[m] = {n: self.metric(m, n) for n in self.names}
        out["per_layer"] = {m: {n: self.metric(m, n, True) for n in self.names} for m in metrics}
        out["per_layer_index"] = "source MoE layer l (prediction made at l for layer l+d)"
        return out


@torch.no_grad()
def evaluate(model: Transformer, provider: ExpertProvider, chunks: Sequence[np.ndarray], names: Sequence[str],
             lookahead: int, adapters: Any = None, trace: Any = None, seed: int = 0,
             progress: bool = False) -> EvalResult:
    """Measure every predictor in ``names`` at distances 1..lookahead; see the module docstring."""
    cfg = model.cfg
    L, E, k = cfg.n_moe_layers, cfg.n_experts, cfg.top_k
    if not 1 <= lookahead < L:
        raise MoeError(f"--lookahead must be in 1..{L - 1} for a model with {L} MoE layers, got {lookahead}")
    if trace is not None and (trace.n_layers, trace.n_experts) != (L, E):
        raise MoeError(f"the history trace has {trace.n_layers} layers x {trace.n_experts} experts, "
                       f"the model {L} x {E}")
    opts = PredictorOptions(n_moe_layers=L, n_experts=E, top_k=k, lookahead=lookahead, model=model,
                            adapters=adapters, trace=trace, seed=seed)
    predictors = {n: make_predictor(n, opts) for n in names}
    histories = {n: RoutingHistory(L) for n in names}
    counts = {n: np.zeros((4, L, lookahead), dtype=np.int64) for n in names}
    step = 0
    for chunk, hidden in forward_chunks(model, provider, chunks, progress, "eval-predictors"):
        T = len(chunk)
        true = np.stack([model.route(l, model.router_logits(l, hidden[l]))[0].cpu().numpy() for l in range(L)],
                        axis=1)  # [T, L, k]
        for name, p in predictors.items():
            preds = np.full((T, L, lookahead, 2 * k), -1, dtype=np.int64)  # ranked ids, top 2k
            if hasattr(p, "scores"):  # gate / aligned: per-token probabilities, vectorised over the chunk
                for l in range(L):
                    for d in p.distances(l):
                        s = p.scores(l, d, hidden[l])  # [T, E]
                        top = torch.argsort(s, dim=-1, descending=True, stable=True)[:, :2 * k]
                        preds[:, l, d - 1, :top.shape[1]] = top.cpu().numpy()
            else:
                _online(p, histories[name], true, preds, step)
            c = counts[name]
            for l in range(L):
                for d in range(1, min(lookahead, L - 1 - l) + 1):
                    hk, h2k, npred = match_counts(preds[:, l, d - 1], true[:, l + d], k)
                    c[:, l, d - 1] += (hk, h2k, npred, T)
        step += T
    return EvalResult(list(names), L, k, lookahead, step, counts)


def _online(p: Any, history: RoutingHistory, true: np.ndarray, preds: np.ndarray, step0: int) -> None:
    """Drive a predictor token by token over one chunk: record layer l, predict at l, observe after the token."""
    T, L, _ = true.shape
    width = preds.shape[-1]
    for t in range(T):
        row = true[t]
        ctx = PredictContext(step=step0 + t, layer=0, history=history, token=step0 + t,
                             future=lambda m, row=row: row[m])
        for l in range(L):
            history.record(l, row[l])
            ctx.layer = l
            for d, ranked in enumerate(p.predict(ctx), start=1):
                r = np.asarray(ranked, dtype=np.int64)[:width]
                preds[t, l, d - 1, :len(r)] = r
        p.observe(history)
        history.end_step()


# -- output --

def format_table(res: EvalResult) -> str:
    D = res.lookahead
    head = f"{'predictor':<12}" + "".join(f"{'d=' + str(d):>9}" for d in range(1, D + 1))

    def fmt(v):
        return f"{v:>9.3f}" if v is not None else f"{'-':>9}"

    lines = [f"recall@k (k = top-k = {res.top_k}; = precision@k when k experts are predicted), "
             f"{res.tokens} tokens x {res.n_layers} MoE layers, micro-averaged", head]
    lines += [f"{n:<12}" + "".join(fmt(v) for v in res.metric("recall", n)) for n in res.names]
    lines += ["", f"recall@2k (top {2 * res.top_k} predicted)", head]
    lines += [f"{n:<12}" + "".join(fmt(v) for v in res.metric("recall_at_2k", n)) for n in res.names]
    return "\n".join(lines)


def save_plot(res: EvalResult, path: str | Path) -> None:
    """recall@k (solid) and recall@2k (dashed) vs distance per predictor, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ds = list(range(1, res.lookahead + 1))
    for i, n in enumerate(res.names):
        color = f"C{i}"
        ax.plot(ds, res.metric("recall", n), "o-", color=color, label=f"{n} @k")
        ax.plot(ds, res.metric("recall_at_2k", n), "x--", color=color, alpha=0.6, label=f"{n} @2k")
    ax.set(xlabel="lookahead distance d (layers)", ylabel="recall", ylim=(0, 1.02), xticks=ds,
           title=f"expert prediction recall, top-k = {res.top_k}, {res.tokens} tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    try:
        check_output(path, "plot")
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)
