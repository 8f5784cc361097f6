"""Forced routing: every MoE layer uses the experts and weights a trace recorded for the same token.

Contract:

- ``ForcedRouting(trace, n_moe_layers=, n_experts=, top_k=, seq=N, batch=B)``
  takes sequences N..N+B-1 of the trace (maximal runs of one ``seq_id``, in
  file order), one per prompt of a batch; position p of prompt b maps to token
  p of sequence N+b. A trace whose layers, experts or top-k differ from the
  model's raises ``MoeError``, and so does ``check_length`` when a sequence is
  shorter than the run needs.
- A step is the list of (sequence, position) of a forward pass's tokens
  (``prompt_step`` for one sequence's run of positions; a batched decode step
  has one token per running sequence). ``bind(device, weight_dtype)`` uploads
  ids [T, L, K] and weights once; ``select(step)`` selects the next forward's
  tokens; ``__call__(m, logits) -> (ids [n, K], weights [n, K])`` is the model
  forward's ``route`` (views for one sequence's positions).
- ``step_ids(step, layer)`` is the list the MoE block hands the provider
  (unique ids, token-major then rank), so ``future(steps)`` is exactly the key
  sequence ``ExpertCache.access_layer`` will see over a list of steps
  (Belady's future), and ``popularity()`` is the per-(layer, expert) count of
  uses (the static policy's profile).

This module knows nothing of caches, copies or the model's internals beyond
the router-override signature.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from moe_runtime.core.errors import MoeError
from moe_runtime.core.expert_cache import access_sequence
from moe_runtime.core.keys import Key
from moe_runtime.core.policies import popularity_counts
from moe_runtime.traces import Trace


Step = Sequence[tuple[int, int]]  # the (sequence, position) of each token of one forward pass, in order


def prompt_step(seq: int, start: int, n: int) -> list[tuple[int, int]]:
    """The step of positions start..start+n-1 of one sequence (a prefill chunk, or a decode step alone)."""
    return [(seq, p) for p in range(start, start + n)]


class ForcedRouting:
    def __init__(self, trace: Trace, *, n_moe_layers: int, n_experts: int, top_k: int, seq: int = 0,
                 batch: int = 1) -> None:
        trace.check_model("--route-from-trace", n_layers=n_moe_layers, n_experts=n_experts, top_k=top_k)
        seqs = trace.sequences()
        if not (0 <= seq and seq + batch <= len(seqs)):
            need = f"sequences {seq}..{seq + batch - 1} (one per prompt)" if batch > 1 else f"sequence {seq}"
            raise MoeError(f"--trace-seq {seq} is out of range: the run needs {need}, the trace has {len(seqs)}")
        self.trace = trace  # recorded:NAME predictions are read from it
        picked = seqs[seq:seq + batch]
        self.seq_ids = [s[0] for s in picked]
        self.seq_id = self.seq_ids[0]
        self.trace_starts = [s[1] for s in picked]  # trace index of each sequence's position 0
        self.trace_start = self.trace_starts[0]
        self.lengths = [stop - start for _, start, stop in picked]
        self.offsets = np.cumsum([0, *self.lengths[:-1]]).tolist()  # row of each sequence's position 0 here
        self.ids = np.concatenate([trace.expert_ids[a:b] for _, a, b in picked]).astype(np.int64)  # [T, L, K]
        self.weights = np.concatenate([trace.weights[a:b] for _, a, b in picked]).astype(np.float32)
        self.n_tokens = self.lengths[0]
        self._ids_t: Tensor | None = None
        self._w_t: Tensor | None = None
        self._rows: Tensor | tuple[int, int] = (0, 0)

    def check_length(self, n_positions: int | Sequence[int]) -> None:
        """MoeError unless sequence b covers positions 0..n_positions[b]-1 (one int: every sequence)."""
        need = [n_positions] * len(self.lengths) if isinstance(n_positions, int) else list(n_positions)
        for sid, have, n in zip(self.seq_ids, self.lengths, need):
            if n > have:
                raise MoeError(f"trace sequence {sid} has {have} tokens, but the run needs "
                               f"{n} (prompt + max_new_tokens - 1)")

    def bind(self, device: torch.device | str, weight_dtype: torch.dtype) -> None:
        """Upload ids and weights once; ``weight_dtype`` is what the model's own route returns."""
        self._ids_t = torch.from_numpy(self.ids).to(device)  # [T, L, K] long
        self._w_t = torch.from_numpy(self.weights).to(device=device, dtype=weight_dtype)  # [T, L, K]

    def _flat(self, step: Step) -> list[int]:
        out = []
        for b, p in step:
            if p >= self.lengths[b]:
                raise MoeError(f"position {p} is beyond trace sequence {self.seq_ids[b]}'s {self.lengths[b]} tokens")
            out.append(self.offsets[b] + p)
        return out

    def select(self, step: Step) -> None:
        """The next forward pass computes ``step``'s tokens."""
        flat = self._flat(step)
        if flat == list(range(flat[0], flat[0] + len(flat))):
            self._rows = (flat[0], len(flat))  # one sequence's run of positions: views, nothing allocated
        else:  # a batched decode step: one row per running sequence (a small upload per step; never in a graph)
            self._rows = torch.tensor(flat, dtype=torch.long, device=self._ids_t.device)

    def __call__(self, m: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(self._rows, tuple):
            a, n = self._rows
            return self._ids_t.narrow(0, a, n).select(1, m), self._w_t.narrow(0, a, n).select(1, m)  # [n, K]
        return self._ids_t[self._rows, m], self._w_t[self._rows, m]  # [n, K]

    def step_ids(self, step: Step, layer: int) -> list[int]:
        """Unique ids of ``step``'s tokens at ``layer``, in first appearance (token-major, then rank)."""
        return list(dict.fromkeys(self.ids[self._flat(step), layer].ravel().tolist()))

    def step_routing(self, step: Step, capacity: int | None = None) -> list[list[int]]:
        out = [self.step_ids(step, layer) for layer in range(self.ids.shape[1])]
        # a union beyond ``capacity`` is served in waves, in ascending id order (MoeBlock.experts)
        return [sorted(ids) if capacity is not None and len(ids) > capacity else ids for ids in out]

    def future(self, steps: Sequence[Step], capacity: int | None = None) -> list[Key]:
        """The keys ``access_layer`` sees over ``steps``, in order (step, layer, rank), for a provider whose
        ``capacity`` is given (its waves' order); None: every union fits."""
        return access_sequence(self.step_routing(s, capacity) for s in steps)

    def popularity(self, n_positions: int | None = None) -> dict[Key, float]:
        """Uses per (layer, expert) over the first ``n_positions`` tokens of the first sequence (all of
        every sequence by default)."""
        return popularity_counts(self.ids[: n_positions] if n_positions else self.ids)


def popularity_from_trace(trace: Trace) -> dict[Key, float]:
    """Uses per (layer, expert) over every token of a trace (``--popularity-trace``)."""
    return popularity_counts(trace.expert_ids)
