"""The replay's inputs: a checked (trace, model spec) pair, and the trace cut into steps.

``load_inputs`` is the one place that turns a trace path, a model name/file/
checkpoint directory and a token count into a checked (trace, ModelSpec);
``build_workload`` cuts a trace into steps of B tokens (continuous batching).
Nothing here knows about simpy, policies or the command line.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_runtime.core import config_files
from moe_runtime.core.errors import MoeError
from moe_runtime.core.format_sizes import CODECS
from moe_runtime.core.shapes import ModelSpec, available_models, load_model_spec
from moe_runtime.traces import load_trace


def _model_from_meta(name, trace_path) -> str:
    """The trace's ``meta.model`` (data, not a flag): a bundled model name, or a file or checkpoint folder
    inside the trace's own folder (``config_files.name_inside``); anything else asks for --model."""
    if isinstance(name, str) and name in available_models():
        return name
    try:
        config_files.name_inside(name, "the trace's meta.model")
    except MoeError as e:
        raise MoeError(f"{e}: pass --model NAME|FILE|DIR") from None
    return str(Path(config_files.bundled(trace_path)).parent / name)


def load_inputs(trace_path, model: str | None = None, tokens: int | None = None):
    """Load the trace (its first ``tokens``) and the model spec; check that they describe one model.

    ``model``: a configs/models name, a YAML file, or a checkpoint directory with config.json;
    by default the trace's ``meta.model`` when it names one of those.
    """
    trace = load_trace(config_files.bundled(trace_path))
    if tokens is not None and tokens < trace.n_tokens:
        trace = trace.slice(0, tokens)
    name = model or _model_from_meta(trace.meta.model, trace_path)
    if (Path(name) / "config.json").is_file():
        try:
            cfg = json.loads((Path(name) / "config.json").read_text())
        except ValueError as e:
            raise MoeError(f"{name}/config.json: not valid JSON ({e})") from None
        spec = ModelSpec.from_hf_config(cfg, name=Path(name).name)
    elif model is None and name not in available_models() and not Path(name).is_file():
        raise MoeError(f"the trace's model {trace.meta.model!r} is not in configs/models "
                       f"({', '.join(available_models())}): pass --model NAME|FILE|DIR")
    else:
        spec = load_model_spec(name)
    m = trace.meta
    for what, a, b in (("MoE layers", spec.n_moe_layers, m.n_layers), ("experts", spec.n_experts, m.n_experts),
                       ("top-k", spec.top_k, m.top_k)):
        if a != b:
            raise MoeError(f"model {spec.name} has {a} {what} but the trace {trace_path} has {b}")
    # the trace records the bytes its own run moved: compare in the format it names (a bf16 trace replays int4)
    recorded = spec.with_expert_dtype(m.dtype) if m.dtype in CODECS else spec
    if m.expert_bytes and m.expert_bytes != recorded.expert_bytes:
        raise MoeError(f"model {spec.name} has experts of {recorded.expert_bytes:,} bytes ({m.dtype}) but the "
                       f"trace records {m.expert_bytes:,}")
    return trace, spec


@dataclass(frozen=True)
class Workload:
    """The trace cut into steps: ids[s][l] = experts step s needs at layer l (the union)."""

    ids: list  # [S][L] lists of ints
    first_token: np.ndarray  # [S] trace index of each step's first token
    n_tokens: np.ndarray  # [S]
    ctx_sum: np.ndarray  # [S] summed context lengths (position + 1)
    n_unique: np.ndarray  # [S, L]
    counts: list | None = None  # [S][L] tokens routed to each of ids[s][l] (None: one each, batch 1)

    @property
    def experts_per_layer(self) -> int:
        return int(self.n_unique.max())


def build_workload(trace, batch: int) -> Workload:
    """Cut ``trace`` into steps of up to ``batch`` tokens (continuous batching over its sequences)."""
    ids_all = trace.expert_ids
    ctx = trace.position.astype(np.int64) + 1
    if batch == 1:
        T, L, K = ids_all.shape
        return Workload(ids_all.tolist(), np.arange(T), np.ones(T, np.int64), ctx, np.full((T, L), K))
    queue = deque(trace.sequences())
    lanes: list = [None] * batch  # [next token, stop] per lane
    steps = []
    while True:
        for i in range(batch):
            if (lanes[i] is None or lanes[i][0] >= lanes[i][1]) and queue:
                _, a, b = queue.popleft()
                lanes[i] = [a, b]
        toks = [ln[0] for ln in lanes if ln is not None and ln[0] < ln[1]]
        if not toks:
            break
        for ln in lanes:
            if ln is not None and ln[0] < ln[1]:
                ln[0] += 1
        steps.append(toks)
    per_tok = ids_all.tolist()
    tallies = [[Counter(e for t in toks for e in per_tok[t][l]) for l in range(trace.n_layers)] for toks in steps]
    ids = [[list(c) for c in row] for row in tallies]  # a Counter keeps first appearance order
    counts = [[list(c.values()) for c in row] for row in tallies]
    return Workload(ids, np.array([s[0] for s in steps]), np.array([len(s) for s in steps]),
                    np.array([int(ctx[s].sum()) for s in steps]),
                    np.array([[len(x) for x in row] for row in ids]), counts)
