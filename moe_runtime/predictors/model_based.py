"""Predictors that read the residual stream, so only the executor can run them.

- ``gate``: layer l+d's own router applied to layer l's residual as it is.
- ``aligned``: layer l+d's router applied to the early-aligned residual
  h' = h_l + U V^T RMSNorm(h_l), an adapter fitted to predict h_{l+d}
  (``adapters.py``). Both sum router probabilities over the step's tokens
  and rank experts by that sum; ``scores`` gives the per-token probabilities
  (what ``moe-runtime eval-predictors`` measures).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MoeError
from .base import PredictContext, Predictor, PredictorOptions


class Gate(Predictor):
    name = "gate"
    needs_hidden = True

    def __init__(self, opts: PredictorOptions) -> None:
        super().__init__(opts)
        if opts.model is None:
            raise MoeError(f"predictor {self.name!r} needs hidden states: it runs only in the executor")

    def residual(self, layer: int, d: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    @torch.no_grad()
    def scores(self, layer: int, d: int, hidden: torch.Tensor) -> torch.Tensor:
        """Per-token router probabilities [N, E] (float32) of layer+d, predicted from hidden [N, H] at layer."""
        h = self.residual(layer, d, hidden)  # [N, H]
        return torch.softmax(self.opts.model.router_logits(layer + d, h).float(), dim=-1)  # [N, E]

    @torch.no_grad()
    def predict(self, ctx: PredictContext) -> list[np.ndarray]:
        out = []
        for d in self.distances(ctx.layer):
            score = self.scores(ctx.layer, d, ctx.hidden).sum(dim=0)  # [E]
            out.append(torch.argsort(score, descending=True, stable=True).cpu().numpy())
        return out


class Aligned(Gate):
    name = "aligned"

    def __init__(self, opts: PredictorOptions) -> None:
        super().__init__(opts)
        if opts.adapters is None:
            raise MoeError("predictor 'aligned' needs adapters: pass --adapters FILE (made by moe-runtime calibrate)")

    def residual(self, layer: int, d: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.opts.adapters.apply(layer, d, hidden)
