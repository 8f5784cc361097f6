"""Predictors that read the residual stream, so only the executor can run them.

- ``gate``: layer l+d's own router applied to layer l's residual as it is.
- ``aligned``: layer l+d's router applied to the early-aligned residual
  h' = h_l + U V^T RMSNorm(h_l), an adapter fitted to predict h_{l+d}
  (``adapters.py``). Both sum router probabilities over the step's tokens
  and rank experts by that sum; ``scores`` gives the per-token probabilities
  (what ``moe-runtime eval-predictors`` measures).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moe_runtime.core.errors import MoeError
from moe_runtime.core.predictors.base import PredictContext, Predictor, PredictorOptions

if TYPE_CHECKING:
    import torch


class Gate(Predictor):
    name = "gate"
    needs_hidden = True

    def __init__(self, opts: PredictorOptions) -> None:
        super().__init__(opts)
        if opts.model is None:
            raise MoeError(f"predictor {self.name!r} needs hidden states: it runs only in the executor")
        import torch
        self.torch = torch

    def residual(self, layer: int, d: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def scores(self, layer: int, d: int, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token router probabilities [N, E] (float32) of layer+d, predicted from hidden [N, H] at layer."""
        with self.torch.no_grad():
            h = self.residual(layer, d, hidden)  # [N, H]
            return self.torch.softmax(self.opts.model.router_logits(layer + d, h).float(), dim=-1)  # [N, E]

    def device_ranking(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """Experts of layers l+1..l+D ranked best first, [D', E] long on the device (no transfer), so the
        caller can fetch them in the one device-to-host transfer of the layer; None past the last layer."""
        torch = self.torch
        dists = self.distances(layer)
        if not dists:
            return None
        with torch.no_grad():
            scores = torch.stack([self.scores(layer, d, hidden).sum(dim=0) for d in dists])  # [D', E]
            return torch.argsort(scores, dim=-1, descending=True, stable=True)  # [D', E]

    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        if ctx.ranked is not None:  # fetched with the layer's expert ids (one transfer)
            return list(ctx.ranked)
        ranked = self.device_ranking(ctx.layer, ctx.hidden)
        # CPU waits on the device here (callers that did not fetch the ranking with the ids)
        return [] if ranked is None else list(ranked.cpu().numpy())


class Aligned(Gate):
    name = "aligned"

    def __init__(self, opts: PredictorOptions) -> None:
        super().__init__(opts)
        if opts.adapters is None:
            raise MoeError("predictor 'aligned' needs adapters: pass --adapters FILE (made by moe-runtime calibrate)")
        # once, here, in place (the adapters object given is moved and cast: reload it to save it in
        # float32): a cast and a host-to-device copy per prediction would cost every layer (and could
        # not be captured in a CUDA graph)
        opts.adapters.to(opts.model.device, opts.model.dtype)

    def residual(self, layer: int, d: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.opts.adapters.apply(layer, d, hidden)
