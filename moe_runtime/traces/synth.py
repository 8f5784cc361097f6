"""Synthetic routing traces with three knobs, and fitting those knobs to a real trace.

Generative model, per token t and MoE layer l, filling the k rank slots in order:

1. with probability ``locality`` (and a previous token in the same sequence),
   reuse one of the previous token's experts at layer l not yet chosen;
2. else, with probability ``correlation`` (l > 0), take pi_l(x) where x is the
   expert at the same rank at layer l-1 and pi_l a fixed random permutation of
   the experts (so layer l-1's choice determines layer l's);
3. else draw from layer l's popularity, Zipf-like with exponent ``skew`` over a
   random ordering of the experts (0 = uniform).

A slot whose candidate is already taken falls through to the next rule.
Weights are sorted normalised exponentials (rank 0 largest, summing to 1).
Everything is drawn from ``numpy.random.default_rng(seed)``: the same knobs and
seed give the same trace. This module knows nothing about the command line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_runtime.core.errors import MoeError
from moe_runtime.core.resources import check_fits
from moe_runtime.traces.format import PHASE_DECODE, Trace, TraceMeta
from moe_runtime.traces.recorder import make_trace
from moe_runtime.traces.stats import adjacent_overlap, cross_layer_recall, entropy_bits, one_hot

# peak bytes per (token, layer, rank) of synth_trace: measured 280 (the draws as Python lists dominate)
_PEAK_BYTES_PER_CHOICE = 320


@dataclass(frozen=True)
class SynthKnobs:
    skew: float = 0.0
    locality: float = 0.0
    correlation: float = 0.0

    def __post_init__(self):
        if not 0 <= self.skew <= 10:
            raise MoeError(f"skew must be in [0, 10], got {self.skew}")
        for name in ("locality", "correlation"):
            if not 0 <= getattr(self, name) <= 1:
                raise MoeError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def synth_trace(meta: TraceMeta, n_tokens: int, knobs: SynthKnobs, seed: int = 0,
                seq_len: int | None = None) -> Trace:
    """A trace shaped by ``meta`` (layers, experts, top-k); sequences of ``seq_len`` tokens."""
    meta.validate()
    if n_tokens < 1:
        raise MoeError(f"tokens must be >= 1, got {n_tokens}")
    if seq_len is not None and seq_len < 1:
        raise MoeError(f"seq_len must be >= 1, got {seq_len}")
    L, E, K = meta.n_layers, meta.n_experts, meta.top_k
    check_fits(f"synthesising {n_tokens} tokens ({L} layers x top-{K})", _PEAK_BYTES_PER_CHOICE * n_tokens * L * K)
    seq_len = seq_len or n_tokens
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, E + 1, dtype=np.float64) ** -knobs.skew
    pop = np.stack([ranks[rng.permutation(E)] for _ in range(L)])
    pop /= pop.sum(1, keepdims=True)  # [L, E]
    cdf = np.cumsum(pop, 1)
    perm = np.stack([rng.permutation(E) for _ in range(L)])  # pi_l
    u = rng.random((n_tokens, L, K, 2))  # rule choice, and which previous expert to reuse
    # popularity candidates drawn up front (inverse CDF); a few spares for collisions
    n_cand = 2 * K + 4
    cand = np.stack([np.searchsorted(cdf[l], rng.random((n_tokens, n_cand)), side="right")
                     for l in range(L)], axis=1).clip(0, E - 1)  # [T, L, n_cand]
    w = -np.log(rng.random((n_tokens, L, K)))
    w = -np.sort(-w / w.sum(-1, keepdims=True), axis=-1)
    # plain Python lists in the loop: per-element numpy indexing costs several times more
    U, cand_l, perm_l = u.tolist(), cand.tolist(), perm.tolist()
    fallback = [np.argsort(-pop[l], kind="stable").tolist() for l in range(L)]
    loc, cor = knobs.locality, knobs.correlation
    cor_cut = loc + (1 - loc) * cor
    rows: list[list[list[int]]] = []
    for t in range(n_tokens):
        has_prev = t % seq_len != 0
        row: list[list[int]] = []
        for l in range(L):
            chosen: list[int] = []
            ut, ct = U[t][l], cand_l[t][l]
            ci = 0
            for r in range(K):
                pick = -1
                x = ut[r][0]
                if has_prev and x < loc:
                    free = [e for e in rows[t - 1][l] if e not in chosen]
                    if free:
                        pick = free[int(ut[r][1] * len(free))]
                elif l > 0 and x < cor_cut:
                    y = perm_l[l][row[l - 1][r]]
                    if y not in chosen:
                        pick = y
                while pick < 0 and ci < n_cand:
                    y = ct[ci]
                    ci += 1
                    if y not in chosen:
                        pick = y
                if pick < 0:  # spares exhausted (very high skew): most popular free expert
                    pick = next(e for e in fallback[l] if e not in chosen)
                chosen.append(pick)
            row.append(chosen)
        rows.append(row)
    ids = np.array(rows, dtype=np.int64).reshape(n_tokens, L, K)
    T = np.arange(n_tokens)
    return make_trace(meta, ids, w.astype(np.float32), T // seq_len, T % seq_len,
                      np.full(n_tokens, PHASE_DECODE))


TARGETS = ("entropy_norm", "overlap", "cross_layer_recall")


def headline(trace: Trace) -> dict:
    """The three statistics the knobs control (means over layers), cheaply."""
    oh = one_hot(trace)
    p = oh.sum(0) / (trace.n_tokens * trace.top_k)
    ent = float(np.mean(entropy_bits(p)) / np.log2(trace.n_experts)) if trace.n_experts > 1 else 0.0
    ov = adjacent_overlap(trace, oh)
    co = cross_layer_recall(trace, oh)[0] if trace.n_layers > 1 else np.array([np.nan])
    return {"entropy_norm": ent, "overlap": float(np.nanmean(ov)) if np.isfinite(ov).any() else np.nan,
            "cross_layer_recall": float(np.nanmean(co)) if np.isfinite(co).any() else np.nan}


def fit_knobs(real: Trace, seed: int = 0, fit_tokens: int = 600, rounds: int = 2,
              steps: int = 5) -> SynthKnobs:
    """Fit the knobs so a synthetic trace's ``headline`` statistics match ``real``'s.

    Coordinate-wise bisection of each knob on its own statistic (entropy falls
    with skew, overlap rises with locality, cross-layer recall with correlation),
    holding the others, for ``rounds`` sweeps. Synthetic candidates have
    ``fit_tokens`` tokens and the real statistics are averaged over up to four
    windows of as many tokens, because all three depend on the token count; one seed is used
    throughout so that comparisons are not swamped by sampling noise.
    """
    n = min(real.n_tokens, fit_tokens)
    # every statistic depends on the token count (small-sample entropy, in-sample recall), so
    # the real side is measured on n-token windows too, spread over the trace so that the
    # first sequences' topic does not decide the fit
    starts = np.linspace(0, real.n_tokens - n, max(1, min(4, real.n_tokens // n))).astype(int)
    windows = [headline(real.slice(int(a), int(a) + n)) for a in starts]
    target = {s: float(np.nanmean([w[s] for w in windows])) if any(np.isfinite(w[s]) for w in windows)
              else np.nan for s in TARGETS}
    meta = real.meta
    knobs = {"skew": 0.0, "locality": 0.0, "correlation": 0.0}
    # locality last: correlation also raises overlap (similar tokens stay similar down the
    # layers), while locality hardly moves cross-layer recall
    spec = {"skew": ("entropy_norm", 0.0, 3.0, -1), "correlation": ("cross_layer_recall", 0.0, 1.0, 1),
            "locality": ("overlap", 0.0, 1.0, 1)}

    def measure(**over) -> dict:
        k = SynthKnobs(**{**knobs, **over})
        return headline(synth_trace(meta, n, k, seed, seq_len=_mean_seq_len(real, n)))

    for _ in range(rounds):
        for name, (stat, lo, hi, sign) in spec.items():
            if target.get(stat) is None or not np.isfinite(target[stat]):
                continue
            for _ in range(steps):
                mid = (lo + hi) / 2
                if sign * (measure(**{name: mid})[stat] - target[stat]) < 0:
                    lo = mid
                else:
                    hi = mid
            knobs[name] = round((lo + hi) / 2, 4)
    return SynthKnobs(**knobs)


def _mean_seq_len(real: Trace, n: int) -> int:
    """Mean sequence length of the real trace (overlap counts only in-sequence pairs)."""
    return max(1, round(real.n_tokens / len(real.sequences())))
