"""Forward passes as the offloading executor runs them: prefill in chunks, one step per forward, recording.

``SteppedModel(model, provider, chunk=, forced=, recorder=)`` stands in for the
model in ``generate()`` (which it does not change):

- The prompt forward is split into chunks of at most ``chunk`` tokens, each a
  forward of its own (same KV cache, same positions), because a step needs the
  union of its tokens' experts per layer at once and that union must fit the
  cache. ``prefill_chunk`` picks the largest chunk that always fits: the whole
  prompt when a pool holds all of a layer's experts plus the in-flight slots,
  else floor((pool slots - in-flight slots) / top_k) tokens (token by token at
  the minimum budget). Decode steps are one token each.
- Before each forward it opens a provider step (``begin_step(start, n)``) and,
  with forced routing, selects the trace positions; positions are counted on
  the CPU (nothing is read back from the device for them).
- With a ``TraceRecorder`` it records the routing the model really used per
  token (prefill tokens phase prefill, decoded tokens phase decode; this reads
  ids back from the device, a sync per step) and the predictions the
  provider's predictor made at that step (shared by the tokens of a chunk).
  ``steps(prompt_len, max_new_tokens, chunk)`` is the (start, n) list of forward
  passes a run makes, for Belady's future.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from moe_runtime.model.experts import ExpertProvider
from moe_runtime.offload.forced_routing import ForcedRouting
from moe_runtime.model.transformer import Transformer
from moe_runtime.traces import PHASE_DECODE, PHASE_PREFILL, TraceRecorder


def prefill_chunk(*, prompt_len: int, pool_slots: int, n_experts: int, top_k: int, inflight: int) -> int:
    """Tokens per prefill forward so that one layer's union of experts always fits a pool (>= 1)."""
    room = pool_slots - inflight
    if room >= n_experts:
        return max(prompt_len, 1)
    return max(1, room // top_k)


def steps(prompt_len: int, max_new_tokens: int, chunk: int) -> list[tuple[int, int]]:
    """(start, n) of every forward pass of a run: prefill chunks, then one per decoded token but the last."""
    out = [(a, min(chunk, prompt_len - a)) for a in range(0, prompt_len, chunk)]
    out += [(prompt_len + i, 1) for i in range(max_new_tokens - 1)]
    return out


class SteppedModel:
    """The model as generate() sees it; every attribute but the forward comes from the wrapped model."""

    def __init__(self, model: Transformer, provider: ExpertProvider, *, chunk: int,
                 forced: ForcedRouting | None = None, recorder: TraceRecorder | None = None,
                 predictor_name: str | None = None, lookahead: int = 1) -> None:
        self.model, self.provider, self.chunk = model, provider, chunk
        self.forced, self.recorder = forced, recorder
        self.predictor_name, self.lookahead = predictor_name, lookahead
        self.pos = 0
        self.n_forwards = 0
        if forced is not None:
            cfg = model.cfg
            forced.bind(model.device, torch.float32 if cfg.route_weights_fp32 else model.dtype)
        self._route = forced if forced is not None else model.route
        self._captured: list[tuple[Tensor, Tensor] | None] = [None] * len(model.moe_layers)
        self._override = self._capture if recorder is not None else forced  # passed to each forward

    def __getattr__(self, name):
        return getattr(self.model, name)

    def setup_cache(self, max_len: int) -> None:
        self.model.setup_cache(max_len)
        self.pos = 0
        self.n_forwards = 0

    def __call__(self, tokens: Tensor, input_pos: Tensor, provider: ExpertProvider,
                 last_only: bool = False) -> Tensor:
        n = tokens.shape[0]
        phase = PHASE_PREFILL if self.n_forwards == 0 else PHASE_DECODE
        self.n_forwards += 1
        if n <= self.chunk:
            return self._forward(tokens, input_pos, provider, last_only, phase)
        outs = [self._forward(tokens[a:a + self.chunk], input_pos[a:a + self.chunk], provider, last_only, phase)
                for a in range(0, n, self.chunk)]
        return outs[-1] if last_only else torch.cat(outs)

    def _forward(self, tokens: Tensor, input_pos: Tensor, provider, last_only: bool, phase: int) -> Tensor:
        start, n = self.pos, tokens.shape[0]
        future = token = None
        if self.forced is not None:
            self.forced.set_step(start, n)
            forced = self.forced
            future = lambda layer: forced.step_ids(start, n, layer)  # noqa: E731  the oracle's truth
            token = forced.trace_start + start
        begin = getattr(self.provider, "begin_step", None)
        if begin is not None:
            begin(start, n, future, token)
        out = self.model(tokens, input_pos, provider, last_only=last_only, route=self._override)
        if self.recorder is not None:
            self._record(start, n, phase)
        self.pos += n
        return out

    def _capture(self, m: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        ids, w = self._route(m, logits)
        self._captured[m] = (ids, w)
        return ids, w

    def _record(self, start: int, n: int, phase: int) -> None:
        # CPU waits on the device here (recording only): the step's routing is read back
        ids = np.stack([c[0].cpu().numpy() for c in self._captured], axis=1)  # [n, L, K]
        w = np.stack([c[1].float().cpu().numpy() for c in self._captured], axis=1)  # [n, L, K]
        preds = None
        if self.predictor_name is not None and hasattr(self.provider, "predictions_array"):
            L = len(self._captured)
            preds = {self.predictor_name: self.provider.predictions_array(L, min(self.lookahead, L - 1))}
        for i in range(n):
            self.recorder.add_token(0, start + i, phase, ids[i], w[i], preds)
