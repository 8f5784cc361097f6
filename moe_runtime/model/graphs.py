"""Decode steps replayed as CUDA graphs, with the host's part of each MoE layer between them (``--cuda-graphs``).

There is one forward (transformer.py); this module captures its segments, it does not re-write them. A
decode step splits at each MoE layer's host read of the routed ids:

- segment 0: embedding and step inputs, then every block up to MoE layer 0's router (``Transformer.segment``);
- segment s (1..M-1): MoE layer s-1's shared experts and residual add, then every block up to MoE layer
  s's router;
- segment M: the last MoE layer's shared experts, the remaining blocks, then the final norm and LM head.

Each segment is captured once over static buffers (tokens, positions and sequence rows in; the residual,
the normed input, ids, weights and the predictor's ranking out, which the next segment reads) and
replayed at every step. Between replays the host runs ``MoeBlock.experts``, as the eager forward does:
it reads the ids (and the rankings, in the same transfer), runs the provider's per-layer protocol (its
copies, and the compute stream's wait on them) and computes the routed experts eagerly from the
provider's slot views into a static output buffer the next segment reads, then ends the layer.

Why the expert compute is not captured: a graph needs fixed shapes and addresses, and the routed experts'
weights sit in slots the host picks per step. The fixed-shape alternative gathers a copy of every (token,
rank)'s expert (2 x 352 MB per layer per token for Mixtral in bf16), tripling the weight traffic of a
bandwidth-bound decode. Computing from per-slot views reads each expert once, in place; the host is
between the segments anyway for the fetch, so the per-expert launches overlap the GPU's work on the
previous ones. It also lets a batch whose union exceeds one layer's pool come in waves under graphs.
Its cost is host launches: about six kernels per routed expert (a plain expert's gate and up are one
matmul over an in-place [2I, H] view). For many small experts (top-8 over 48 layers) those launches may
bound a GPU decode; the fixed-shape form that also reads in place is an index-reading grouped GEMM over
the slot pool (e.g. ``torch._grouped_mm`` on sm90), not built here for want of a GPU to check it on.

Contract: ``GraphedStep(model, provider, rows, tokens, positions, runner)`` captures the segments for one
batch shape (``rows`` as in ``Transformer.forward``) after at least one eager step has warmed the
kernels; ``step(tokens, positions)`` returns the logits [B, V] of ``model(tokens, positions, provider,
rows=rows)``, computed by the same kernels in the same order. ``CudaGraphs`` captures and replays
``torch.cuda.CUDAGraph``s in one memory pool; ``EagerGraphs`` runs the same segments without graphs (CPU:
it exercises the segmentation, the static buffers and the host steps, and is what tests run). Routing is
never overridden here (no forced routing, no recording: their per-step host values cannot be captured).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor

from moe_runtime.core.errors import MoeError
from moe_runtime.model.transformer import Routed, StepInputs


class EagerGraphs:
    """Stands in for CUDA graphs: ``capture`` runs the segment once and keeps its outputs as the static
    buffers; ``replay`` runs it again and copies into them (what a graph replay amounts to)."""

    def capture(self, fn: Callable[[], dict]) -> tuple[Callable[[], None], dict]:
        static = fn()

        def replay() -> None:
            for k, v in fn().items():
                if v is not None:
                    static[k].copy_(v)
        return replay, static


class CudaGraphs:
    """One ``torch.cuda.CUDAGraph`` per segment, all in one memory pool (replayed in capture order)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list[torch.cuda.CUDAGraph] = []

    def capture(self, fn: Callable[[], dict]) -> tuple[Callable[[], None], dict]:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            static = fn()  # recorded, not run: its outputs are the graph's static buffers
        self.graphs.append(g)
        return g.replay, static


class GraphedStep:
    def __init__(self, model, provider, rows: int | Tensor, tokens: Tensor, positions: Tensor,
                 runner: EagerGraphs | CudaGraphs) -> None:
        M = len(model.moe_layers)
        self.model, self.provider, self.rows = model, provider, rows
        self.tok = tokens.clone()  # [B] static inputs, refilled each step
        self.pos = positions.clone()
        # each MoE layer's routed-expert output [B, H], written by the host's eager expert compute
        self.moe_out = [torch.zeros(tokens.shape[0], model.cfg.hidden_size, dtype=model.dtype, device=model.device)
                        for _ in range(M)]
        self.outs: list[dict] = []
        self.replays: list[Callable[[], None]] = []
        for s in range(M + 1):
            replay, static = runner.capture(lambda s=s: self._segment(s))
            self.replays.append(replay)
            self.outs.append(static)

    def _routed(self, s: int) -> Routed:
        o = self.outs[s]
        return Routed(o["h"], o["x"], o["ids"], o["weights"], o["ranked"])

    def _segment(self, s: int) -> dict:
        model = self.model
        if s == 0:
            inp = model.step_inputs(self.pos, self.rows)
            h, r = model.segment(0, inp, self.provider, h=model.embed_tokens(self.tok))
        else:
            o = self.outs[s - 1]
            inp = StepInputs(self.pos, o["cos"], o["sin"], o["mask"], o["window"], self.rows)
            h, r = model.segment(s, inp, self.provider, prev=self._routed(s - 1), moe_out=self.moe_out[s - 1])
        if r is None:
            return dict(logits=model.head(h))  # [B, V]
        return dict(h=r.h, x=r.x, ids=r.ids, weights=r.weights, ranked=r.ranked, cos=inp.cos, sin=inp.sin,
                    mask=inp.mask, window=inp.window)

    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """One decode step -> logits [B, V] (a static buffer: read or copy it before the next step)."""
        model, M = self.model, len(self.model.moe_layers)
        self.tok.copy_(tokens)
        self.pos.copy_(positions)
        for s, replay in enumerate(self.replays):
            replay()
            if s < M:  # the layer's one host read, its fetch and its experts, as the eager forward runs them
                model.moe_block(s).experts(self._routed(s), self.provider, model.expert_format, out=self.moe_out[s])
        return self.outs[M]["logits"]


class GraphedDecoder:
    """Decode steps through ``GraphedStep``: captured for the running batch on first use and again whenever
    the set of running sequences changes; the provider's step opened before each replay. The caller runs
    at least one eager decode step first (it warms the kernels the capture records)."""

    def __init__(self, model, provider) -> None:
        if getattr(model, "forced", None) is not None or getattr(model, "recorder", None) is not None:
            raise MoeError("--cuda-graphs cannot force or record routing (--route-from-trace, --record-trace): "
                           "their per-step host values are not part of a graph")
        self.inner = getattr(model, "model", None) or model  # the Transformer under a SteppedModel
        self.provider = provider
        self._key: object = None
        self._step: GraphedStep | None = None
        self.capture_s = 0.0  # time spent capturing (one-time work, kept out of decode timings)

    def __call__(self, tokens: Tensor, positions: Tensor, rows: int | list[int], start: int) -> Tensor:
        key = rows if isinstance(rows, int) else tuple(rows)
        if key != self._key:
            if self.inner.device.type == "cuda":  # the queued work before capture is decode time, not capture's
                torch.cuda.synchronize(self.inner.device)  # CPU waits on the GPU here, once per capture
            t = time.perf_counter()
            runner = CudaGraphs() if self.inner.device.type == "cuda" else EagerGraphs()
            index = rows if isinstance(rows, int) else self.inner._row_index(key)
            self._step, self._key = GraphedStep(self.inner, self.provider, index, tokens, positions, runner), key
            self.capture_s += time.perf_counter() - t
        self.provider.begin_step(start, tokens.shape[0])
        return self._step.step(tokens, positions)
