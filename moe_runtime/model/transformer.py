"""The MoE decoder, top to bottom: attention (attention.py) with a preallocated KV cache, SwiGLU MLPs,
routers, and sparse MoE blocks whose experts come from an expert provider and compute in their format.

Contract:

- ``Transformer(cfg)`` holds the dense weights only (embeddings, attention,
  norms, routers, dense/shared MLPs, lm_head), with module names mirroring the
  HF checkpoints minus the ``model.`` prefix; routed experts are never
  parameters of the model: each MoE block asks ``provider.experts(...)`` for
  the device weights of the experts it needs (see experts.py), and
  ``expert_format.forward`` computes each (formats.py; load_model sets the
  store's format, the default is the plain float32 one).
- ``setup_cache(max_len, batch=1)`` preallocates the KV cache (one row per
  sequence of a static batch) and RoPE tables; ``forward(tokens [T],
  input_pos [T], provider, rows=0)`` writes the cache at ``input_pos`` and
  returns logits [T, V] (or [1, V] with ``last_only``). ``rows`` an int: every
  token belongs to that sequence (a prefill; a decode step of one sequence);
  a LongTensor [T]: token i is the next token of sequence ``rows[i]`` (a
  batched decode step, whose MoE layers compute the union of the tokens'
  experts). Decode steps have fixed shapes (attention runs over the whole
  cache with a mask).
- ``router_logits(m, hidden)`` and ``route(m, logits)`` are the router of MoE
  layer m, usable by predictors on any residual; the MoE block uses the same
  two. A forward's ``route`` (moe_layer, logits) -> (ids, weights), when given,
  replaces top-k routing (to force a recorded trace, or to record it); the
  model keeps no state of it.
- There is one forward. It is a chain of segments split at each MoE layer's
  host read: ``segment(s, ...)`` runs the device work from MoE layer s-1's
  expert output (its shared experts and residual add) to MoE layer s's router
  (``MoeBlock.select``); between segments ``MoeBlock.experts`` is the host's
  part: the one device-to-host read of the layer's ids, the provider's fetch
  (in waves when the union exceeds ``provider.capacity``), and the routed
  experts computed from the provider's weights. ``forward`` runs the chain;
  graphs.py captures the same segments as CUDA graphs and runs the same host
  part between replays.
- Experts are read in place: each routed expert computes from the views the
  provider returns (its slot, or its resident row), one expert at a time over
  its tokens, in ascending id order (as transformers accumulates), so no step
  copies an expert's weights and the bytes a MoE layer writes do not grow with
  the expert's size (quantized formats dequantize one matrix at a time). The
  host holds the ids anyway after its one read per layer, so grouping tokens
  by expert costs no further sync. This is also the CUDA-graph form: the dense
  segments are graphs, the expert compute runs eagerly between replays (the
  host is there for the fetch), so graphs need neither a gathered copy nor a
  fixed union, and a union beyond the pool comes in waves there too.

Numerics follow transformers 5.23 (eager attention): RMSNorm in float32, RoPE
tables in float32 cast to the compute dtype, attention softmax in float32,
router softmax in float32 (deepseek/glm: router logits too). This module does
no I/O (see checkpoint.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_runtime.model.attention import Attention, MLAttention, RMSNorm, rope_tables
from moe_runtime.core.model_config import ModelConfig
from moe_runtime.model.experts import ExpertProvider
from moe_runtime.model.formats import ExpertFormat, format_for
from moe_runtime.model.host_experts import host_forward

class MLP(nn.Module):
    """Dense SwiGLU MLP (qwen's dense layers and shared expert)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


RouterOverride = Callable[[int, Tensor], tuple[Tensor, Tensor]]


class StepInputs(NamedTuple):
    """What every block of a forward reads besides the residual (``Transformer.step_inputs``)."""

    pos: Tensor  # [T] long
    cos: Tensor  # [T, R]
    sin: Tensor  # [T, R]
    mask: Tensor  # [T, L] bool, causal
    window: Tensor  # [T, L] bool, for sliding-window layers (= mask without a window)
    rows: int | Tensor  # the tokens' sequences (see the module docstring)


class Routed(NamedTuple):
    """A MoE layer's routing as the device computed it: what the host reads and the experts compute from."""

    h: Tensor  # [N, H] the residual entering the block (providers predict from it)
    x: Tensor  # [N, H] its post-attention norm, the experts' input
    ids: Tensor  # [N, k] long
    weights: Tensor  # [N, k]
    ranked: Tensor | None  # the provider's device output (a predictor's rankings), read with the ids


class MoeBlock(nn.Module):
    """MoE layer ``layer``: router (with GPT-OSS's bias or DeepSeek-V3's score correction), routed experts
    from the provider, and shared experts: qwen2_moe's one sigmoid-gated ``shared_expert``, deepseek/glm's
    ungated ``shared_experts``. Its forward is ``select`` (device) -> ``experts`` (host read, fetch,
    compute) -> ``shared``; see the module docstring."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.gate = nn.Linear(cfg.hidden_size, cfg.n_experts, bias=cfg.router_bias)
        if cfg.router == "sigmoid":  # added to the scores for choosing experts only, never to their weights
            self.gate.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_experts))
        self.shared_expert = self.shared_experts = None
        if cfg.shared_expert_intermediate_size and cfg.shared_expert_gated:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        elif cfg.shared_expert_intermediate_size:
            self.shared_experts = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)

    def forward(self, x: Tensor, h: Tensor, provider: ExpertProvider, fmt: ExpertFormat,
                route: RouterOverride | None = None) -> Tensor:
        """The block's output [N, H] for its normed input x and the residual h (what ``forward`` chains)."""
        r = self.select(x, h, provider, route)
        return self.shared(r.x, self.experts(r, provider, fmt))

    # -- router --

    def logits(self, x: Tensor) -> Tensor:
        """Router logits [N, E] of the normed input x [N, H]."""
        if self.cfg.router_fp32:  # deepseek/glm: float32 logits from float32 weights
            return F.linear(x.float(), self.gate.weight.float())
        return self.gate(x)

    def route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """The family's top-k -> (ids [N,k] long, weights [N,k]), as transformers routes.

        softmax: softmax in float32 (deepseek_v2: only the best ``topk_group`` of ``n_group`` groups by
        their best expert), top-k, renormalised if norm_topk_prob. sigmoid (deepseek_v3, glm4_moe): sigmoid
        scores; experts chosen on scores + e_score_correction_bias within the best groups (by their top-2
        sum), weighted by their scores. topk_softmax (gpt_oss): top-k logits, softmax over those. Then
        times routed_scaling_factor; weights stay float32 where route_weights_fp32, else the logits' dtype.
        """
        cfg, n = self.cfg, logits.shape[0]
        if cfg.router == "topk_softmax":
            top, ids = torch.topk(logits, cfg.top_k, dim=-1)  # [N, k]
            return ids, F.softmax(top, dim=-1, dtype=top.dtype)
        per_group = cfg.n_experts // cfg.n_group
        if cfg.router == "sigmoid":
            scores = logits.sigmoid()  # [N, E] float32
            choice = scores + self.gate.e_score_correction_bias.float()  # [N, E]
            group = choice.view(n, cfg.n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)  # [N, G]
            fill = float("-inf")
        else:
            scores = choice = F.softmax(logits, dim=-1, dtype=torch.float32)  # [N, E]
            group = choice.view(n, cfg.n_group, per_group).max(dim=-1).values  # [N, G]
            fill = 0.0
        if cfg.n_group > 1:  # keep the best topk_group groups
            keep = torch.zeros_like(group, dtype=torch.bool).scatter_(1, group.topk(cfg.topk_group, dim=-1)[1], True)
            choice = choice.masked_fill(~keep.repeat_interleave(per_group, dim=1), fill)  # [N, E]
        weights, ids = torch.topk(choice, cfg.top_k, dim=-1)  # [N, k]
        if cfg.router == "sigmoid":
            weights = scores.gather(1, ids)
            if cfg.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        elif cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if cfg.routed_scaling_factor != 1.0:
            weights = weights * cfg.routed_scaling_factor
        if not cfg.route_weights_fp32:
            weights = weights.to(logits.dtype)
        return ids, weights

    def select(self, x: Tensor, h: Tensor, provider: ExpertProvider, route: RouterOverride | None = None) -> Routed:
        """The device work before the host learns the ids: routing, and the provider's ``prepare``."""
        logits = self.logits(x)  # [N, E]
        ids, weights = route(self.layer, logits) if route is not None else self.route(logits)  # [N, k] each
        return Routed(h, x, ids, weights, provider.prepare(self.layer, h))

    # -- routed experts: the host's part --

    @staticmethod
    def host_apart(x: Tensor) -> bool:
        """Whether the host computes its experts apart from the device's (a GPU run), rather than in the
        device's own loop (a CPU run, where the device is the host: exact tokens). Tests set it to run the
        GPU's path on a CPU."""
        return x.device.type != "cpu"

    def experts(self, r: Routed, provider: ExpertProvider, fmt: ExpertFormat, out: Tensor | None = None) -> Tensor:
        """The routed experts' weighted sum [N, H] (into ``out`` when given, e.g. a graph's static buffer).

        The host reads the ids once, asks the provider for the union (in waves of ``capacity`` in ascending
        id order when larger: every expert still sees all its tokens and the sums keep their order, so the
        result equals one call's bit for bit) and computes each expert from the returned views in place."""
        m, k = self.layer, r.ids.shape[1]
        flat_ids, rankings = read_ids(r.ids, r.ranked)
        order = list(dict.fromkeys(flat_ids))  # unique, in first appearance (token-major, then rank)
        cap = provider.capacity(m)
        waves = [order] if len(order) <= cap else [sorted(order)[i:i + cap] for i in range(0, len(order), cap)]
        out = torch.zeros_like(r.x) if out is None else out.zero_()  # [N, H]
        counts = Counter(flat_ids)
        single = r.ids.shape[0] == 1 and len(order) == len(flat_ids)  # one token, k distinct experts
        # the weighted outputs are cast to the residual's dtype only when they differ (a no-op op otherwise)
        dt = out.dtype
        cast = torch.promote_types(fmt.compute_dtype, r.weights.dtype) != dt
        if single:  # one token: its rank of each expert is known on the host, no gather at all
            cols = r.weights.unbind(1)  # k x [1], views
        else:  # (token, rank) positions grouped by expert id, on the device: slicing it needs no further sync
            by_expert = torch.argsort(r.ids.flatten(), stable=True)  # [N*k]
            flat_w = r.weights.reshape(-1)  # [N*k]
        # a GPU run whose host may compute experts: the layer's input and weights come to the host now, while
        # the stream holds nothing after them (the ids were just read); later, they would wait behind the
        # copies the provider's waits put on the stream and behind the device's experts
        apart = self.host_apart(r.x)
        host_in = None if not apart or not provider.may_host(m) else (
            r.x.to("cpu"), r.weights.reshape(-1).to("cpu"), torch.argsort(torch.tensor(flat_ids), stable=True))
        for wave in waves:
            experts = provider.experts(m, wave, r.h, rankings, [counts[e] for e in wave])
            host = provider.on_host(m)
            hfmt = provider.host_format if host else None  # the host copies' format, when not the model's
            # the host's experts: on a CPU run the device is the host and they join the loop below (the same
            # kernels in the same order: the tokens stay exact); on a GPU the host computes them meanwhile
            away = host if apart else ()
            ordered = sorted(wave)
            start = sum(n for e, n in counts.items() if e < ordered[0])
            # accumulate in expert-id order, as HF does, so sums round identically (waves continue the order)
            for e in ordered:
                f = hfmt if hfmt is not None and e in host else fmt
                if single:
                    if e not in away:
                        w = cols[flat_ids.index(e)]
                        y = (fmt.forward(r.x, experts[e]) if f is fmt else host_forward(f, r.x, experts[e])) * w
                        out.add_(y.to(dt) if cast or f is not fmt else y)
                    continue
                slots = by_expert[start: start + counts[e]]  # [n_e]
                start += counts[e]
                if e in away:
                    continue
                tok = slots // k  # [n_e]
                xs = r.x[tok]
                y = (fmt.forward(xs, experts[e]) if f is fmt else host_forward(f, xs, experts[e])) * flat_w[slots, None]
                out.index_add_(0, tok, y.to(dt) if cast or f is not fmt else y)
            if away:  # the device's kernels above are queued; the host computes its experts meanwhile
                y = self._host_sum(host_in, away, experts, hfmt or fmt, counts, k, dt)
                # the one wait of a hybrid layer: the device adds the host's sum after its own experts
                # (copying it in waits for the host to finish them; the device's queue ran meanwhile)
                out.add_(y.to(out.device, non_blocking=True))
            provider.end_layer(m)
        return out

    @staticmethod
    def _host_sum(host_in, host, experts: dict, fmt: ExpertFormat, counts: Counter, k: int,
                  dt: torch.dtype) -> Tensor:
        """The weighted sum [N, H] of the experts ``host`` computed by the host CPU from their host copies
        (``host_forward``), in ascending id order, on host tensors. ``host_in``: the layer's input [N, H],
        its flat routing weights [N*k] and the (token, rank) positions grouped by expert id [N*k], on the
        host."""
        x, w, by_expert = host_in
        acc = torch.zeros(x.shape, dtype=dt)  # [N, H]
        for e in sorted(host):
            start = sum(n for f, n in counts.items() if f < e)
            idx = by_expert[start: start + counts[e]]  # (token, rank) positions of expert e
            tok = idx // k
            y = host_forward(fmt, x[tok], experts[e]) * w[idx, None]  # [n_e, H]
            acc.index_add_(0, tok, y.to(dt))
        return acc

    def shared(self, x: Tensor, out: Tensor) -> Tensor:
        """``out`` plus the block's shared experts (qwen2_moe: sigmoid-gated; deepseek/glm: ungated)."""
        if self.shared_expert is not None:
            return out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.shared_experts is not None:
            return out + self.shared_experts(x)
        return out


def read_ids(ids: Tensor, ranked: Tensor | None) -> tuple[list[int], list[list[int]] | None]:
    """(the flat ids [N*k] token-major, each distance's ranking or None) as Python ints."""
    flat = ids.flatten()  # [N*k], token-major
    if ranked is None:
        # CPU waits on the device here, once per layer: the provider needs the expert ids as Python ints
        return flat.tolist(), None
    # CPU waits on the device here, once per layer: the ids and every distance's ranking together
    both = torch.cat([flat, ranked.flatten()]).tolist()
    rest, E = both[flat.numel():], ranked.shape[1]
    return both[: flat.numel()], [rest[i:i + E] for i in range(0, len(rest), E)]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, is_moe: bool):
        super().__init__()
        self.is_moe = is_moe
        self.sliding = cfg.sliding_window is not None and (
            not cfg.layer_types or cfg.layer_types[index] == "sliding_attention")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)
        self.self_attn = MLAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)
        self.mlp = MoeBlock(cfg, cfg.moe_layers.index(index)) if is_moe else MLP(cfg.hidden_size,
                                                                                 cfg.dense_intermediate_size)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        moe = set(cfg.moe_layers)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, i in moe) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.moe_layers: tuple[int, ...] = cfg.moe_layers  # moe layer index -> model layer index
        self.expert_format = format_for(cfg, "float32", torch.float32)  # load_model sets the store's
        self.max_len = self.batch = 0
        self.cos: Tensor | None = None  # [max_len, R] in compute dtype (R: the rotated dims of a head)
        self.sin: Tensor | None = None
        self.causal_mask: Tensor | None = None  # [max_len, max_len] bool
        self.window_mask: Tensor | None = None  # [max_len, max_len] bool, for sliding-window layers

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def setup_cache(self, max_len: int, batch: int = 1) -> None:
        """Preallocate KV cache (``batch`` sequences), RoPE tables and mask for positions 0..max_len-1
        (zeroes a previous cache)."""
        cfg, dev, dt = self.cfg, self.device, self.dtype
        self.max_len, self.batch = max_len, batch
        for layer in self.layers:
            layer.self_attn.setup_cache(max_len, dev, dt, batch)
        cos, sin = rope_tables(cfg, max_len, dev)
        self.cos, self.sin = cos.to(dt), sin.to(dt)
        i = torch.arange(max_len, device=dev)
        self.causal_mask = i[None, :] <= i[:, None]  # [L, L] causal
        if cfg.sliding_window is not None:  # attend to the last W positions only
            self.window_mask = self.causal_mask & ((i[:, None] - i[None, :]) < cfg.sliding_window)

    def start_sequence(self, row: int) -> None:
        """A new sequence takes KV-cache row ``row`` (continuous batching). Nothing to reset here: each
        forward is given its positions, and the mask hides the row's positions past them."""

    def clear_row(self, row: int) -> None:
        """Zero KV-cache row ``row`` in every layer (a failed sequence's NaN must not reach a later one)."""
        for layer in self.layers:
            layer.self_attn.clear_row(row)

    def _row_index(self, rows: tuple[int, ...]) -> Tensor:
        # a batch's running set changes only when a sequence stops: one small upload per change
        if getattr(self, "_rows_key", None) != rows:
            self._rows_key, self._rows_t = rows, torch.tensor(rows, dtype=torch.long, device=self.device)
        return self._rows_t

    # -- router access (also used by predictors) --

    def moe_block(self, moe_layer: int) -> MoeBlock:
        return self.layers[self.moe_layers[moe_layer]].mlp

    def router_logits(self, moe_layer: int, hidden: Tensor) -> Tensor:
        """Router logits [N, E] of MoE layer ``moe_layer`` for a residual [N, H] (applies its post-attention norm)."""
        block = self.layers[self.moe_layers[moe_layer]]
        return block.mlp.logits(block.post_attention_layernorm(hidden))

    def route(self, moe_layer: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        """MoE layer ``moe_layer``'s top-k of router logits -> (ids [N,k] long, weights [N,k]) (MoeBlock.route)."""
        return self.moe_block(moe_layer).route(logits)

    # -- the forward, as segments (graphs.py replays the same ones) --

    def forward(self, tokens: Tensor, input_pos: Tensor, provider: ExpertProvider, last_only: bool = False,
                route: RouterOverride | None = None, rows: int | Sequence[int] | Tensor = 0) -> Tensor:
        """tokens [T] long, input_pos [T] long -> logits [T, V] ([1, V] if last_only); ``route`` replaces
        the routers' top-k, ``rows`` names the tokens' sequences (see the module docstring)."""
        inp = self.step_inputs(input_pos, rows)
        h, r = self.segment(0, inp, provider, h=self.embed_tokens(tokens), route=route)  # [T, H]
        for s in range(1, len(self.moe_layers) + 1):
            out = self.moe_block(s - 1).experts(r, provider, self.expert_format)  # the host's part of layer s-1
            h, r = self.segment(s, inp, provider, prev=r, moe_out=out, route=route)
        return self.head(h, last_only)

    def step_inputs(self, input_pos: Tensor, rows: int | Sequence[int] | Tensor) -> StepInputs:
        """What every block of a forward reads besides the residual: positions, RoPE rows, masks, sequences."""
        if self.causal_mask is None:
            raise RuntimeError("call setup_cache(max_len) before forward")
        if not isinstance(rows, (int, Tensor)):  # the running sequences, as a (cached) index tensor
            rows = self._row_index(tuple(rows))
        mask = self.causal_mask[input_pos]  # [T, L]
        window = mask if self.window_mask is None else self.window_mask[input_pos]  # [T, L]
        return StepInputs(input_pos, self.cos[input_pos], self.sin[input_pos], mask, window, rows)  # cos/sin [T, R]

    def segment(self, s: int, inp: StepInputs, provider: ExpertProvider, *, h: Tensor | None = None,
                prev: Routed | None = None, moe_out: Tensor | None = None,
                route: RouterOverride | None = None) -> tuple[Tensor, Routed | None]:
        """Segment s of a forward, all device work -> (residual [T, H], MoE layer s's routing, None past the
        last). s = 0 starts from the embeddings ``h``; s >= 1 from MoE layer s-1's routing ``prev`` and its
        routed experts' output ``moe_out`` (adds its shared experts and the residual). Then every block up
        to MoE layer s's router; after the last MoE layer, the remaining blocks."""
        if s > 0:
            h = prev.h + self.moe_block(s - 1).shared(prev.x, moe_out)  # [T, H]
        first = self.moe_layers[s - 1] + 1 if s > 0 else 0
        last = self.moe_layers[s] if s < len(self.moe_layers) else len(self.layers) - 1
        for j in range(first, last + 1):
            block = self.layers[j]
            h = h + block.self_attn(block.input_layernorm(h), inp.pos, inp.cos, inp.sin,
                                    inp.window if block.sliding else inp.mask, inp.rows)
            x = block.post_attention_layernorm(h)  # [T, H]
            if block.is_moe:  # MoE layer s: its router; the host fetches its experts next
                return h, block.mlp.select(x, h, provider, route)
            h = h + block.mlp(x)
        return h, None

    def head(self, h: Tensor, last_only: bool = False) -> Tensor:
        """Final norm and LM head: residual [T, H] -> logits [T, V] ([1, V] if last_only)."""
        if last_only:
            h = h[-1:]
        h = self.norm(h)  # [T, H]
        return F.linear(h, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)  # [T, V]
