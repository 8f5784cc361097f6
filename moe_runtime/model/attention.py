"""Attention of the decoder, top to bottom: RMSNorm, RoPE (default and YaRN), grouped-query attention
(optional q/k norms, clipping, biases, sinks, partial rotary) and multi-head latent attention (MLA).

Contract: both attention modules take ``forward(x [T, H], input_pos [T], cos, sin, mask [T, L], rows)
-> [T, H]`` and write their preallocated cache (``setup_cache(max_len, device, dtype, batch)``: one row per
sequence) at ``input_pos``; ``mask`` is bool (True = may attend) over the whole cache of L positions.
``rows`` an int: every token belongs to that sequence (a prefill, or a batch of one); a LongTensor [T]:
token i belongs to sequence ``rows[i]`` (a batched decode step, one token per sequence). ``rope_tables(cfg, max_len, device)`` gives
the cos/sin tables [L, rotary_dim] in float32 (YaRN's attention factor included); ``Rope`` applies them.

- GQA caches k and v per KV head: [n_kv, L, head_dim] each.
- MLA caches what transformers' DynamicCache holds for DeepSeek: the normalised KV latent [L, kv_lora_rank]
  and the rotated RoPE key [L, qk_rope_head_dim] per token, never expanded heads. Attention runs on the
  latent ("absorbed" form): q_nope is mapped through kv_b_proj's key half into latent space and the
  output comes back through its value half, which equals expanding every cached token's K and V.

Numerics follow transformers 5.23 (eager): RMSNorm in float32, attention softmax in float32 (with sinks:
in the compute dtype, after subtracting the row maximum, as GPT-OSS does). No I/O.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_runtime.core.model_config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight_fp32: bool = False):
        super().__init__()
        self.eps, self.weight_fp32 = eps, weight_fp32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in float32; cast back before the weight as HF does (GPT-OSS: after it)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_fp32:
            return (self.weight.float() * xf).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_tables(cfg: ModelConfig, max_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin [max_len, rotary_dim] in float32: HF's default RoPE, or YaRN's (``_compute_yarn_parameters``)."""
    dim, base, y = cfg.rotary_dim, cfg.rope_theta, cfg.yarn
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)  # [D/2]
    inv_freq, scale = 1.0 / pos_freqs, 1.0
    if y is not None:
        scale = y.attention_factor
        if scale is None:
            scale = (_yarn_mscale(y.factor, y.mscale) / _yarn_mscale(y.factor, y.mscale_all_dim)
                     if y.mscale and y.mscale_all_dim else _yarn_mscale(y.factor))

        def corr(rot: float) -> float:  # the dimension that turns ``rot`` times over the original context
            return dim * math.log(y.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

        low, high = corr(y.beta_fast), corr(y.beta_slow)
        if y.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low)
                / (high - low if high != low else 0.001)).clamp(0, 1)
        extrapolate = 1 - ramp  # high-frequency dimensions keep their frequency; low ones are interpolated
        inv_freq = (1.0 / (y.factor * pos_freqs)) * (1 - extrapolate) + inv_freq * extrapolate
    freqs = torch.arange(max_len, device=device).float()[:, None] * inv_freq[None, :]  # [L, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [L, D]
    return emb.cos() * scale, emb.sin() * scale


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, interleave: bool = False) -> Tensor:
    """x [heads, T, D >= rotary]; cos, sin [T, rotary]. Rotates the first ``rotary`` dims, passes the rest.

    ``interleave``: pairs (x0, x1), (x2, x3)... share a frequency (DeepSeek); the result lists the rotated
    even dims then the odd ones, as transformers does (q and k alike, so q.k is unchanged)."""
    r = cos.shape[-1]
    if interleave:
        c, s = cos[..., : r // 2], sin[..., : r // 2]
        x1, x2 = x[..., 0:r:2], x[..., 1:r:2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    return torch.cat((x[..., :r] * cos + rotate_half(x[..., :r]) * sin, x[..., r:]), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with the families' switches (q/k norms, clip, biases, sinks, partial RoPE)."""

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
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attention_sinks else None
        self.k_cache: Tensor | None = None  # [n_kv, max_len, D]
        self.v_cache: Tensor | None = None  # [n_kv, max_len, D]

    def setup_cache(self, max_len: int, device: torch.device, dtype: torch.dtype, batch: int = 1) -> None:
        self.k_cache = torch.zeros(batch, self.n_kv, max_len, self.head_dim, device=device, dtype=dtype)
        self.v_cache = torch.zeros(batch, self.n_kv, max_len, self.head_dim, device=device, dtype=dtype)

    def clear_row(self, row: int) -> None:
        """Zero one sequence's cache row."""
        self.k_cache[row].zero_()
        self.v_cache[row].zero_()

    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                rows: int | Tensor = 0) -> Tensor:
        # x [T, H]; input_pos [T]; cos, sin [T, R]; mask [T, max_len] bool (True = may attend)
        t = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, nH*D], [T, nKV*D], [T, nKV*D]
        if self.qk_norm == "full":  # OLMoE normalises the whole projection before splitting heads
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = q.clamp(-self.clip, self.clip), k.clamp(-self.clip, self.clip), v.clamp(-self.clip, self.clip)
        q = q.view(t, self.n_heads, self.head_dim)  # [T, nH, D]
        k = k.view(t, self.n_kv, self.head_dim)  # [T, nKV, D]
        if self.qk_norm == "head":  # Qwen3 (and GLM with use_qk_norm) normalise each head
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(0, 1), cos, sin)  # [nH, T, D]
        k = apply_rope(k.transpose(0, 1), cos, sin)  # [nKV, T, D]
        v = v.view(t, self.n_kv, self.head_dim).transpose(0, 1)  # [nKV, T, D]
        rep = self.n_heads // self.n_kv
        if not isinstance(rows, int):  # one token per sequence (a batched decode step)
            return self.o_proj(self._rows(q, k, v, input_pos, mask, rows, rep))
        k_cache, v_cache = self.k_cache[rows], self.v_cache[rows]  # [nKV, L, D] views of this sequence
        k_cache.index_copy_(1, input_pos, k)
        v_cache.index_copy_(1, input_pos, v)

        # grouped-query attention without repeating K/V: group the query heads by their KV head
        qg = q.reshape(self.n_kv, rep * t, self.head_dim)  # [nKV, rep*T, D]
        scores = torch.matmul(qg, k_cache.transpose(1, 2)) * self.head_dim**-0.5  # [nKV, rep*T, L]
        scores = scores.view(self.n_kv, rep, t, -1)  # [nKV, rep, T, L]
        probs = self._probs(scores.masked_fill(~mask, torch.finfo(scores.dtype).min), q.dtype)
        out = torch.matmul(probs.reshape(self.n_kv, rep * t, -1), v_cache)  # [nKV, rep*T, D]
        out = out.view(self.n_heads, t, self.head_dim).transpose(0, 1).reshape(t, -1)  # [T, nH*D]
        return self.o_proj(out)  # [T, H]

    def _rows(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, mask: Tensor, rows: Tensor,
              rep: int) -> Tensor:
        """Token i of sequence ``rows[i]``: q [nH, T, D], k/v [nKV, T, D] -> [T, nH*D]."""
        t = q.shape[1]
        self.k_cache[rows, :, input_pos] = k.transpose(0, 1)  # [T, nKV, D] into (row, :, pos)
        self.v_cache[rows, :, input_pos] = v.transpose(0, 1)
        k_all, v_all = self.k_cache[rows], self.v_cache[rows]  # [T, nKV, L, D] gathered copies: device work, no sync
        qg = q.transpose(0, 1).reshape(t, self.n_kv, rep, self.head_dim)  # [T, nKV, rep, D]
        scores = torch.matmul(qg, k_all.transpose(2, 3)) * self.head_dim**-0.5  # [T, nKV, rep, L]
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = self._probs(scores.permute(1, 2, 0, 3), q.dtype).permute(2, 0, 1, 3)  # [T, nKV, rep, L]
        return torch.matmul(probs, v_all).reshape(t, -1)  # [T, nH*D]

    def _probs(self, scores: Tensor, dtype: torch.dtype) -> Tensor:
        """Attention weights from masked scores [nKV, rep, T, L], in ``dtype``."""
        if self.sinks is None:
            return F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        # GPT-OSS: each head's sink logit joins the softmax and takes its share of the mass
        sink = self.sinks.view(self.n_kv, scores.shape[1], 1, 1).expand(-1, -1, scores.shape[2], 1)
        logits = torch.cat([scores, sink], dim=-1)  # [nKV, rep, T, L+1]
        logits = logits - logits.max(dim=-1, keepdim=True).values
        return F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1]


class MLAttention(nn.Module):
    """DeepSeek's multi-head latent attention; caches the latent and the RoPE key (module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, n = cfg.hidden_size, cfg.n_heads
        self.n_heads, self.rank = n, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.interleave = cfg.rope_interleave
        qk = self.nope + self.rope
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=cfg.qkv_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)  # transformers gives the latent norms eps 1e-6
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, n * qk, bias=False)
        else:
            self.q_proj = nn.Linear(h, n * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.rank + self.rope, bias=cfg.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.rank, n * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(n * self.v_dim, h, bias=cfg.o_bias)
        self.scale = qk**-0.5
        y = cfg.yarn
        if y is not None and y.mscale_all_dim:  # YaRN also sharpens MLA's softmax (transformers' yarn_apply_mscale)
            self.scale *= _yarn_mscale(y.factor, y.mscale_all_dim) ** 2
        self.kv_cache: Tensor | None = None  # [max_len, rank]: the normalised latent
        self.pe_cache: Tensor | None = None  # [max_len, rope]: the rotated RoPE key

    def setup_cache(self, max_len: int, device: torch.device, dtype: torch.dtype, batch: int = 1) -> None:
        self.kv_cache = torch.zeros(batch, max_len, self.rank, device=device, dtype=dtype)
        self.pe_cache = torch.zeros(batch, max_len, self.rope, device=device, dtype=dtype)

    def clear_row(self, row: int) -> None:
        """Zero one sequence's cache row."""
        self.kv_cache[row].zero_()
        self.pe_cache[row].zero_()

    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                rows: int | Tensor = 0) -> Tensor:
        # x [T, H]; cos, sin [T, rope]; mask [T, max_len]
        t, n = x.shape[0], self.n_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_b_proj") else self.q_proj(x)
        q = q.view(t, n, self.nope + self.rope).transpose(0, 1)  # [nH, T, nope+rope]
        q_nope, q_pe = q[..., : self.nope], q[..., self.nope:]  # [nH, T, nope], [nH, T, rope]
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)  # [T, rank], [T, rope]
        latent = self.kv_a_layernorm(latent)  # [T, rank]
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)  # [nH, T, rope]
        k_pe = apply_rope(k_pe[None], cos, sin, self.interleave)[0]  # [T, rope], one key shared by all heads
        w = self.kv_b_proj.weight.view(n, self.nope + self.v_dim, self.rank)  # [nH, nope+v, rank]
        w_k, w_v = w[:, : self.nope], w[:, self.nope:]  # [nH, nope, rank], [nH, v, rank]
        q_lat = torch.matmul(q_nope, w_k)  # [nH, T, rank]: q_nope . (W_k c) == (q_nope W_k) . c
        if isinstance(rows, int):  # every token belongs to sequence ``rows``
            kv_cache, pe_cache = self.kv_cache[rows], self.pe_cache[rows]  # [L, rank], [L, rope] views
            kv_cache.index_copy_(0, input_pos, latent)
            pe_cache.index_copy_(0, input_pos, k_pe)
            scores = (torch.matmul(q_lat, kv_cache.t()) + torch.matmul(q_pe, pe_cache.t())) * self.scale
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # [nH, T, L]
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [nH, T, L]
            out_lat = torch.matmul(probs, kv_cache)  # [nH, T, rank]
        else:  # one token per sequence (a batched decode step): token i is sequence rows[i]'s
            self.kv_cache[rows, input_pos] = latent
            self.pe_cache[rows, input_pos] = k_pe
            # gathered copies, [T, L, rank] and [T, L, rope]: device work, no sync
            kv_all, pe_all = self.kv_cache[rows], self.pe_cache[rows]
            scores = (torch.matmul(q_lat.transpose(0, 1), kv_all.transpose(1, 2))
                      + torch.matmul(q_pe.transpose(0, 1), pe_all.transpose(1, 2))) * self.scale  # [T, nH, L]
            scores = scores.masked_fill(~mask[:, None, :], torch.finfo(scores.dtype).min)
            probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [T, nH, L]
            out_lat = torch.matmul(probs, kv_all).transpose(0, 1)  # [nH, T, rank]
        out = torch.matmul(out_lat, w_v.transpose(1, 2))  # [nH, T, v]
        return self.o_proj(out.transpose(0, 1).reshape(t, n * self.v_dim))  # [T, H]
