"""Decode steps replayed as CUDA graphs, with the host's bookkeeping between them (``--cuda-graphs``).

A decode step splits at each MoE layer's fetch, the one place the host must learn the routed ids:

- segment 0: embedding, then every block up to MoE layer 0's attention and router (``moe_route``);
- segment s (1..M-1): MoE layer s-1's experts and shared experts, then every block up to MoE layer s's
  router;
- segment M: the last MoE layer's experts, the remaining blocks, the final norm and the LM head.

Each segment is captured once over static buffers (tokens, positions and sequence rows in; the residual,
the normed input, ids, weights and the predictor's ranking out, which the next segment reads) and
replayed at every step. Between replays the host does what only it can: it reads the ids (and the
rankings, in the same transfer), runs the provider's per-layer protocol (its copies, and the compute
stream's wait on them), uploads the slot table the next segment gathers from (``expert_table``), and ends
the previous layer (``end_layer``). The experts compute with fixed shapes from the slot table, so the
router-to-logits device work needs no host values; a batch too large for that, or whose union would not
fit one layer's pool (waves), is refused with one line.

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
        if getattr(provider, "expert_table", None) is None:
            raise MoeError("CUDA graphs need a provider with a device slot table (fixed-shape expert compute)")
        n, k, M = tokens.shape[0], model.cfg.top_k, len(model.moe_layers)
        if not model.fixed_shape_step(n, k):
            raise MoeError(f"--cuda-graphs needs fixed-shape expert compute, but a batch of {n} x top-{k} would "
                           f"gather {n * k * model.expert_format.numel:,} expert elements per layer, over the "
                           f"cap; decode fewer prompts together")
        capacity = getattr(provider, "capacity", None)
        union = min(n * k, model.cfg.n_experts)
        if capacity is not None and any(capacity(m) < union for m in range(M)):  # a graph cannot do waves
            raise MoeError(f"--cuda-graphs needs room for the batch's whole union ({union} experts) in one "
                           f"layer's pool; raise --expert-budget")
        self.model, self.provider, self.rows = model, provider, rows
        self.tok = tokens.clone()  # [B] static inputs, refilled each step
        self.pos = positions.clone()
        self.tables = [provider.expert_table(m) for m in range(M)]  # static views; uploads pending slots now
        bounds = [-1, *model.moe_layers, len(model.layers)]  # segment s runs blocks bounds[s]+1 .. bounds[s+1]
        self.outs: list[dict] = []
        self.replays: list[Callable[[], None]] = []
        for s in range(M + 1):
            replay, static = runner.capture(lambda s=s: self._segment(s, bounds))
            self.replays.append(replay)
            self.outs.append(static)

    def _segment(self, s: int, bounds: list[int]) -> dict:
        model, M = self.model, len(self.model.moe_layers)
        if s == 0:
            pos = self.pos
            cos, sin = model.cos[pos], model.sin[pos]  # [B, R]
            mask = model.causal_mask[pos]  # [B, L]
            window = mask if model.window_mask is None else model.window_mask[pos]
            h = model.embed_tokens(self.tok)  # [B, H]
        else:
            prev = self.outs[s - 1]
            cos, sin, mask, window = prev["cos"], prev["sin"], prev["mask"], prev["window"]
            block = model.layers[bounds[s]]
            out = model.moe_experts(prev["x"], prev["ids"], prev["weights"], None, self.tables[s - 1])
            h = prev["h"] + model.moe_shared(block, prev["x"], out)
        last = bounds[s + 1] if s < M else len(model.layers)
        for j in range(bounds[s] + 1, last + (1 if s < M else 0)):
            block = model.layers[j]
            h = h + block.self_attn(block.input_layernorm(h), self.pos, cos, sin,
                                    window if block.sliding else mask, self.rows)
            if j == last:  # MoE layer s: its router; the host fetches its experts next
                x, ids, weights, ranked = model.moe_route(s, block, h, self.provider)
                return dict(h=h, x=x, ids=ids, weights=weights, ranked=ranked, cos=cos, sin=sin, mask=mask,
                            window=window)
            h = h + block.mlp(block.post_attention_layernorm(h))
        h = model.norm(h)
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        return dict(logits=torch.nn.functional.linear(h, head))  # [B, V]

    def step(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """One decode step -> logits [B, V] (a static buffer: read or copy it before the next step)."""
        model, provider, M = self.model, self.provider, len(self.model.moe_layers)
        self.tok.copy_(tokens)
        self.pos.copy_(positions)
        for s, replay in enumerate(self.replays):
            replay()
            if s > 0:
                provider.end_layer(s - 1)  # its reads are enqueued: copies into its slots may follow
            if s < M:
                o = self.outs[s]
                model.moe_fetch(s, o["ids"], o["h"], o["ranked"], provider)  # the layer's one host read
                provider.expert_table(s)  # slots assigned just now, uploaded before segment s+1 gathers
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
        begin = getattr(self.provider, "begin_step", None)
        if begin is not None:
            begin(start, tokens.shape[0])
        return self._step.step(tokens, positions)
