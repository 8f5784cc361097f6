"""Host-resident experts and the provider interface the model's MoE blocks ask for expert weights.

Contract:

- ``ExpertLayout`` (= ``formats.ExpertFormat``) is the format of one expert:
  one flat 1-D buffer per expert (plain: w1 (gate proj, [I, H]), then w3 (up
  proj, [I, H]), then w2 (down proj, [H, I]); quantized: a byte buffer);
  ``layout.views(flat)`` slices it without copying, ``layout.forward`` computes.
- ``HostExpertStore`` holds every expert of every MoE layer in host memory
  (pinned when CUDA is available), one flat contiguous buffer per
  (moe_layer, expert). MoE layers are numbered 0..n_moe_layers-1 over the MoE
  layers only; ``model_layers[m]`` is the model layer index of MoE layer m.
- An expert provider (``ExpertProvider``) is the one interface between a MoE
  block and wherever its experts live; every call the block makes is declared
  there. Per forward, the runner opens a step (``begin_step(start, n)``); per
  MoE layer the block calls ``prepare(layer, hidden)`` (device work before the
  host reads the ids, e.g. a predictor's rankings), then, once the host holds
  the ids, ``experts(layer, ids, hidden, rankings, counts)`` -> ``{id: weights}``
  with weights on the compute device (views of the provider's memory, read in
  place), valid until ``end_layer(layer)``, except the ids ``on_host(layer)``
  names: those are host views that the block computes on the host (hybrid
  execution; on a CPU run the host is the device). ``ids`` are unique experts, at most
  ``capacity(layer)`` of them: a layer whose union is larger asks in waves
  (ascending ids, one ``experts``/``end_layer`` pair each). ``hidden`` is the
  residual stream entering the layer's MoE block ([N, H], before
  post_attention_layernorm), so a prefetcher can predict later layers from it.
- ``ResidentExperts`` is the all-resident reference provider: every expert is
  copied to the device once.

This module does not read checkpoints (see checkpoint.py) and has no cache or
eviction policy; a cache is another provider behind the same interface.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from moe_runtime.model.formats import DenseExpert, ExpertFormat, ExpertWeights  # noqa: F401  (re-exported)


# An expert's layout is its format (formats.py): ``ExpertLayout(H, I, dtype)`` is the plain SwiGLU
# w1 | w3 | w2 buffer; quantized and biased formats are ExpertFormat(..., codec=...).
ExpertLayout = ExpertFormat


class HostExpertStore:
    """Every expert of every MoE layer, one flat host buffer each (pinned when CUDA is available).

    Each MoE layer is one [n_experts, numel] allocation so pinning costs one call
    per layer; ``flat(layer, expert)`` is a contiguous 1-D row of it.
    """

    def __init__(self, layout: ExpertLayout, n_experts: int, top_k: int, model_layers: list[int] | tuple[int, ...],
                 pin: bool | None = None, allocate: bool = True):
        """``allocate=False``: a store that describes the experts but holds none (they stay on storage)."""
        self.layout = layout
        self.n_experts = n_experts
        self.top_k = top_k
        self.model_layers: tuple[int, ...] = tuple(model_layers)  # moe layer index -> model layer index
        self.pinned = torch.cuda.is_available() if pin is None else pin
        self._buffers = [
            torch.empty(n_experts, layout.numel, dtype=layout.dtype, pin_memory=self.pinned)  # [E, numel]
            for _ in self.model_layers
        ] if allocate else []

    @property
    def n_moe_layers(self) -> int:
        """Number of MoE layers (dense layers excluded)."""
        return len(self.model_layers)

    @property
    def holds_experts(self) -> bool:
        """False for a store that describes experts kept on storage (``allocate=False``)."""
        return bool(self._buffers)

    @property
    def nbytes(self) -> int:
        return self.n_moe_layers * self.n_experts * self.layout.nbytes

    def moe_index(self, model_layer: int) -> int:
        """MoE-layer index of a model layer; ValueError if that layer is dense."""
        return self.model_layers.index(model_layer)

    def flat(self, layer: int, expert: int) -> Tensor:
        """The flat [numel] host buffer of one expert of MoE layer ``layer``."""
        return self._buffers[layer][expert]

    def layer_buffer(self, layer: int) -> Tensor:
        """All experts of one MoE layer as one [n_experts, numel] host tensor."""
        return self._buffers[layer]

    def weights(self, layer: int, expert: int):
        """Host views of one expert's pieces (``ExpertWeights`` (w1, w3, w2) for a plain format)."""
        return self.layout.views(self._buffers[layer][expert])

    @torch.no_grad()
    def converted(self, layout: ExpertLayout) -> "HostExpertStore":
        """A second store with every expert in ``layout`` (``--host-dtype``: the host's own copy), converted
        from this one expert by expert (dense in the compute dtype, then packed: quantized where it asks)."""
        out = HostExpertStore(layout, self.n_experts, self.top_k, self.model_layers, pin=False)
        for m in range(self.n_moe_layers):
            for e in range(self.n_experts):
                layout.pack(out.flat(m, e), DenseExpert(*self.layout.dense(self.weights(m, e))))
        return out


class ExpertProvider(abc.ABC):
    """What a MoE block asks of wherever its experts live; see the module docstring for the contract.
    Defaults are the all-resident answers (no steps, no prediction, every expert at once)."""

    def begin_step(self, start: int, n: int, future=None, token: int | None = None) -> None:
        """A forward over positions start..start+n-1 begins (called by the runner, not the block)."""

    def prepare(self, layer: int, hidden: Tensor) -> Tensor | None:
        """Device work before the host reads the layer's ids (fetched with them in one transfer), or None."""
        return None

    @abc.abstractmethod
    def capacity(self, layer: int) -> int:
        """The most distinct experts one ``experts`` call may hold at ``layer``."""

    @abc.abstractmethod
    def experts(self, layer: int, ids: list[int], hidden: Tensor, rankings: list[list[int]] | None = None,
                counts: list[int] | None = None) -> dict[int, ExpertWeights]:
        """Weights (views, read in place) of ``ids`` at ``layer``, valid until ``end_layer``: on the device,
        except the ``on_host`` ones (host views). ``counts``: each id's tokens (the miss policy's cost rule)."""

    def on_host(self, layer: int) -> tuple[int, ...]:
        """The ids of the last ``experts`` call at ``layer`` to compute on the host (hybrid execution)."""
        return ()

    def may_host(self, layer: int) -> bool:
        """Whether any ``experts`` call at ``layer`` may send experts to the host (its miss policy is not
        copy-only, or the layer is a host layer)."""
        return False

    @property
    def host_format(self) -> ExpertFormat | None:
        """The format of the host copies the ``on_host`` experts are computed from, when it is not the
        model's (``--host-dtype``); None: the model's."""
        return None

    def end_layer(self, layer: int) -> None:
        """The layer's reads of the returned weights are enqueued: their slots may be reused after them."""


class ResidentExperts(ExpertProvider):
    """The all-resident provider: every expert copied once to ``device``; nothing moves afterwards."""

    def __init__(self, store: HostExpertStore, device: torch.device | str):
        self.store = store
        self.device = torch.device(device)
        self._buffers = [store.layer_buffer(m).to(self.device) for m in range(store.n_moe_layers)]  # [E, numel] each
        # views built once, so a step does no per-expert slicing
        self._views = [[store.layout.views(buf[e]) for e in range(store.n_experts)] for buf in self._buffers]

    def capacity(self, layer: int) -> int:
        return self.store.n_experts

    def experts(self, layer: int, ids: list[int], hidden: Tensor, rankings: list[list[int]] | None = None,
                counts: list[int] | None = None) -> dict[int, ExpertWeights]:
        views = self._views[layer]
        return {e: views[e] for e in ids}
