"""Forced routing: every MoE layer uses the experts and weights a trace recorded for the same token.

Contract:

- ``ForcedRouting(trace, n_moe_layers=, n_experts=, top_k=, seq=N)`` takes the N-th
  sequence of the trace (maximal run of one ``seq_id``, in file order); prompt
  and decoded position p maps to that sequence's token p. A trace whose
  layers, experts or top-k differ from the model's raises ``MoeError``, and so
  does ``check_length`` when the sequence is shorter than the run needs.
- ``bind(device, weight_dtype)`` uploads the sequence's ids [T, L, K] and
  weights once; ``set_step(start, n)`` selects the positions of the next
  forward pass; ``__call__(m, logits) -> (ids [n, K], weights [n, K])`` is the
  model forward's ``route`` and returns views (nothing is allocated).
- ``step_ids(start, n, layer)`` is the list the MoE block hands the provider
  (unique ids, token-major then rank), so ``future(steps)`` is exactly the
  key sequence ``ExpertCache.access_layer`` will see for a list of
  ``(start, n)`` steps (Belady's future), and ``popularity()`` is the
  per-(layer, expert) count of uses (the static policy's profile).

This module knows nothing of caches, copies or the model's internals beyond
the router-override signature.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from moe_runtime.errors import MoeError
from moe_runtime.cache.expert_cache import access_sequence
from moe_runtime.cache.policies import Key, popularity_counts
from moe_runtime.traces import Trace


class ForcedRouting:
    def __init__(self, trace: Trace, *, n_moe_layers: int, n_experts: int, top_k: int, seq: int = 0) -> None:
        trace.check_model("--route-from-trace", n_layers=n_moe_layers, n_experts=n_experts, top_k=top_k)
        seqs = trace.sequences()
        if not 0 <= seq < len(seqs):
            raise MoeError(f"--trace-seq {seq} is out of range: the trace has {len(seqs)} sequences")
        self.seq_id, start, stop = seqs[seq]
        self.trace_start = start  # trace index of position 0
        self.ids = trace.expert_ids[start:stop].astype(np.int64)  # [T, L, K]
        self.weights = trace.weights[start:stop].astype(np.float32)  # [T, L, K]
        self.n_tokens = stop - start
        self._ids_t: Tensor | None = None
        self._w_t: Tensor | None = None
        self._start, self._n = 0, 0

    def check_length(self, n_positions: int) -> None:
        """MoeError unless the sequence covers positions 0..n_positions-1."""
        if n_positions > self.n_tokens:
            raise MoeError(f"trace sequence {self.seq_id} has {self.n_tokens} tokens, but the run needs "
                           f"{n_positions} (prompt + max_new_tokens - 1)")

    def bind(self, device: torch.device | str, weight_dtype: torch.dtype) -> None:
        """Upload ids and weights once; ``weight_dtype`` is what the model's own route returns."""
        self._ids_t = torch.from_numpy(self.ids).to(device)  # [T, L, K] long
        self._w_t = torch.from_numpy(self.weights).to(device=device, dtype=weight_dtype)  # [T, L, K]

    def set_step(self, start: int, n: int) -> None:
        """The next forward pass computes positions start..start+n-1."""
        if start + n > self.n_tokens:
            raise MoeError(f"position {start + n - 1} is beyond the trace sequence's {self.n_tokens} tokens")
        self._start, self._n = start, n

    def __call__(self, m: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        ids = self._ids_t.narrow(0, self._start, self._n).select(1, m)  # [n, K] view
        w = self._w_t.narrow(0, self._start, self._n).select(1, m)  # [n, K] view
        return ids, w

    def step_ids(self, start: int, n: int, layer: int) -> list[int]:
        """Unique ids of positions start..start+n-1 at ``layer``, in first appearance (token-major, rank)."""
        return list(dict.fromkeys(self.ids[start:start + n, layer].ravel().tolist()))

    def step_routing(self, start: int, n: int) -> list[list[int]]:
        return [self.step_ids(start, n, layer) for layer in range(self.ids.shape[1])]

    def future(self, steps: Sequence[tuple[int, int]]) -> list[Key]:
        """The keys ``access_layer`` sees over ``steps`` [(start, n)], in order (step, layer, rank)."""
        return access_sequence(self.step_routing(s, n) for s, n in steps)

    def popularity(self, n_positions: int | None = None) -> dict[Key, float]:
        """Uses per (layer, expert) over the first ``n_positions`` tokens (all by default)."""
        return popularity_counts(self.ids[: n_positions or self.n_tokens])


def popularity_from_trace(trace: Trace) -> dict[Key, float]:
    """Uses per (layer, expert) over every token of a trace (``--popularity-trace``)."""
    return popularity_counts(trace.expert_ids)
