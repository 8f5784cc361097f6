"""At most one device-to-host transfer per MoE layer: the routed ids, fetched together with every
distance of a router-based predictor's rankings (counted as the host reads of device tensors:
``tolist``, ``item``, ``cpu``, ``numpy``, truth values)."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from moe_runtime.model.checkpoint import load_model
from moe_runtime.model.experts import ResidentExperts
from moe_runtime.model.generate import generate
from moe_runtime.offload.provider import OffloadedExperts
from moe_runtime.predictors import PredictorOptions, make_predictor

READS = {"tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__"}


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values by the host, by kind."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("predictor,lookahead", [("none", 1), ("gate", 3), ("gate", 1)])
def test_one_host_read_per_moe_layer(mixtral4, predictor, lookahead):
    model, store = load_model(mixtral4)
    L, E, K = store.n_moe_layers, store.n_experts, store.top_k
    pred = make_predictor(predictor, PredictorOptions(n_moe_layers=L, n_experts=E, top_k=K, lookahead=lookahead,
                                                      model=model))
    prov = OffloadedExperts(store, "cpu", L * E, predictor=pred)
    ref = generate(model, ResidentExperts(store, "cpu"), [3, 4, 5], 6).token_ids
    prov.begin_step(0, 3)  # prefill outside the count
    model.setup_cache(16)
    model(torch.tensor([3, 4, 5]), torch.arange(3), prov)
    reads = HostReads()
    prov.begin_step(3, 1)
    with reads:
        model(torch.tensor([ref[0]]), torch.tensor([3]), prov, last_only=True)
    prov.finish()
    assert reads.count == L  # one per MoE layer, whatever the lookahead
