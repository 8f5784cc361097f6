"""The decode loop: one prefill forward over the prompt, then one token per step; sampling; tokenizer.

Contract: ``generate(model, provider, prompt_ids, max_new_tokens, temperature,
top_p, seed, eos_ids, on_step=None) -> GenerationResult``; given a list of
prompts, a static batch (``generate_batch``) -> ``BatchResult``. One decode
loop serves both: a single prompt is a batch of one.

- The KV cache is preallocated for len(prompt) + max_new_tokens positions;
  each decode step is a forward of one token with fixed shapes.
- temperature 0 is greedy (argmax); otherwise softmax(logits / temperature),
  restricted to the smallest top-p nucleus, sampled with a generator seeded
  by ``seed``.
- Generation stops after max_new_tokens or right after a token in
  ``eos_ids`` (that token is included in the result, as transformers does).
- ``on_step(step, token_id)`` is called after each step: step 0 is the prefill
  (which yields the first token), step s >= 1 the s-th decode step. Any
  provider (all-resident or an offloading cache) can be passed in.
- Logits that become non-finite (NaN, +inf, or all -inf) stop the decode
  with a MoeError naming the step: sampling from them would print garbage.
- Timings bracket device work with a synchronisation so they measure work
  done, not work queued.

The tokenizer helpers wrap ``tokenizers.Tokenizer.from_file(tokenizer.json)``;
this module knows nothing of checkpoints' files beyond that.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from moe_runtime.core.config_files import short
from moe_runtime.core.errors import MoeError
from moe_runtime.model.experts import ExpertProvider
from moe_runtime.model.graphs import GraphedDecoder
from moe_runtime.model.transformer import Transformer


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated tokens only
    prefill_s: float  # prompt forward, including the first token
    decode_s: float  # every later step
    prompt_len: int = 0
    stopped_at_eos: bool = False
    step_s: list[float] = field(default_factory=list)  # wall time of each decode step

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens after the first over decode time (0 when there were none)."""
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def _sync(device: torch.device) -> None:
    # CPU waits on the GPU here so that the timers measure finished work
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> Tensor:
    """Next token from logits [V]: argmax at temperature 0, else nucleus sampling. Returns a 0-d long tensor."""
    if temperature <= 0:
        return torch.argmax(logits)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)  # [V]
        # drop a token when the tokens before it already reach top_p (the first one is always kept)
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        return order[torch.multinomial(sorted_p, 1, generator=generator)[0]]
    return torch.multinomial(probs, 1, generator=generator)[0]


def finite(logits: Tensor, step: int) -> Tensor:
    """``logits`` [V], after one max-reduction (NaN propagates through max, so it finds NaN, +inf, all -inf)."""
    m = float(logits.max())  # CPU waits for one scalar; the token's own sync follows right after
    if not math.isfinite(m):
        raise MoeError(f"the model's logits became non-finite ({m}) at "
                       f"{'the prefill' if step == 0 else f'decode step {step}'}; its weights or activations "
                       "hold NaN or inf")
    return logits


@dataclass
class BatchResult:
    """A static batch: one GenerationResult per prompt (each with the batch's shared timings)."""

    sequences: list[GenerationResult]
    prefill_s: float  # every prompt's forward, one after the other
    decode_s: float  # the batched steps

    @property
    def tokens_per_s(self) -> float:
        """Every sequence's tokens after its first, over the decode time (0 when there were none)."""
        n = sum(len(s.token_ids) - 1 for s in self.sequences)
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def _check(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
           top_p: float) -> None:
    if len(prompts) == 0:
        raise MoeError("no prompt: give at least one")
    if any(len(p) == 0 for p in prompts):
        raise MoeError("empty prompt: give at least one token")
    if max_new_tokens < 1:
        raise MoeError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise MoeError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0:
        raise MoeError(f"temperature must be >= 0, got {temperature}")
    vocab = model.cfg.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise MoeError(f"prompt token id {bad[0]} outside the vocabulary (size {vocab})")


@torch.inference_mode()
def generate(model: Transformer, provider: ExpertProvider, prompt_ids: Sequence[int] | Sequence[Sequence[int]],
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
             eos_ids: Sequence[int] = (), on_step: Callable[[int, int], None] | None = None,
             cuda_graphs: bool = False):
    """Decode up to ``max_new_tokens`` tokens after ``prompt_ids``; see the module docstring.

    A list of ints is one prompt (-> GenerationResult); a list of lists is a static batch (-> BatchResult,
    see ``generate_batch``; ``on_step`` then gets (step, sequence, token)). ``cuda_graphs``: decode steps
    after the first replay CUDA graphs (graphs.py; on CPU the same segments run eagerly)."""
    first = prompt_ids[0] if len(prompt_ids) else 0
    if isinstance(first, (list, tuple)) or getattr(first, "ndim", 0) > 0:  # a list of prompts, not of ids
        return generate_batch(model, provider, prompt_ids, max_new_tokens, temperature, top_p, seed, eos_ids,
                              on_step, cuda_graphs)
    step = None if on_step is None else (lambda s, b, tok: on_step(s, tok))
    return _decode(model, provider, [prompt_ids], max_new_tokens, temperature, top_p, seed, eos_ids, step,
                   cuda_graphs, single=True).sequences[0]


def _generator(device: torch.device, temperature: float, seed: int | None) -> torch.Generator | None:
    if temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(0 if seed is None else seed)
    return generator


@torch.inference_mode()
def generate_batch(model: Transformer, provider: ExpertProvider, prompts: Sequence[Sequence[int]],
                   max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                   eos_ids: Sequence[int] = (), on_step: Callable[[int, int, int], None] | None = None,
                   cuda_graphs: bool = False) -> BatchResult:
    """Decode the prompts together as one static batch -> BatchResult.

    Each prompt is prefilled alone (its own KV-cache row); then every decode step is one forward of one
    token per sequence still running, so each MoE layer fetches the union of the batch's experts. A
    sequence stops at EOS or ``max_new_tokens``; no new one takes its place. Sampling draws from one
    generator per sequence, seeded with ``seed`` (a sequence samples as it would decoding alone).
    ``on_step(step, sequence, token)``: step 0 is the sequence's prefill.
    """
    return _decode(model, provider, prompts, max_new_tokens, temperature, top_p, seed, eos_ids, on_step,
                   cuda_graphs, single=False)


def _decode(model: Transformer, provider: ExpertProvider, prompts: Sequence[Sequence[int]], max_new_tokens: int,
            temperature: float, top_p: float, seed: int | None, eos_ids: Sequence[int],
            on_step: Callable[[int, int, int], None] | None, cuda_graphs: bool, single: bool) -> BatchResult:
    """The one decode loop. ``single``: one prompt decoded alone, its steps addressed by its row index (an
    int: attention then reads its own cache row as a view, as a prefill does) rather than a list of rows."""
    _check(model, prompts, max_new_tokens, temperature, top_p)
    device = model.device
    prompts = [[int(t) for t in p] for p in prompts]  # lists, tuples, arrays or tensors of ids alike
    lens = [len(p) for p in prompts]
    model.setup_cache(max(lens) + max_new_tokens, batch=len(prompts))
    gens = [_generator(device, temperature, seed) for _ in prompts]
    eos = set(eos_ids)
    graphed = GraphedDecoder(model, provider) if cuda_graphs else None
    outs: list[list[int]] = []

    _sync(device)
    t0 = time.perf_counter()
    for b, p in enumerate(prompts):
        tokens = torch.tensor(list(p), dtype=torch.long, device=device)  # [T]
        logits = model(tokens, torch.arange(len(p), device=device), provider, last_only=True, rows=b)  # [1, V]
        outs.append([int(sample(finite(logits[0], 0), temperature, top_p, gens[b]))])  # CPU waits for it
        if on_step is not None:
            on_step(0, b, outs[b][0])
    prefill_s = time.perf_counter() - t0

    step_s: list[float] = []
    t1 = time.perf_counter()
    active = [b for b in range(len(prompts)) if outs[b][-1] not in eos and max_new_tokens > 1]
    while active:
        ts = time.perf_counter()
        # the step's tokens and positions: two small uploads per step (the tokens were read back anyway)
        cur = torch.tensor([outs[b][-1] for b in active], dtype=torch.long, device=device)  # [A]
        pos = torch.tensor([lens[b] + len(outs[b]) - 1 for b in active], dtype=torch.long, device=device)  # [A]
        rows = active[0] if single else active
        if graphed is not None and step_s:  # after one eager step; captured again when ``active`` shrinks
            logits = graphed(cur, pos, rows, lens[active[0]] + len(outs[active[0]]) - 1)
        else:
            logits = model(cur, pos, provider, rows=rows)
        logits = finite(logits, len(outs[active[0]]))  # [A, V]
        if temperature <= 0:
            toks = torch.argmax(logits, dim=-1).tolist()  # CPU waits for the step's tokens, once
        else:
            toks = [int(sample(logits[i], temperature, top_p, gens[b])) for i, b in enumerate(active)]
        for b, tok in zip(active, toks):
            outs[b].append(tok)
            if on_step is not None:
                on_step(len(outs[b]) - 1, b, tok)
        active = [b for b in active if outs[b][-1] not in eos and len(outs[b]) < max_new_tokens]
        step_s.append(time.perf_counter() - ts)
    _sync(device)
    decode_s = time.perf_counter() - t1 - (graphed.capture_s if graphed is not None else 0.0)  # capture: once
    seqs = [GenerationResult(o, prefill_s, decode_s, n, o[-1] in eos, step_s) for o, n in zip(outs, lens)]
    return BatchResult(seqs, prefill_s, decode_s)


# -- tokenizer --

def load_tokenizer(model_dir: str | Path):
    """``tokenizers.Tokenizer`` from ``<model_dir>/tokenizer.json``, or None when there is none."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise MoeError(f"cannot read tokenizer {path}: {e}") from None


def parse_prompt_ids(text: str) -> list[int]:
    """``"1,2,3"`` -> [1, 2, 3]; MoeError on anything else (an empty item such as ``1,,2`` included)."""
    if not text.strip():
        raise MoeError("--prompt-ids is empty")
    try:
        return [int(p) for p in text.replace(" ", "").split(",")]
    except ValueError:
        raise MoeError(f"--prompt-ids must be comma-separated integers, got {short(text)}") from None
