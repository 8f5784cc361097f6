"""Forward passes as the offloading executor runs them: prefill in chunks, one step per forward, recording.

``SteppedModel(model, provider, chunk=, forced=, recorder=)`` stands in for the
model in ``generate()`` (which it does not change):

- The prompt is one forward (as the all-resident model runs it, so the
  matmuls have the same shapes and the tokens stay exact); a layer whose union
  of experts exceeds the cache gets them in waves (``MoeBlock.experts`` and the
  provider's ``capacity``). ``chunk`` splits the prompt into forwards of at
  most that many tokens instead (a choice, e.g. one token at a time to match a
  trace replay; float results then differ from the unchunked forward).
- A batched decode step (``rows`` a list of sequences, one token each) is one
  forward: its MoE layers fetch the union of the batch's experts. Before each
  forward it opens a provider step (``begin_step(start, n)``) and, with forced
  routing, selects the step's (sequence, position) rows of the trace; each
  sequence's position is counted on the CPU (nothing is read back for it).
- With a ``TraceRecorder`` it records the routing the model really used per
  token (prefill tokens phase prefill, decoded tokens phase decode; this reads
  ids back from the device, a sync per step) and the predictions the
  provider's predictor made at that step (shared by the tokens of a chunk).
  Each recorded token keeps its sequence index. ``steps(prompt_lens,
  max_new_tokens, chunk)`` lists the steps of a run, for Belady's future.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from moe_runtime.model.experts import ExpertProvider
from moe_runtime.offload.forced_routing import ForcedRouting, prompt_step
from moe_runtime.model.transformer import Transformer
from moe_runtime.traces import PHASE_DECODE, PHASE_PREFILL, TraceRecorder


def steps(prompt_lens: int | Sequence[int], max_new_tokens: int, chunk: int | None = None) -> list[list[tuple[int, int]]]:
    """Every forward pass of a run, as steps of (sequence, position): each prompt's prefill (in chunks of
    ``chunk`` tokens when given) in turn, then one batched step per decoded token but the last (every
    sequence running: no EOS foreseen)."""
    lens = [prompt_lens] if isinstance(prompt_lens, int) else list(prompt_lens)
    chunk = chunk or max(lens)
    out = [prompt_step(b, a, min(chunk, n - a)) for b, n in enumerate(lens) for a in range(0, n, chunk)]
    out += [[(b, n + i) for b, n in enumerate(lens)] for i in range(max_new_tokens - 1)]
    return out


class SteppedModel:
    """The model as generate() sees it; every attribute but the forward comes from the wrapped model."""

    def __init__(self, model: Transformer, provider: ExpertProvider, *, chunk: int | None = None,
                 forced: ForcedRouting | None = None, recorder: TraceRecorder | None = None,
                 predictor_name: str | None = None, lookahead: int = 1) -> None:
        self.model, self.provider, self.chunk = model, provider, chunk
        self.forced, self.recorder = forced, recorder
        self.predictor_name, self.lookahead = predictor_name, lookahead
        self.pos = [0]  # next position of each sequence, counted on the CPU
        self.n_forwards = 0
        if forced is not None:
            cfg = model.cfg
            forced.bind(model.device, torch.float32 if cfg.route_weights_fp32 else model.dtype)
        self._route = forced if forced is not None else model.route
        self._captured: list[tuple[Tensor, Tensor] | None] = [None] * len(model.moe_layers)
        self._override = self._capture if recorder is not None else forced  # passed to each forward

    def __getattr__(self, name):
        return getattr(self.model, name)

    def setup_cache(self, max_len: int, batch: int = 1) -> None:
        self.model.setup_cache(max_len, batch)
        self.pos = [0] * batch
        self.n_forwards = 0

    def start_sequence(self, row: int) -> None:
        """A new sequence takes row ``row`` (continuous batching): its position count starts over."""
        self.pos[row] = 0
        self.model.start_sequence(row)

    def __call__(self, tokens: Tensor, input_pos: Tensor, provider: ExpertProvider,
                 last_only: bool = False, rows: int | Sequence[int] = 0) -> Tensor:
        self.n_forwards += 1
        if not isinstance(rows, int):  # a batched decode step: one token per running sequence
            return self._forward(tokens, input_pos, provider, last_only, [(b, self.pos[b]) for b in rows], rows,
                                 PHASE_DECODE)
        n, start = tokens.shape[0], self.pos[rows]
        chunk = self.chunk or n
        phase = PHASE_PREFILL if start == 0 else PHASE_DECODE  # a sequence's first forward is its prompt's
        outs = [self._forward(tokens[a:a + chunk], input_pos[a:a + chunk], provider, last_only,
                              prompt_step(rows, start + a, min(chunk, n - a)), rows, phase)
                for a in range(0, n, chunk)]
        return outs[-1] if last_only or len(outs) == 1 else torch.cat(outs)

    def _forward(self, tokens: Tensor, input_pos: Tensor, provider, last_only: bool, step: list[tuple[int, int]],
                 rows: int | Sequence[int], phase: int) -> Tensor:
        future = token = None
        if self.forced is not None:
            forced = self.forced
            forced.select(step)
            future = lambda layer: forced.step_ids(step, layer)  # noqa: E731  the oracle's truth
            b, p = step[0]
            token = forced.trace_starts[b] + p
        self.provider.begin_step(step[0][1], len(step), future, token)
        out = self.model(tokens, input_pos, provider, last_only=last_only, route=self._override, rows=rows)
        if self.recorder is not None:
            self._record(step, phase)
        for b, p in step:
            self.pos[b] = p + 1
        return out

    def _capture(self, m: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        ids, w = self._route(m, logits)
        self._captured[m] = (ids, w)
        return ids, w

    def _record(self, step: list[tuple[int, int]], phase: int) -> None:
        # CPU waits on the device here (recording only): the step's routing is read back
        ids = np.stack([c[0].cpu().numpy() for c in self._captured], axis=1)  # [n, L, K]
        w = np.stack([c[1].float().cpu().numpy() for c in self._captured], axis=1)  # [n, L, K]
        preds = None
        if self.predictor_name is not None:  # set only for an offloading provider that records predictions
            L = len(self._captured)
            preds = {self.predictor_name: self.provider.predictions_array(L, min(self.lookahead, L - 1))}
        for i, (b, p) in enumerate(step):
            self.recorder.add_token(b, p, phase, ids[i], w[i], preds)
