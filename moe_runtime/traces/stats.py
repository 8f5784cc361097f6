"""Statistics of a routing trace: what makes expert caching and prefetching easy or hard.

Definitions (L MoE layers, E experts, k = top-k, all per layer unless averaged):

- **Popularity**: share of layer l's accesses that go to each expert.
  **Entropy** H_l = -sum_e p_e log2 p_e in bits; **normalised** H_l / log2 E
  (1 = uniform, 0 = one expert only). ``top_share``: share of accesses taken by
  the most popular ceil(E/8) experts.
- **Adjacent-token overlap**: mean over consecutive token pairs (t, t+1) of the
  same sequence of |E_{t,l} ∩ E_{t+1,l}| / k. Chance level for uniform routing is k/E.
- **Cross-layer predictability**: top-k recall of a co-occurrence predictor,
  fitted on the trace itself (in-sample, so an upper bound for that predictor).
  C_l[i, j] = number of tokens whose experts at layer l include i and at layer
  l+1 include j. For token t the predictor scores j by sum_{i in E_{t,l}} C_l[i, j]
  and predicts the k best (ties: lower id); recall = |predicted ∩ E_{t,l+1}| / k,
  averaged over tokens, reported per layer pair (l, l+1). ``popularity_recall``
  is the same for predicting layer l+1's k most popular experts for every token
  (the baseline the co-occurrence predictor must beat).
- **Reuse**: accesses in trace order (token-major, then layer, then rank). For an
  access to (l, e), ``token gap`` = tokens since (l, e)'s previous access (1 =
  the very next token) and ``stack distance`` = distinct other experts of layer l
  accessed since then (LRU stack distance: a per-layer LRU cache of C experts
  hits exactly when it is < C). First accesses are ``cold`` and excluded from
  the quantiles. ``lru_hit_rate[C]`` = share of all accesses with distance < C.

This module only reads a Trace; it knows nothing about devices or policies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moe_runtime.traces.format import PHASE_DECODE, PHASE_PREFILL, Trace

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def one_hot(trace: Trace) -> np.ndarray:
    """bool [T, L, E]: True where the token's top-k at that layer includes the expert."""
    T, L, _ = trace.expert_ids.shape
    oh = np.zeros((T, L, trace.n_experts), dtype=bool)
    np.put_along_axis(oh, trace.expert_ids.astype(np.int64), True, axis=2)
    return oh


def popularity(trace: Trace) -> np.ndarray:
    """float [L, E]: share of each layer's accesses per expert (rows sum to 1)."""
    counts = one_hot(trace).sum(0).astype(np.float64)
    return counts / counts.sum(1, keepdims=True)


def entropy_bits(p: np.ndarray) -> np.ndarray:
    """Entropy in bits along the last axis (0 log 0 = 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(-1)


def adjacent_overlap(trace: Trace, oh: np.ndarray | None = None) -> np.ndarray:
    """float [L]: mean |E_t ∩ E_{t+1}| / k over consecutive same-sequence token pairs (nan if none)."""
    oh = one_hot(trace) if oh is None else oh
    same = trace.seq_id[1:] == trace.seq_id[:-1]
    if not np.any(same):
        return np.full(trace.n_layers, np.nan)
    inter = (oh[1:] & oh[:-1]).sum(-1)[same]  # [pairs, L]
    return inter.mean(0) / trace.top_k


def cross_layer_recall(trace: Trace, oh: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(co-occurrence recall [L-1], popularity recall [L-1]) for predicting layer l+1 from layer l."""
    oh = one_hot(trace) if oh is None else oh
    T, L, E = oh.shape
    k = trace.top_k
    co, pop = np.full(L - 1, np.nan), np.full(L - 1, np.nan)
    ids_rank = np.arange(E)[None, :] * 1e-9  # tiny penalty: ties go to the lower id
    for l in range(L - 1):
        a, b = oh[:, l].astype(np.float64), oh[:, l + 1]
        C = a.T @ b.astype(np.float64)  # [E, E] co-occurrence counts
        scores = a @ C - ids_rank  # [T, E]
        pred = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        co[l] = np.take_along_axis(b, pred, 1).sum() / (T * k)
        counts = b.sum(0) - ids_rank[0]
        top = np.argsort(-counts, kind="stable")[:k]
        pop[l] = b[:, top].sum() / (T * k)
    return co, pop


def reuse(trace: Trace) -> tuple[np.ndarray, np.ndarray, int]:
    """(token gaps, stack distances, cold count) over all non-first accesses, in trace order."""
    T, L, K = trace.expert_ids.shape
    E = trace.n_experts
    last_time = np.full((L, E), -1, dtype=np.int64)  # access clock of (l, e)'s last use
    last_tok = np.full((L, E), -1, dtype=np.int64)
    gaps, dists = [], []
    ids = trace.expert_ids.astype(np.int64)
    cold = 0
    earlier = np.tril(np.ones((K, K), dtype=bool), -1)  # [r, r']: r' < r
    for t in range(T):
        e = ids[t]  # [L, K]
        prev = np.take_along_axis(last_time, e, 1)  # [L, K]
        seen = prev >= 0
        cold += int((~seen).sum())
        # distinct other experts of the layer used after this one's last use: those used at
        # earlier tokens, plus this token's earlier ranks not already counted among them
        d = (last_time[:, None, :] > prev[:, :, None]).sum(-1)
        d += ((prev[:, None, :] <= prev[:, :, None]) & earlier[None]).sum(-1)
        gaps.append((t - np.take_along_axis(last_tok, e, 1))[seen])
        dists.append(d[seen])
        np.put_along_axis(last_time, e, t * K + np.arange(K)[None, :], 1)
        np.put_along_axis(last_tok, e, t, 1)
    return np.concatenate(gaps), np.concatenate(dists), cold


@dataclass(frozen=True)
class TraceStats:
    n_tokens: int
    n_layers: int
    n_experts: int
    top_k: int
    entropy_bits: np.ndarray  # [L]
    entropy_norm: np.ndarray  # [L]
    top_share: np.ndarray  # [L]
    overlap: np.ndarray  # [L]
    cross_layer_recall: np.ndarray  # [L-1]
    popularity_recall: np.ndarray  # [L-1]
    gap_quantiles: dict  # q -> tokens
    distance_quantiles: dict  # q -> distinct experts
    distance_histogram: dict  # "lo-hi" -> share of non-cold accesses
    lru_hit_rate: dict  # cache size per layer -> hit share of all accesses
    cold_accesses: int

    def summary(self) -> dict:
        """The headline numbers, each a mean over layers (or layer pairs)."""
        return {"entropy_bits": _mean(self.entropy_bits), "entropy_norm": _mean(self.entropy_norm),
                "overlap": _mean(self.overlap), "cross_layer_recall": _mean(self.cross_layer_recall),
                "popularity_recall": _mean(self.popularity_recall)}

    def to_dict(self) -> dict:
        r = lambda a: [None if not np.isfinite(x) else round(float(x), 4) for x in a]  # noqa: E731
        return {
            "tokens": self.n_tokens, "layers": self.n_layers, "experts": self.n_experts, "top_k": self.top_k,
            "summary": {k: (None if v is None else round(v, 4)) for k, v in self.summary().items()},
            "chance_overlap": round(self.top_k / self.n_experts, 4),
            "per_layer": {"entropy_bits": r(self.entropy_bits), "entropy_norm": r(self.entropy_norm),
                          "top_share": r(self.top_share), "overlap": r(self.overlap)},
            "per_layer_pair": {"cross_layer_recall": r(self.cross_layer_recall),
                               "popularity_recall": r(self.popularity_recall)},
            "reuse": {"cold_accesses": self.cold_accesses,
                      "token_gap_quantiles": self.gap_quantiles,
                      "stack_distance_quantiles": self.distance_quantiles,
                      "stack_distance_histogram": self.distance_histogram,
                      "lru_hit_rate_per_layer_cache": self.lru_hit_rate},
        }


def _mean(a: np.ndarray) -> float | None:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else None


def compute_stats(trace: Trace, with_reuse: bool = True) -> TraceStats:
    oh = one_hot(trace)
    p = oh.sum(0) / (trace.n_tokens * trace.top_k)  # [L, E]
    H = entropy_bits(p)
    n_top = math.ceil(trace.n_experts / 8)
    top_share = -np.sort(-p, axis=1)[:, :n_top].sum(1)
    co, pop = cross_layer_recall(trace, oh) if trace.n_layers > 1 else (np.array([]), np.array([]))
    gq, dq, hist, lru, cold = {}, {}, {}, {}, 0
    if with_reuse:
        gaps, dists, cold = reuse(trace)
        if gaps.size:
            gq = {str(q): float(np.quantile(gaps, q)) for q in QUANTILES}
            dq = {str(q): float(np.quantile(dists, q)) for q in QUANTILES}
            edges = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
            edges = [e for e in edges if e < trace.n_experts] + [trace.n_experts]
            for lo, hi in zip(edges[:-1], edges[1:]):
                label = str(lo) if hi == lo + 1 else f"{lo}-{hi - 1}"
                hist[label] = round(float(((dists >= lo) & (dists < hi)).mean()), 4)
        total = trace.n_tokens * trace.n_layers * trace.top_k
        for C in sorted({trace.top_k, 2 * trace.top_k, trace.n_experts // 4, trace.n_experts // 2}):
            if trace.top_k <= C <= trace.n_experts:
                lru[str(C)] = round(float((dists < C).sum()) / total, 4) if gaps.size else 0.0
    return TraceStats(trace.n_tokens, trace.n_layers, trace.n_experts, trace.top_k, H,
                      H / math.log2(trace.n_experts) if trace.n_experts > 1 else np.zeros_like(H),
                      top_share, adjacent_overlap(trace, oh), co, pop, gq, dq, hist, lru, cold)


def format_stats(s: TraceStats) -> str:
    """Human-readable report: headline numbers, a per-layer table, reuse distances."""
    m = s.summary()
    f = lambda v: "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"  # noqa: E731
    lines = [f"{s.n_tokens} tokens, {s.n_layers} MoE layers, {s.n_experts} experts, top-{s.top_k}",
             f"popularity entropy   {f(m['entropy_bits'])} bits (normalised {f(m['entropy_norm'])})",
             f"adjacent overlap     {f(m['overlap'])} (chance {s.top_k / s.n_experts:.3f})",
             f"cross-layer recall   {f(m['cross_layer_recall'])} co-occurrence, "
             f"{f(m['popularity_recall'])} popularity baseline",
             "",
             f"{'layer':>5} {'H bits':>7} {'H norm':>7} {'top1/8':>7} {'overlap':>8} {'x-recall':>9} {'pop-rec':>8}"]
    for l in range(s.n_layers):
        co = s.cross_layer_recall[l] if l < len(s.cross_layer_recall) else np.nan
        pr = s.popularity_recall[l] if l < len(s.popularity_recall) else np.nan
        lines.append(f"{l:>5} {s.entropy_bits[l]:>7.3f} {s.entropy_norm[l]:>7.3f} {s.top_share[l]:>7.3f} "
                     f"{f(s.overlap[l]):>8} {f(co):>9} {f(pr):>8}")
    if s.gap_quantiles:
        lines += ["", f"reuse ({s.cold_accesses} cold accesses)",
                  "quantile       " + " ".join(f"{float(q):>6}" for q in s.gap_quantiles),
                  "token gap      " + " ".join(f"{v:>6g}" for v in s.gap_quantiles.values()),
                  "stack distance " + " ".join(f"{v:>6g}" for v in s.distance_quantiles.values()),
                  "stack distance histogram: " + ", ".join(f"{k}: {v:.3f}" for k, v in s.distance_histogram.items()),
                  "per-layer LRU hit rate by cache size: "
                  + ", ".join(f"{k}: {v:.3f}" for k, v in s.lru_hit_rate.items())]
    return "\n".join(lines)


def phase_counts(trace: Trace) -> dict:
    return {"prefill": int((trace.phase == PHASE_PREFILL).sum()), "decode": int((trace.phase == PHASE_DECODE).sum())}
