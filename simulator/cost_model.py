"""Compute time of one forward step, per MoE layer, from a roofline or a measured profile.

Roofline: a piece of work takes ``max(FLOPs / peak_flops, bytes / hbm_bandwidth)``.
For one MoE layer in a step of B tokens at context lengths c_1..c_B (the
number of positions each token attends to, its own included):

- FLOPs = sum_i attention(c_i) + B x (shared experts + router) + B x top_k x one expert
- bytes = attention, shared-expert, norm and router weights (read once per step)
        + KV cache read: sum_i c_i x 2 x n_kv_heads x head_dim x dtype bytes
        + u x expert bytes, u = distinct experts the B tokens use (each read once)

Per step, once: the model's dense (non-MoE) decoder layers (same roofline with
their MLP) and the output head (vocab x hidden weights). The simulator charges
that ``overhead`` at the end of each step.

Profile: when the device gives ``layer_compute_ms`` (written by ``moe-runtime
profile``: one all-resident decode step of one token divided by the number of
MoE layers, so dense layers, attention and the head are in the average), every
roofline time is scaled so that one step of one token at context 1 takes
``n_moe_layers x layer_compute_ms``: the measurement fixes the scale, the
roofline the shape (the split between MoE layers and the rest, and the growth
with context, batch and distinct experts).

This module knows nothing about caches, copies or simpy; the attention of
models with latent attention (MLA) is approximated as the model spec says.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_runtime.core.shapes import ModelSpec

from .device import DeviceSpec


@dataclass(frozen=True)
class StepCosts:
    """Seconds of compute: ``layer[s, l]`` per MoE layer of step s, ``overhead[s]`` per step."""

    layer: np.ndarray  # float64 [S, L]
    overhead: np.ndarray  # float64 [S]

    @property
    def total(self) -> float:
        return float(self.layer.sum() + self.overhead.sum())


class CostModel:
    def __init__(self, spec: ModelSpec, device: DeviceSpec) -> None:
        self.spec, self.device = spec, device
        s = spec
        self.kv_bytes_per_position = 2 * s.n_kv_heads * s.head_dim * s.dtype_bytes  # one layer
        self.score_flops_per_position = 2 * 2 * s.n_heads * s.head_dim  # q.k^T and p.v
        self.attn_proj_flops = 2 * s.attention_params
        self.scale = 1.0
        if device.layer_compute_ms is not None:
            one_step = s.n_moe_layers * self._roofline(self._moe_flops(1, 1), self._moe_bytes(1, 1, s.top_k)) \
                + self._overhead(1, 1)
            self.scale = s.n_moe_layers * device.layer_compute_ms * 1e-3 / float(one_step)

    # -- roofline pieces (numpy-broadcastable in tokens, context sums and distinct experts) --
    def _roofline(self, flops, nbytes):
        return np.maximum(flops / self.device.peak_flops, nbytes / self.device.hbm_bytes_per_s)

    def _moe_flops(self, n_tokens, ctx_sum):
        s = self.spec
        per_token = self.attn_proj_flops + s.moe_dense_flops_per_token + s.top_k * s.expert_flops_per_token
        return n_tokens * per_token + self.score_flops_per_position * ctx_sum

    def _moe_bytes(self, n_tokens, ctx_sum, n_unique):
        return self.spec.dense_bytes_per_layer + self.kv_bytes_per_position * ctx_sum \
            + n_unique * self.spec.expert_bytes

    def _overhead(self, n_tokens, ctx_sum):
        s = self.spec
        H = s.hidden_size
        n_dense = len(s.dense_layers)
        dense_flops = n_dense * (n_tokens * (self.attn_proj_flops + 2 * 3 * H * s.dense_intermediate_size)
                                 + self.score_flops_per_position * ctx_sum)
        dense_bytes = n_dense * (s.dense_layer_bytes + self.kv_bytes_per_position * ctx_sum)
        head = self._roofline(2 * n_tokens * s.vocab_size * H, s.vocab_size * H * s.dtype_bytes)
        return self._roofline(dense_flops, dense_bytes) + head if n_dense else head

    # -- what the replay asks ------------------------------------------------------------
    def moe_layer_seconds(self, contexts, n_unique: int) -> float:
        """One MoE layer for tokens at ``contexts`` (list of context lengths) using ``n_unique`` experts."""
        c = np.asarray(contexts, dtype=np.float64)
        return float(self.scale * self._roofline(self._moe_flops(len(c), c.sum()),
                                                 self._moe_bytes(len(c), c.sum(), n_unique)))

    def expert_seconds(self, n_tokens: int) -> float:
        """The device's time for one routed expert at ``n_tokens`` tokens (the cost rule's device term)."""
        s = self.spec
        return float(self.scale * max(n_tokens * s.expert_flops_per_token / self.device.peak_flops,
                                      s.expert_bytes / self.device.hbm_bytes_per_s))

    def layer_seconds_without(self, n_tokens: float, ctx_sum: float, n_unique: int, host_experts: int,
                              host_tokens: int) -> float:
        """One MoE layer when ``host_experts`` of its ``n_unique`` experts (``host_tokens`` token-expert
        pairs) are computed on the host: the device neither reads nor computes them."""
        flops = self._moe_flops(n_tokens, ctx_sum) - host_tokens * self.spec.expert_flops_per_token
        nbytes = self._moe_bytes(n_tokens, ctx_sum, n_unique - host_experts)
        return float(self.scale * max(flops / self.device.peak_flops, nbytes / self.device.hbm_bytes_per_s))

    def step_costs(self, n_tokens: np.ndarray, ctx_sum: np.ndarray, n_unique: np.ndarray) -> StepCosts:
        """Costs of S steps: tokens per step [S], summed context lengths [S], distinct experts [S, L]."""
        n = np.asarray(n_tokens, dtype=np.float64)[:, None]
        c = np.asarray(ctx_sum, dtype=np.float64)[:, None]
        u = np.asarray(n_unique, dtype=np.float64)
        layer = self.scale * self._roofline(self._moe_flops(n, c), self._moe_bytes(n, c, u))
        overhead = self.scale * self._overhead(n[:, 0], c[:, 0])
        return StepCosts(np.ascontiguousarray(layer, dtype=np.float64), np.asarray(overhead, dtype=np.float64))

    def hybrid_floor_s(self, n_tokens, ctx_sum, n_unique, counts, host_s) -> float:
        """Seconds no run that computes experts on the host beats on these steps (``Replay``'s rule): a layer
        takes at least max(the device's time without the experts it gives the host, the host's time for
        them), here minimised over every set of k of its experts for each k (the device's time with the k
        largest token counts removed, the host's with the k cheapest), plus each step's overhead; copies,
        waits and predictor time add to it, never take from it. ``counts``: [S][L] tokens per expert (None:
        one each); ``host_s(n)``: the host's seconds for one expert at n tokens."""
        s = self.spec
        u = np.asarray(n_unique, dtype=np.int64)
        S, L = u.shape
        U = int(u.max(initial=0))
        cnt = np.zeros((S, L, U))
        if counts is None:
            cnt[np.arange(U)[None, None, :] < u[:, :, None]] = 1.0
        else:
            for i, row in enumerate(counts):
                for j, c in enumerate(row):
                    cnt[i, j, :len(c)] = c
        valid = np.arange(U)[None, None, :] < u[:, :, None]
        distinct = np.unique(cnt[valid]) if valid.any() else np.ones(1)
        times = np.array([host_s(int(n)) for n in distinct], dtype=np.float64)
        at = np.minimum(np.searchsorted(distinct, cnt), len(distinct) - 1)
        host = np.where(valid, times[at], np.inf)  # a padding entry is no expert: never given to the host
        zero = np.zeros((S, L, 1))
        host_k = np.concatenate([zero, np.cumsum(np.sort(host, axis=2), axis=2)], axis=2)  # [S, L, U+1]
        tokens_k = np.concatenate([zero, np.cumsum(-np.sort(-cnt, axis=2), axis=2)], axis=2)
        n = np.asarray(n_tokens, dtype=np.float64)[:, None, None]
        c = np.asarray(ctx_sum, dtype=np.float64)[:, None, None]
        k = np.arange(U + 1)[None, None, :]
        flops = self._moe_flops(n, c) - tokens_k * s.expert_flops_per_token
        nbytes = self._moe_bytes(n, c, u[:, :, None] - k)
        device_k = self.scale * self._roofline(flops, nbytes)
        layer = np.maximum(device_k, host_k).min(axis=2)
        overhead = self.scale * self._overhead(n[:, 0, 0], c[:, 0, 0])
        return float(layer.sum() + overhead.sum())
