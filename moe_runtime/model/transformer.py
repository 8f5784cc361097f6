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

Numerics follow transformers 5.23 (eager attention): RMSNorm in float32, RoPE
tables in float32 cast to the compute dtype, attention softmax in float32,
router softmax in float32 (deepseek/glm: router logits too). This module does
no I/O (see checkpoint.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_runtime.model.attention import Attention, MLAttention, RMSNorm, rope_tables
from moe_runtime.core.model_config import ModelConfig
from moe_runtime.model.experts import ExpertProvider
from moe_runtime.model.formats import format_for

# The fixed-shape expert compute gathers a copy of every (token, rank)'s expert. On CPU that is worth it
# only while the copy is small (it removes the per-expert Python); larger steps compute each expert in place.
FIXED_SHAPE_MAX = 1 << 22  # elements gathered per MoE layer
# On CUDA it is what decode steps use (no host values: a graph can capture it), but a prefill's N x k
# copies of real-sized experts would not fit, so only steps of at most one token per sequence take it, and
# a batch only while its copy stays under this many elements (1 GiB in bf16).
FIXED_SHAPE_MAX_CUDA = 1 << 29


class MLP(nn.Module):
    """Dense SwiGLU MLP (qwen's dense layers and shared expert)."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoeBlock(nn.Module):
    """Router (with GPT-OSS's bias or DeepSeek-V3's score correction) and shared experts: qwen2_moe's one
    sigmoid-gated ``shared_expert``, deepseek/glm's ungated ``shared_experts``. Routed experts come from
    the provider."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.n_experts, bias=cfg.router_bias)
        if cfg.router == "sigmoid":  # added to the scores for choosing experts only, never to their weights
            self.gate.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_experts))
        self.shared_expert = self.shared_experts = None
        if cfg.shared_expert_intermediate_size and cfg.shared_expert_gated:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        elif cfg.shared_expert_intermediate_size:
            self.shared_experts = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, is_moe: bool):
        super().__init__()
        self.is_moe = is_moe
        self.sliding = cfg.sliding_window is not None and (
            not cfg.layer_types or cfg.layer_types[index] == "sliding_attention")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)
        self.self_attn = MLAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_weight_fp32)
        self.mlp = MoeBlock(cfg) if is_moe else MLP(cfg.hidden_size, cfg.dense_intermediate_size)


RouterOverride = Callable[[int, Tensor], tuple[Tensor, Tensor]]


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

    def _row_index(self, rows: tuple[int, ...]) -> Tensor:
        # a batch's running set changes only when a sequence stops: one small upload per change
        if getattr(self, "_rows_key", None) != rows:
            self._rows_key, self._rows_t = rows, torch.tensor(rows, dtype=torch.long, device=self.device)
        return self._rows_t

    # -- router access (also used by predictors) --

    def router_logits(self, moe_layer: int, hidden: Tensor) -> Tensor:
        """Router logits [N, E] of MoE layer ``moe_layer`` for a residual [N, H] (applies its post-attention norm)."""
        block = self.layers[self.moe_layers[moe_layer]]
        return self._gate(block, block.post_attention_layernorm(hidden))

    def _gate(self, block: Block, x: Tensor) -> Tensor:
        if self.cfg.router_fp32:  # deepseek/glm: float32 logits from float32 weights
            return F.linear(x.float(), block.mlp.gate.weight.float())
        return block.mlp.gate(x)

    def route(self, moe_layer: int, logits: Tensor) -> tuple[Tensor, Tensor]:
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
            bias = self.layers[self.moe_layers[moe_layer]].mlp.gate.e_score_correction_bias
            choice = scores + bias.float()  # [N, E]
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

    # -- forward --

    def forward(self, tokens: Tensor, input_pos: Tensor, provider: ExpertProvider, last_only: bool = False,
                route: RouterOverride | None = None, rows: int | Sequence[int] | Tensor = 0) -> Tensor:
        """tokens [T] long, input_pos [T] long -> logits [T, V] ([1, V] if last_only); ``route`` replaces
        the routers' top-k, ``rows`` names the tokens' sequences (see the module docstring)."""
        if self.causal_mask is None:
            raise RuntimeError("call setup_cache(max_len) before forward")
        if not isinstance(rows, (int, Tensor)):  # the running sequences, as a (cached) index tensor
            rows = self._row_index(tuple(rows))
        cos, sin = self.cos[input_pos], self.sin[input_pos]  # [T, R]
        mask = self.causal_mask[input_pos]  # [T, L]
        window = mask if self.window_mask is None else self.window_mask[input_pos]  # [T, L]
        h = self.embed_tokens(tokens)  # [T, H]
        m = 0
        for block in self.layers:
            h = h + block.self_attn(block.input_layernorm(h), input_pos, cos, sin,
                                    window if block.sliding else mask, rows)
            if block.is_moe:
                h = h + self._moe(m, block, h, provider, route)
                m += 1
            else:
                h = h + block.mlp(block.post_attention_layernorm(h))
        if last_only:
            h = h[-1:]
        h = self.norm(h)  # [T, H]
        return F.linear(h, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)  # [T, V]

    def _moe(self, m: int, block: Block, h: Tensor, provider: ExpertProvider,
             route: RouterOverride | None = None) -> Tensor:
        # h [N, H]: the residual entering the MoE block, handed to the provider for prediction
        x, ids, weights, ranked = self.moe_route(m, block, h, provider, route)
        fixed = self.fixed_shapes(x, ids, provider)
        flat_ids, order, rankings = self.moe_ids(ids, ranked)
        cap = provider.capacity(m) if hasattr(provider, "capacity") else len(order)
        if len(order) > cap:  # a prompt's union beyond the cache: its experts in waves
            out = self._moe_waves(m, x, ids, weights, h, provider, flat_ids, order, rankings, cap, fixed)
        else:
            experts = provider.experts(m, order, h, *([rankings] if rankings is not None else []))
            out = self.moe_experts(x, ids, weights, (experts, flat_ids, order),
                                   provider.expert_table(m) if fixed else None)
            provider.end_layer(m)
        return self.moe_shared(block, x, out)

    # The MoE block in the three parts a CUDA graph splits it into (graphs.py): the device work before the
    # host learns the ids, the host's fetch (the one device-to-host transfer), the device work after.

    def moe_route(self, m: int, block: Block, h: Tensor, provider: ExpertProvider,
                  route: RouterOverride | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(normed input x [N, H], ids [N, k], weights [N, k], the predictor's device ranking or None)."""
        x = block.post_attention_layernorm(h)  # [N, H]
        logits = self._gate(block, x)  # [N, E]; same as router_logits(m, h) without normalising twice
        ids, weights = (route or self.route)(m, logits)  # [N, k], [N, k]
        # a provider's predictor may want device-side rankings of later layers: fetched with the ids
        ranked = provider.prepare(m, h) if hasattr(provider, "prepare") else None
        return x, ids, weights, ranked

    def moe_ids(self, ids: Tensor, ranked: Tensor | None) -> tuple[list[int], list[int], list | None]:
        """(flat ids, unique ids in first appearance (token-major, then rank), each distance's ranking)."""
        flat = ids.flatten()  # [N*k], token-major
        if ranked is None:
            # CPU waits on the device here, once per layer: the provider needs the expert ids as Python ints
            flat_ids, rankings = flat.tolist(), None
        else:
            # CPU waits on the device here, once per layer: the ids and every distance's ranking together
            both = torch.cat([flat, ranked.flatten()]).tolist()
            flat_ids, rest, E = both[: flat.numel()], both[flat.numel():], ranked.shape[1]
            rankings = [rest[i:i + E] for i in range(0, len(rest), E)]
        return flat_ids, list(dict.fromkeys(flat_ids)), rankings

    def moe_fetch(self, m: int, ids: Tensor, h: Tensor, ranked: Tensor | None, provider: ExpertProvider) -> dict:
        """The provider's experts for the layer (all in one call), by id."""
        _, order, rankings = self.moe_ids(ids, ranked)
        return provider.experts(m, order, h, *([rankings] if rankings is not None else []))

    def fixed_shapes(self, x: Tensor, ids: Tensor, provider: ExpertProvider) -> bool:
        """Whether the experts compute with fixed shapes from the provider's slot table. The rule sees only
        shapes, never the provider's budget, so resident and offloaded runs take the same path (and round
        alike). On CPU: while the gathered copy of every (token, rank)'s expert is small. On CUDA: steps of
        at most ``batch`` tokens (decode steps, and prefills that short: their union the budget check
        guarantees fits in one call, so they never come in waves), one token always, more while the copy
        is under the cap."""
        return getattr(provider, "expert_table", None) is not None and self.fixed_shape_step(*ids.shape)

    def fixed_shape_step(self, n: int, k: int) -> bool:
        """``fixed_shapes`` for a step of ``n`` tokens routed to ``k`` experts each (on this model's device)."""
        gathered = n * k * self.expert_format.numel
        if self.device.type != "cuda":
            return gathered <= FIXED_SHAPE_MAX
        return n == 1 or (n <= self.batch and gathered <= FIXED_SHAPE_MAX_CUDA)

    def moe_experts(self, x: Tensor, ids: Tensor, weights: Tensor, fetched: tuple | None,
                    table: tuple[Tensor, Tensor] | None) -> Tensor:
        """The routed experts' weighted sum [N, H]: fixed shapes from ``table`` (no host values needed), else
        one expert at a time from ``fetched`` ((experts by id, flat ids, unique ids))."""
        k = ids.shape[1]
        if table is not None:
            return self._combine(self._fixed_rows(x, ids.flatten(), k, table), weights, x.dtype)
        experts, flat_ids, order = fetched
        out = torch.zeros_like(x)  # [N, H]
        self._accumulate(out, x, ids, weights, flat_ids, sorted(order), experts)
        return out

    def _fixed_rows(self, x: Tensor, flat: Tensor, k: int, table: tuple[Tensor, Tensor],
                    sel: Tensor | None = None) -> Tensor:
        # every (token, rank) gathers its expert's slot by index and all run as one batched matmul: no
        # per-expert Python, no further sync. ``sel``: only these (token, rank) rows.
        rows, pool = table
        xr = x.repeat_interleave(k, dim=0)  # [N*k, H]
        if sel is not None:
            flat, xr = flat[sel], xr[sel]
        w = self.expert_format.views(pool[rows[flat]])  # stacked [n, ...] weights of each (token, rank)
        return self.expert_format.forward(xr[:, None, :], w)[:, 0, :]  # [n, H]

    @staticmethod
    def _combine(y: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
        k = weights.shape[1]
        return (y.view(-1, k, y.shape[-1]) * weights[..., None]).sum(dim=1).to(dtype)  # [N, H]

    def _accumulate(self, out: Tensor, x: Tensor, ids: Tensor, weights: Tensor, flat_ids: list[int],
                    experts_sorted: list[int], experts: dict) -> None:
        """out += each expert's weighted output over its tokens, for ``experts_sorted`` (ascending ids)."""
        k, fmt = ids.shape[1], self.expert_format
        counts = Counter(flat_ids)
        # (token, rank) slots grouped by expert id; slicing it needs no further device sync
        by_expert = torch.argsort(ids.flatten(), stable=True)  # [N*k]
        start = sum(n for e, n in counts.items() if e < experts_sorted[0])
        # accumulate in expert-id order, as HF does, so sums round identically (waves continue the order)
        for e in experts_sorted:
            slots = by_expert[start : start + counts[e]]  # [n_e]
            start += counts[e]
            tok = slots // k  # [n_e]
            ye = fmt.forward(x[tok], experts[e])  # [n_e, H]
            w = weights.reshape(-1)[slots, None]  # [n_e, 1]
            out.index_add_(0, tok, (ye * w).to(out.dtype))

    def _moe_waves(self, m: int, x: Tensor, ids: Tensor, weights: Tensor, h: Tensor, provider: ExpertProvider,
                   flat_ids: list[int], order: list[int], rankings: list | None, cap: int, fixed: bool) -> Tensor:
        """The layer's experts ``cap`` at a time, in ascending id order, each wave one provider call: every
        expert still sees all its tokens and the sums keep their order, so the result equals one call's
        (a prefill whose union exceeds the cache stays exact, not chunked into different matmul shapes)."""
        k = ids.shape[1]
        ordered = sorted(order)
        out = y = None
        if not fixed:
            out = torch.zeros_like(x)
        for i in range(0, len(ordered), cap):
            wave = ordered[i:i + cap]
            experts = provider.experts(m, wave, h, *([rankings] if rankings is not None else []))
            if fixed:
                members = set(wave)
                sel = torch.tensor([j for j, e in enumerate(flat_ids) if e in members], device=x.device)
                rows = self._fixed_rows(x, ids.flatten(), k, provider.expert_table(m), sel)
                if y is None:
                    y = rows.new_empty(len(flat_ids), rows.shape[-1])  # [N*k, H]
                y[sel] = rows
            else:
                self._accumulate(out, x, ids, weights, flat_ids, wave, experts)
            provider.end_layer(m)
        return self._combine(y, weights, x.dtype) if fixed else out

    def moe_shared(self, block: Block, x: Tensor, out: Tensor) -> Tensor:
        """``out`` plus the block's shared experts (qwen2_moe: sigmoid-gated; deepseek/glm: ungated)."""
        if block.mlp.shared_expert is not None:
            return out + torch.sigmoid(block.mlp.shared_expert_gate(x)) * block.mlp.shared_expert(x)
        if block.mlp.shared_experts is not None:
            return out + block.mlp.shared_experts(x)
        return out
