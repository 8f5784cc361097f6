"""The MoE decoder, top to bottom: RMSNorm, RoPE, attention with a preallocated KV cache, SwiGLU MLPs,
and sparse MoE blocks whose experts come from an expert provider.

Contract:

- ``Transformer(cfg)`` holds the dense weights only (embeddings, attention,
  norms, routers, dense/shared MLPs, lm_head), with module names mirroring the
  HF checkpoints minus the ``model.`` prefix; routed experts are never
  parameters of the model: each MoE block asks ``provider.experts(...)`` for
  the device weights of the experts it needs (see expert_store.py).
- One sequence (batch size 1). ``setup_cache(max_len, device)`` preallocates
  the KV cache and RoPE tables; ``forward(tokens [T], input_pos [T], provider)``
  writes the cache at ``input_pos`` and returns logits [T, V] (or [1, V] with
  ``last_only``). Prefill is one forward over the prompt; decode is T = 1 with
  fixed shapes (attention runs over the whole cache with a mask).
- ``router_logits(m, hidden)`` and ``route(m, logits)`` are the router of MoE
  layer m, usable by predictors on any residual; the MoE block uses the same
  two. ``router_override`` (moe_layer, logits) -> (ids, weights), when set,
  replaces top-k routing (to force a recorded trace).

Numerics follow transformers 5.23 (eager attention): RMSNorm in float32, RoPE
tables in float32 cast to the compute dtype, attention softmax in float32,
router softmax in float32. This module does no I/O (see checkpoint.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_runtime.model.config import ModelConfig
from moe_runtime.model.experts import ExpertProvider


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in float32 and cast back before the weight, as HF does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, theta: float, max_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin tables [max_len, head_dim] in float32 (HF's default RoPE)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.arange(max_len, device=device).float()[:, None] * inv_freq[None, :]  # [L, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [L, D]
    return emb.cos(), emb.sin()


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x [heads, T, D]; cos, sin [T, D]
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.clip = cfg.clip_qkv
        self.qk_norm = cfg.qk_norm
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.n_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.n_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.n_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * d, h, bias=cfg.o_bias)
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(cfg.n_heads * d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.n_kv_heads * d, cfg.rms_norm_eps)
        self.k_cache: Tensor | None = None  # [n_kv, max_len, D]
        self.v_cache: Tensor | None = None  # [n_kv, max_len, D]

    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        # x [T, H]; input_pos [T]; cos, sin [T, D]; mask [T, max_len] bool (True = may attend)
        t = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, nH*D], [T, nKV*D], [T, nKV*D]
        if self.qk_norm == "full":  # OLMoE normalises the whole projection before splitting heads
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = q.clamp(-self.clip, self.clip), k.clamp(-self.clip, self.clip), v.clamp(-self.clip, self.clip)
        q = q.view(t, self.n_heads, self.head_dim)  # [T, nH, D]
        k = k.view(t, self.n_kv, self.head_dim)  # [T, nKV, D]
        if self.qk_norm == "head":  # Qwen3 normalises each head
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(0, 1), cos, sin)  # [nH, T, D]
        k = apply_rope(k.transpose(0, 1), cos, sin)  # [nKV, T, D]
        v = v.view(t, self.n_kv, self.head_dim).transpose(0, 1)  # [nKV, T, D]
        self.k_cache.index_copy_(1, input_pos, k)
        self.v_cache.index_copy_(1, input_pos, v)

        # grouped-query attention without repeating K/V: group the query heads by their KV head
        rep = self.n_heads // self.n_kv
        qg = q.reshape(self.n_kv, rep * t, self.head_dim)  # [nKV, rep*T, D]
        scores = torch.matmul(qg, self.k_cache.transpose(1, 2)) * self.head_dim**-0.5  # [nKV, rep*T, L]
        scores = scores.view(self.n_kv, rep, t, -1)  # [nKV, rep, T, L]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [nKV, rep, T, L]
        out = torch.matmul(probs.view(self.n_kv, rep * t, -1), self.v_cache)  # [nKV, rep*T, D]
        out = out.view(self.n_heads, t, self.head_dim).transpose(0, 1).reshape(t, -1)  # [T, nH*D]
        return self.o_proj(out)  # [T, H]


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
    """Router (and qwen2_moe's gated shared expert); routed experts come from the provider."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.n_experts, bias=False)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, is_moe: bool):
        super().__init__()
        self.is_moe = is_moe
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoeBlock(cfg) if is_moe else MLP(cfg.hidden_size, cfg.dense_intermediate_size)


RouterOverride = Callable[[int, Tensor], tuple[Tensor, Tensor]]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        moe = set(cfg.moe_layers)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i in moe) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.moe_layers: tuple[int, ...] = cfg.moe_layers  # moe layer index -> model layer index
        self.router_override: RouterOverride | None = None
        self.max_len = 0
        self.cos: Tensor | None = None  # [max_len, D] in compute dtype
        self.sin: Tensor | None = None
        self.causal_mask: Tensor | None = None  # [max_len, max_len] bool

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def setup_cache(self, max_len: int) -> None:
        """Preallocate KV cache, RoPE tables and mask for positions 0..max_len-1 (zeroes a previous cache)."""
        cfg, dev, dt = self.cfg, self.device, self.dtype
        self.max_len = max_len
        for layer in self.layers:
            layer.self_attn.k_cache = torch.zeros(cfg.n_kv_heads, max_len, cfg.head_dim, device=dev, dtype=dt)
            layer.self_attn.v_cache = torch.zeros(cfg.n_kv_heads, max_len, cfg.head_dim, device=dev, dtype=dt)
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, max_len, dev)
        self.cos, self.sin = cos.to(dt), sin.to(dt)
        i = torch.arange(max_len, device=dev)
        mask = i[None, :] <= i[:, None]  # [L, L] causal
        if cfg.sliding_window is not None:
            mask &= (i[:, None] - i[None, :]) < cfg.sliding_window
        self.causal_mask = mask

    # -- router access (also used by predictors) --

    def router_logits(self, moe_layer: int, hidden: Tensor) -> Tensor:
        """Router logits [N, E] of MoE layer ``moe_layer`` for a residual [N, H] (applies its post-attention norm)."""
        block = self.layers[self.moe_layers[moe_layer]]
        return block.mlp.gate(block.post_attention_layernorm(hidden))

    def route(self, moe_layer: int, logits: Tensor) -> tuple[Tensor, Tensor]:
        """The family's top-k -> (ids [N,k] long, weights [N,k]).

        Softmax in float32, top-k, renormalised if norm_topk_prob; weights stay
        float32 for mixtral and are cast to the logits' dtype otherwise, as in HF.
        """
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # [N, E]
        weights, ids = torch.topk(probs, self.cfg.top_k, dim=-1)  # [N, k]
        if self.cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.cfg.route_weights_fp32:
            weights = weights.to(logits.dtype)
        return ids, weights

    # -- forward --

    def forward(self, tokens: Tensor, input_pos: Tensor, provider: ExpertProvider, last_only: bool = False) -> Tensor:
        """tokens [T] long, input_pos [T] long -> logits [T, V] ([1, V] if last_only)."""
        if self.causal_mask is None:
            raise RuntimeError("call setup_cache(max_len) before forward")
        cos, sin = self.cos[input_pos], self.sin[input_pos]  # [T, D]
        mask = self.causal_mask[input_pos]  # [T, L]
        h = self.embed_tokens(tokens)  # [T, H]
        m = 0
        for block in self.layers:
            h = h + block.self_attn(block.input_layernorm(h), input_pos, cos, sin, mask)
            if block.is_moe:
                h = h + self._moe(m, block, h, provider)
                m += 1
            else:
                h = h + block.mlp(block.post_attention_layernorm(h))
        if last_only:
            h = h[-1:]
        h = self.norm(h)  # [T, H]
        return F.linear(h, self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight)  # [T, V]

    def _moe(self, m: int, block: Block, h: Tensor, provider: ExpertProvider) -> Tensor:
        # h [N, H]: the residual entering the MoE block, handed to the provider for prediction
        x = block.post_attention_layernorm(h)  # [N, H]
        logits = block.mlp.gate(x)  # [N, E]; same as router_logits(m, h) without normalising twice
        ids, weights = (self.router_override or self.route)(m, logits)  # [N, k], [N, k]
        k = ids.shape[1]
        flat = ids.flatten()  # [N*k], token-major
        # CPU waits on the device here, once per layer: the provider needs the expert ids as Python ints
        flat_ids = flat.tolist()
        order = list(dict.fromkeys(flat_ids))  # unique, first appearance (token-major, then rank)
        experts = provider.experts(m, order, h)
        counts = Counter(flat_ids)
        # (token, rank) slots grouped by expert id; slicing it needs no further device sync
        by_expert = torch.argsort(flat, stable=True)  # [N*k]
        out = torch.zeros_like(x)  # [N, H]
        start = 0
        # accumulate in expert-id order, as HF does, so sums round identically
        for e in sorted(order):
            slots = by_expert[start : start + counts[e]]  # [n_e]
            start += counts[e]
            tok = slots // k  # [n_e]
            w1, w3, w2 = experts[e]
            xe = x[tok]  # [n_e, H]
            ye = F.linear(F.silu(F.linear(xe, w1)) * F.linear(xe, w3), w2)  # [n_e, H]
            w = weights.reshape(-1)[slots, None]  # [n_e, 1]
            out.index_add_(0, tok, (ye * w).to(out.dtype))
        provider.end_layer(m)
        if block.mlp.shared_expert is not None:
            out = out + torch.sigmoid(block.mlp.shared_expert_gate(x)) * block.mlp.shared_expert(x)
        return out
