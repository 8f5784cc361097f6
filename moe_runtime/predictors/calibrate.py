"""Calibrate early-aligned residual adapters: `moe-runtime calibrate`, and loading them for a model.

Contract:

- ``HiddenCapture(inner)`` is an expert provider that records the residual
  entering each MoE block (``hidden`` [T, H]) of the current forward and asks
  ``inner`` (any provider: all-resident or offloaded) for the experts, so the
  forward's outputs are the inner provider's. ``forward_chunks`` runs the model
  over token chunks (each an independent sequence from position 0) and yields
  the T x n_moe_layers residuals of one chunk at a time. The command
  (``cli/predictors.py``) hands it all-resident experts when they fit on the
  device, else an offloading cache, so a checkpoint larger than the GPU
  calibrates with host memory = the expert store + the below.
- ``calibrate(model, provider, chunks, lookahead, rank, ...)`` STREAMS: per
  chunk, for every (l, d) with 1 <= d <= lookahead and l + d < n_moe_layers it adds
  (RMSNorm(h_l), h_{l+d} - h_l) to one ``RidgeAccumulator`` and drops the
  chunk's hidden states. Memory is the accumulators (pairs x 3 x H^2 float64,
  on the host), one chunk's residuals, and a bounded reservoir sample of
  ``refine_samples`` tokens' residuals (all layers) for the optional KL
  refinement (``refine_kl`` against ``model.router_logits(l+d, .)``). Then it
  solves reduced-rank ridge per pair. Same data, same seed -> same adapters.
- ``save_adapters`` writes them with ``model_fingerprint(model.cfg)`` (shape)
  and, in the metadata, ``router_digest(model)`` (the routers' weights rounded
  to bfloat16, so the checkpoint's dtype does not matter) plus D, r, ridge,
  token count and per-pair explained variance.
- ``load_adapters_for(model_or_dir_or_config, path, lookahead)`` is what every
  user of adapters calls: it rejects another model's adapters (fingerprint;
  with a loaded ``Transformer`` also the router digest) and a file fitted for a
  smaller lookahead, with a one-line ``MoeError``.

This module knows nothing of predictor scoring (predictors/model_based.py) or
of the adapter file layout (predictors/adapters.py).
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from moe_runtime.core.model_config import ModelConfig, load_config
from moe_runtime.core.errors import MoeError
from moe_runtime.model.experts import ExpertProvider, ExpertWeights
from moe_runtime.model.transformer import Transformer
from moe_runtime.predictors.adapters import AlignedAdapters, RidgeAccumulator, model_fingerprint, refine_kl, rms_normalize



class HiddenCapture(ExpertProvider):
    """Provider wrapper: ``hidden[l]`` is the residual [T, H] entering MoE layer l in the last forward."""

    def __init__(self, inner: ExpertProvider, n_moe_layers: int):
        self.inner = inner
        self.hidden: list[Tensor | None] = [None] * n_moe_layers

    def begin_step(self, start: int, n: int, future=None, token: int | None = None) -> None:
        self.inner.begin_step(start, n, future, token)

    def prepare(self, layer: int, hidden: Tensor) -> Tensor | None:
        return self.inner.prepare(layer, hidden)

    def capacity(self, layer: int) -> int:
        return self.inner.capacity(layer)

    def experts(self, layer: int, ids: list[int], hidden: Tensor, rankings: list[list[int]] | None = None,
                counts: list[int] | None = None) -> dict[int, ExpertWeights]:
        self.hidden[layer] = hidden  # the model never writes into it (h = h + ... makes a new tensor)
        return self.inner.experts(layer, ids, hidden, rankings, counts)

    def on_host(self, layer: int) -> tuple[int, ...]:
        return self.inner.on_host(layer)

    def may_host(self, layer: int) -> bool:
        return self.inner.may_host(layer)

    @property
    def host_format(self):
        return self.inner.host_format

    def end_layer(self, layer: int) -> None:
        self.inner.end_layer(layer)


@torch.no_grad()
def forward_chunks(model: Transformer, provider: ExpertProvider, chunks: Sequence[np.ndarray],
                   progress: bool = False, desc: str = "") -> Iterator[tuple[np.ndarray, list[Tensor]]]:
    """Run each chunk as one sequence; yield (chunk ids, residuals entering each MoE block, [T, H] each)."""
    n_moe_layers = model.cfg.n_moe_layers
    capture = HiddenCapture(provider, n_moe_layers)
    longest = max(len(c) for c in chunks)
    if model.max_len < longest:
        model.setup_cache(longest)
    from tqdm import tqdm

    bar = tqdm(total=sum(len(c) for c in chunks), unit="tok", desc=desc, disable=not progress, file=sys.stderr)
    for chunk in chunks:
        tokens = torch.as_tensor(chunk, dtype=torch.long, device=model.device)  # [T]
        pos = torch.arange(len(chunk), device=model.device)  # [T]
        capture.hidden = [None] * n_moe_layers
        provider.begin_step(0, len(chunk))  # an offloading provider opens a step per forward
        model(tokens, pos, capture, last_only=True)  # logits unused; the residuals are what we want
        hidden = capture.hidden
        capture.hidden = [None] * n_moe_layers
        yield chunk, hidden
        bar.update(len(chunk))
    bar.close()


class Reservoir:
    """A uniform sample of at most ``size`` token rows [n_moe_layers, H] (algorithm R, seeded), kept on the host."""

    def __init__(self, size: int, seed: int):
        self.size, self.seen = size, 0
        self.rng = np.random.default_rng(seed)
        self.rows: Tensor | None = None  # [size, n_moe_layers, H]
        self.filled = 0

    def add(self, hidden: list[Tensor]) -> None:
        if self.size <= 0:
            return
        stacked = torch.stack(hidden, dim=1).cpu()  # [T, n_moe_layers, H]
        if self.rows is None:
            self.rows = torch.empty(self.size, *stacked.shape[1:], dtype=stacked.dtype)
        for t in range(stacked.shape[0]):
            if self.filled < self.size:
                slot = self.filled
                self.filled += 1
            else:
                slot = int(self.rng.integers(0, self.seen + 1))
            if slot < self.size:
                self.rows[slot] = stacked[t]
            self.seen += 1

    def sample(self) -> Tensor:
        return self.rows[: self.filled]


@dataclass
class Calibration:
    adapters: AlignedAdapters
    tokens: int
    explained: dict[tuple[int, int], float] = field(default_factory=dict)  # fraction of sum (h_{l+d}-h_l)^2
    heldout_tokens: int = 0
    recall: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)  # held out: (gate, fitted)
    fallback: list[tuple[int, int]] = field(default_factory=list)  # pairs kept at zero (the plain gate)
    kl: dict[tuple[int, int], list[float]] = field(default_factory=dict)  # [before, after] refinement


def calibrate(model: Transformer, provider: ExpertProvider, chunks: Sequence[np.ndarray], lookahead: int, rank: int,
              ridge: float = 1e-3, refine_steps: int = 0, refine_samples: int = 2048, refine_lr: float = 1e-3,
              seed: int = 0, progress: bool = False, holdout: float = 0.25) -> Calibration:
    """Fit adapters for every (l, d) on the chunks but the last ``holdout`` share, then validate each on
    those: a pair whose fitted adapter does not beat the plain gate's top-k recall there is set to zero
    (h' = h, exactly the gate), so ``aligned`` never predicts worse than ``gate`` on the held-out split."""
    cfg = model.cfg
    L, H = cfg.n_moe_layers, cfg.hidden_size
    if not isinstance(lookahead, int) or not 1 <= lookahead < L:
        raise MoeError(f"--lookahead must be in 1..{L - 1} for a model with {L} MoE layers, got {lookahead}")
    if not isinstance(rank, int) or not 1 <= rank <= H:
        raise MoeError(f"--rank must be in 1..{H} (the hidden size), got {rank}")
    if not ridge >= 0:
        raise MoeError(f"--ridge must be >= 0, got {ridge}")
    if refine_steps < 0:
        raise MoeError(f"--refine-steps must be >= 0, got {refine_steps}")
    if not chunks:
        raise MoeError("no calibration tokens")
    if not 0.0 <= holdout < 1.0:
        raise MoeError(f"--holdout must be in [0, 1), got {holdout}")
    n_all = sum(len(c) for c in chunks)
    if holdout > 0 and len(chunks) < 2:  # nothing held out would validate nothing, yet report a fit
        raise MoeError(f"calibration with --holdout {holdout:g} needs at least 2 chunks of --seq-len tokens (one "
                       f"fitted, one held out): more tokens than --seq-len; the {n_all} given make 1 chunk")
    n_held = min(len(chunks) - 1, max(1, round(holdout * len(chunks)))) if holdout > 0 and len(chunks) > 1 else 0
    chunks, held = list(chunks[: len(chunks) - n_held]), list(chunks[len(chunks) - n_held:])
    n_fit = sum(len(c) for c in chunks)
    if n_fit <= 2 * rank:  # fewer tokens than unknowns per direction: any rank-R fit "explains" them all
        raise MoeError(f"fitting rank-{rank} adapters needs more than {2 * rank} tokens in the fitted chunks, got "
                       f"{n_fit} (give more tokens, or a smaller --rank or --holdout)")
    adapters = AlignedAdapters(L, H, lookahead, rank)
    if progress:
        print(f"{sum(len(c) for c in chunks)} tokens in {len(chunks)} chunks; {len(adapters.pairs())} adapters; "
              f"ridge statistics {len(adapters.pairs()) * 3 * H * H * 8 / 2**30:.2f} GiB on the host", file=sys.stderr)
    accs = {pair: RidgeAccumulator(H) for pair in adapters.pairs()}
    reservoir = Reservoir(refine_samples if refine_steps > 0 else 0, seed)
    n_tokens = 0
    for chunk, hidden in forward_chunks(model, provider, chunks, progress, "calibrate"):
        x = [rms_normalize(h.float(), adapters.eps) for h in hidden]  # [T, H] each, float32
        for (l, d), acc in accs.items():
            acc.add(x[l], hidden[l + d].float() - hidden[l].float())
        reservoir.add(hidden)
        n_tokens += len(chunk)
    result = Calibration(adapters, n_tokens)
    for (l, d), acc in accs.items():
        U, V = acc.solve(rank, ridge)
        result.explained[(l, d)] = acc.explained(U, V)
        adapters.set(l, d, U, V)
    del accs
    if refine_steps > 0:
        _refine(model, adapters, reservoir.sample(), refine_steps, refine_lr, result, progress)
    if held:
        _validate(model, provider, adapters, held, result, progress)
    return result


@torch.no_grad()
def _validate(model: Transformer, provider: ExpertProvider, adapters: AlignedAdapters, held: Sequence[np.ndarray],
              result: Calibration, progress: bool) -> None:
    """Top-k recall of gate and fitted adapter per pair on held-out chunks; zero the pairs not better."""
    k = model.cfg.top_k
    hits = {pair: [0, 0] for pair in adapters.pairs()}  # (gate, fitted) true experts among the top-k
    n = 0
    for chunk, hidden in forward_chunks(model, provider, held, progress, "validate"):
        truth = [model.route(m, model.router_logits(m, h))[0] for m, h in enumerate(hidden)]  # [T, k] each
        for (l, d), c in hits.items():
            true = truth[l + d]
            for i, h in enumerate((hidden[l], adapters.apply(l, d, hidden[l]))):
                top = torch.topk(model.router_logits(l + d, h).float(), k, dim=-1).indices  # [T, k]
                c[i] += int((top.unsqueeze(-1) == true.unsqueeze(-2)).any(-1).sum())
        n += len(chunk)
    result.heldout_tokens = n
    for (l, d), (gate, fitted) in hits.items():
        result.recall[(l, d)] = (gate / (n * k), fitted / (n * k))
        if fitted <= gate:
            result.fallback.append((l, d))
            zero = torch.zeros_like(adapters.U[(l, d)])
            adapters.set(l, d, zero, torch.zeros_like(adapters.V[(l, d)]))


def _refine(model: Transformer, adapters: AlignedAdapters, sample: Tensor, steps: int, lr: float,
            result: Calibration, progress: bool, batch: int = 256) -> None:
    """KL-refine every pair on the reservoir sample [n, L, H] against layer l+d's router."""
    from tqdm import tqdm

    dev, dt = model.device, model.dtype
    for l, d in tqdm(adapters.pairs(), desc="refine", disable=not progress, file=sys.stderr):
        batches = [(sample[i:i + batch, l].to(dev), sample[i:i + batch, l + d].to(dev))
                   for i in range(0, sample.shape[0], batch)]

        def router(h: Tensor, m: int = l + d) -> Tensor:
            return model.router_logits(m, h.to(dt)).float()  # [n, E]

        U, V, kl = refine_kl((adapters.U[(l, d)].to(dev), adapters.V[(l, d)].to(dev)), batches, router,
                             steps=steps, lr=lr, eps=adapters.eps)
        adapters.set(l, d, U, V)
        result.kl[(l, d)] = kl


# -- fingerprints and loading --

def router_digest(model: Transformer) -> str:
    """sha256 (16 hex) of every MoE router's weights rounded to bfloat16 (same for float32/bfloat16 loads)."""
    h = hashlib.sha256()
    for m in range(model.cfg.n_moe_layers):
        w = model.layers[model.moe_layers[m]].mlp.gate.weight
        h.update(w.detach().to("cpu", torch.bfloat16).float().numpy().tobytes())
    return h.hexdigest()[:16]


def save_adapters(cal: Calibration, model: Transformer, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Atomically write ``cal.adapters`` with the model's fingerprint and router digest (see module docstring)."""
    meta = {"router_digest": router_digest(model), "tokens": cal.tokens, "heldout_tokens": cal.heldout_tokens,
            "fallback": [f"{l}.{d}" for l, d in cal.fallback],
            "heldout_recall": {f"{l}.{d}": [round(g, 6), round(a, 6)] for (l, d), (g, a) in cal.recall.items()},
            "explained": {f"{l}.{d}": round(v, 6) for (l, d), v in cal.explained.items()},
            "kl": {f"{l}.{d}": [round(x, 6) for x in v] for (l, d), v in cal.kl.items()}, **(extra or {})}
    cal.adapters.save(str(path), model_fingerprint(model.cfg), meta)


def load_adapters_for(model: Transformer | ModelConfig | str | Path | dict, path: str | Path,
                      lookahead: int) -> AlignedAdapters:
    """Adapters at ``path`` if fitted for this model with lookahead >= ``lookahead``; else MoeError.

    ``model``: a loaded ``Transformer`` (shape and router weights are checked),
    or a checkpoint directory, ``ModelConfig`` or config dict (shape only).
    """
    if isinstance(model, (str, Path)):
        cfg: Any = load_config(model)
    elif isinstance(model, Transformer):
        cfg = model.cfg
    else:
        cfg = model
    adapters = AlignedAdapters.load(str(path), model_fingerprint(cfg), lookahead)
    if isinstance(model, Transformer):
        want, got = router_digest(model), adapters.metadata.get("router_digest")
        if got is not None and got != want:
            raise MoeError(f"{path} was fitted for a model of this shape with other router weights "
                           f"(router digest {got}, this model {want}); recalibrate")
    return adapters
