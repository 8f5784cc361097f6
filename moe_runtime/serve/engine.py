"""Continuous batching: one worker thread runs the model; requests join and leave between decode steps.

Contract:

- ``Engine(run, ...)`` owns an assembled ``Run`` (``offload/session.load_run``): its KV cache holds
  ``max_batch`` rows of ``max_len`` positions (``setup_cache`` once). ``submit(request)`` queues a
  ``Request`` (``QueueFull`` past ``max_queue`` waiting, ``Draining`` after ``drain()``); the worker
  admits queued requests into free rows between decode steps (each prefilled alone: its own forward,
  whose experts the provider serves in waves when they exceed the cache), then runs one decode step
  over every running sequence (one token each, ``rows=[...]``: the MoE layers fetch the union).
- Chunked prefill (``prefill_chunk`` N): a prompt longer than N tokens is prefilled in forwards of N
  tokens (the last shorter), one forward per loop turn between decode steps, so the running sequences
  keep streaming meanwhile; it joins the decode batch with its first token. Its tokens are those of
  ``generate()`` on a run prefilling in the same chunks (``ExecutorOptions(chunk=N)``).
- A sequence leaves on EOS, a stop string, ``max_tokens``, or ``cancel()`` (a client that went away);
  its row is free for the next admission. Logits that become non-finite end that sequence only, with an
  error event (the HTTP side answers 500); its row is zeroed, so nothing of it reaches a later sequence.
- Rows start over and are zeroed through the model's own interface, ``start_sequence(row)`` and
  ``clear_row(row)`` (the Transformer's and the offloading executor's SteppedModel's).
- Exactness: a greedy sequence's tokens are those of ``generate()`` on the same prompt whatever else runs
  (per-row attention, per-token experts; a lone sequence decodes through the very path ``generate`` uses).
  Each sequence samples from its own generator seeded with its ``seed``.
- Events go to the request's ``emit(event)`` callback, called on the worker thread (the HTTP side hands
  them to its event loop): ``Delta(text, token_ids, logprobs, finish_reason)`` and ``Failure(message)``.

Knows nothing of HTTP; the scheduler's counts go to a ``metrics`` object (serve/metrics.py) or nowhere.
"""

from __future__ import annotations

import collections
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from moe_runtime.model.generate import sample
from moe_runtime.serve.text import Detokenizer


class QueueFull(Exception):
    """More requests waiting than ``max_queue``."""


class Draining(Exception):
    """The server is shutting down and takes no new requests."""


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None = None  # per token: {"token", "logprob", "top": {token: logprob}}
    finish_reason: str | None = None  # "stop" | "length" on the last delta


@dataclass
class Failure:
    message: str


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[object], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top alternatives per token (0: the chosen token's only); None: none
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    # filled by the engine
    generated: list[int] = field(default_factory=list)
    row: int = -1

    def cancel(self) -> None:
        """Ask the worker to drop this request (thread-safe: a flag read between steps)."""
        self.cancelled = True


class _Seq:
    """A running sequence: its request, row, position, sampler and detokenizer."""

    def __init__(self, req: Request, row: int, tokenizer, eos: set[int], device) -> None:
        self.req, self.row = req, row
        self.pos = len(req.prompt_ids)  # position of the next token fed
        self.fed = 0  # prompt tokens prefilled so far
        self.detok = Detokenizer(tokenizer, req.stop, eos)
        self.gen = None
        if req.temperature > 0:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(req.seed if req.seed is not None else random.getrandbits(63))
        self.last_t = 0.0


class Engine:
    def __init__(self, run, *, tokenizer, max_batch: int, max_len: int, max_queue: int, metrics=None,
                 prefill_chunk: int | None = None) -> None:
        self.run, self.model, self.provider = run, run.model, run.provider
        self.tokenizer, self.metrics = tokenizer, metrics
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.eos = set(self.model.cfg.eos_token_ids)
        self.device = self.model.device
        self.model.setup_cache(max_len, batch=max_batch)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: dict[int, _Seq] = {}
        self.prefill_chunk = prefill_chunk
        self.prefilling: collections.deque[_Seq] = collections.deque()  # long prompts, a chunk per turn
        self.free = list(range(max_batch - 1, -1, -1))  # rows, the lowest first
        self.cv = threading.Condition()
        self.draining = self.stopped = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="moe-serve-worker", daemon=True)

    # -- the HTTP side -------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def submit(self, req: Request) -> None:
        with self.cv:
            if self.draining:
                raise Draining()
            if len(self.waiting) >= self.max_queue + len(self.free):  # a free row takes one at the next step
                raise QueueFull()
            self.waiting.append(req)
            self._gauges()
            self.cv.notify()

    def drain(self) -> None:
        """Refuse new requests; those queued or running finish."""
        with self.cv:
            self.draining = True

    def idle(self) -> bool:
        with self.cv:
            return not self.waiting and not self.running and not self.prefilling

    def stop(self, timeout: float = 5.0) -> None:
        """End the worker (after ``drain``; whatever still runs is failed) and wait for it."""
        with self.cv:
            self.stopped = True
            self.cv.notify()
        self.thread.join(timeout)

    # -- the worker ----------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.cv:
                    while not self.stopped and not self.waiting and not self.running and not self.prefilling:
                        self.cv.wait()
                    if self.stopped:
                        break
                self._step()
        for seq in [*self.running.values(), *self.prefilling]:
            self._end(seq, Failure("the server stopped before this request finished"))
        with self.cv:
            for req in self.waiting:
                req.emit(Failure("the server stopped before this request started"))
            self.waiting.clear()

    def _step(self) -> None:
        """One turn: admit, drop the cancelled, one chunk of the oldest long prompt, one decode step."""
        self._admit()
        self._drop_cancelled()
        if self.prefilling:
            seq = self.prefilling[0]
            self._feed(seq, min(seq.fed + self.prefill_chunk, len(seq.req.prompt_ids)))
        if self.running:
            self._decode()

    def _admit(self) -> None:
        while True:
            with self.cv:
                if not self.free or not self.waiting:
                    return
                req = self.waiting.popleft()
                if req.cancelled:
                    self._gauges()
                    continue
                row = self.free.pop()
                self._gauges()
            self._prefill(req, row)

    def _prefill(self, req: Request, row: int) -> None:
        seq = _Seq(req, row, self.tokenizer, self.eos, self.device)
        req.row = row
        self.model.start_sequence(row)  # a SteppedModel counts each row's position: this one starts over
        n = len(req.prompt_ids)
        if self.prefill_chunk is not None and n > self.prefill_chunk:
            self.prefilling.append(seq)  # its chunks run between decode steps (``_step``)
        else:
            self._feed(seq, n)

    def _feed(self, seq: _Seq, end: int) -> None:
        """Prefill the prompt's tokens ``seq.fed`` to ``end`` (one forward); at the prompt's end the sequence
        takes its first token and joins the running batch."""
        req, start, n = seq.req, seq.fed, len(seq.req.prompt_ids)
        try:
            tokens = torch.tensor(req.prompt_ids[start:end], dtype=torch.long, device=self.device)  # [T]
            logits = self.model(tokens, torch.arange(start, end, device=self.device), self.provider,
                                last_only=True, rows=seq.row)  # [1, V]
        except Exception as e:  # noqa: BLE001  one request's failure must not stop the others
            return self._end(seq, Failure(f"the prefill failed: {e}"))
        seq.fed = end
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(end - start)
        if end < n:
            return
        if self.prefilling and self.prefilling[0] is seq:
            self.prefilling.popleft()
        self.running[seq.row] = seq
        self._take(seq, logits[0])

    def _drop_cancelled(self) -> None:
        for seq in [s for s in (*self.running.values(), *self.prefilling) if s.req.cancelled]:
            self._end(seq, None, "cancelled")

    def _decode(self) -> None:
        seqs = list(self.running.values())
        rows = [s.row for s in seqs]
        cur = torch.tensor([s.req.generated[-1] for s in seqs], dtype=torch.long, device=self.device)  # [A]
        pos = torch.tensor([s.pos for s in seqs], dtype=torch.long, device=self.device)  # [A]
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(seqs))
        try:
            # a lone sequence decodes exactly as generate() does (rows an int); a batch, one token per row
            logits = self.model(cur, pos, self.provider, rows=rows[0] if len(rows) == 1 else rows)  # [A, V]
        except Exception as e:  # noqa: BLE001  a failing step ends its sequences, not the server
            for seq in seqs:
                self._end(seq, Failure(f"the decode step failed: {e}"))
            return
        self.steps += 1
        for i, seq in enumerate(seqs):
            seq.pos += 1
            self._take(seq, logits[i])
        if self.metrics is not None:
            self.metrics.observe_provider(self.provider if self.run.offloaded else None)

    def _take(self, seq: _Seq, logits: torch.Tensor) -> None:
        """Sample the sequence's next token from its logits [V], emit it, and end the sequence if done."""
        req = seq.req
        if not math.isfinite(float(logits.max())):  # CPU waits for one scalar (the token's sync follows)
            step = "the prefill" if not req.generated else f"decode step {len(req.generated)}"
            return self._end(seq, Failure(f"the model's logits became non-finite at {step}"))
        tok = int(sample(logits, req.temperature, req.top_p, seq.gen))  # CPU waits for the token
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.generated_tokens.inc()
            if req.generated:
                self.metrics.inter_token.observe(now - seq.last_t)
            else:
                self.metrics.first_token.observe(now - req.arrived)
        seq.last_t = now
        req.generated.append(tok)
        lp = _logprobs(logits, tok, req.logprobs, self.tokenizer) if req.logprobs is not None else None
        text, stopped = seq.detok.add(tok)
        finish = None
        if stopped or tok in self.eos:
            finish = "stop"
        elif len(req.generated) >= req.max_tokens or seq.pos + 1 >= self.max_len:
            finish = "length"
            text += seq.detok.rest()  # what was held back for a stop string that never came
        req.emit(Delta(text, [tok], lp, finish))
        if finish is not None:
            self._end(seq, None, "completed")

    def _end(self, seq: _Seq, failure: Failure | None, outcome: str = "failed") -> None:
        """The sequence leaves: its row is freed (zeroed after a failure: NaN must not leak into a later one)."""
        if self.running.get(seq.row) is seq:
            del self.running[seq.row]
        elif seq in self.prefilling:
            self.prefilling.remove(seq)
        if failure is not None:
            self.model.clear_row(seq.row)
            seq.req.emit(failure)
        if self.metrics is not None:
            self.metrics.requests.labels(outcome).inc()
        with self.cv:
            self.free.append(seq.row)
            self.free.sort(reverse=True)
            self._gauges()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_length.set(len(self.waiting))
            self.metrics.running.set(len(self.running))


def _logprobs(logits: torch.Tensor, tok: int, top: int, tokenizer) -> list[dict]:
    """The chosen token's log-probability and the ``top`` most likely alternatives'."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [V]
    name = (lambda i: tokenizer.id_to_token(i) or str(i)) if tokenizer is not None else str
    alts = {}
    if top > 0:
        vals, ids = torch.topk(lp, min(top, lp.shape[0]))
        alts = {name(int(i)): float(v) for v, i in zip(vals.tolist(), ids.tolist())}
    return [{"token": name(tok), "logprob": float(lp[tok]), "top": alts, "id": tok}]
