"""The HTTP side: a FastAPI app with OpenAI's endpoints over an ``Engine`` (serve/engine.py).

``build_app(engine, metrics, model_name, tokenizer, template, api_key)``:

- ``POST /v1/completions`` and ``POST /v1/chat/completions``, plain or ``stream: true`` (server-sent
  events of OpenAI's chunk objects, then ``data: [DONE]``); ``usage`` on plain answers and, with
  ``stream_options.include_usage``, in a last chunk. Each choice also carries ``token_ids`` (the
  generated ids, EOS included), an addition clients ignore.
- ``GET /v1/models``, ``GET /health`` (503 while draining), ``GET /metrics`` (Prometheus text).
- Every refusal is OpenAI's error JSON: 400 malformed JSON, wrong types, unknown fields, unsupported
  values, prompts too long, bad token ids, empty messages; 401 a missing or wrong API key; 404
  ``model_not_found`` a ``model`` other than the served one (absent or empty: the served one); 429 the queue
  is full; 503 draining; 500 a request whose decode failed (the others keep running).
- A client that disconnects cancels its request (a stream's task is cancelled; a plain request polls).

The engine runs on its own thread; its events reach each request's asyncio queue through
``loop.call_soon_threadsafe``: a stream's at every token (the tokens that queued while a write was under
way go out in one write), a plain answer's once, at its end (the event loop then does no work per token).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from moe_runtime.serve.engine import Delta, Draining, Engine, Failure, QueueFull, Request
from moe_runtime.serve.protocol import (MAX_STOP, ApiError, ChatRequest, CompletionRequest, Sampling, error_body,
                                        message_text)
from moe_runtime.serve.text import TemplateError

MAX_BODY = 4 << 20  # bytes of a request body
TYPE_TAGS = {"int", "float", "str", "bool", "dict", "list", "none"}  # union members in a pydantic error location


def build_app(engine: Engine, metrics, *, model_name: str, tokenizer, template, api_key: str | None) -> FastAPI:
    app = FastAPI(title="moe-runtime serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    vocab = engine.model.cfg.vocab_size

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        if metrics is not None and e.status in (429, 503):
            metrics.requests.labels("rejected").inc()
        return JSONResponse(error_body(e.status, e.message, e.param, e.kind, e.code), status_code=e.status)

    @app.exception_handler(404)
    async def not_found(request, _):
        return JSONResponse(error_body(404, f"no route {request.method} {request.url.path}"), status_code=404)

    @app.exception_handler(405)
    async def bad_method(request, _):
        return JSONResponse(error_body(405, f"{request.method} is not allowed on {request.url.path}"),
                            status_code=405)

    def authorize(request: HttpRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)")

    async def body(request: HttpRequest, cls):
        authorize(request)
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        try:
            req = cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            # pydantic tags a union's member in the location ("temperature.int"): name the field only
            loc = [p for p in err["loc"] if isinstance(p, int) or not (p in TYPE_TAGS or "[" in p or "-" in p)]
            where = ".".join(str(p) for p in loc[:2])
            what = "is not a field of this request" if err["type"] == "extra_forbidden" else err["msg"]
            raise ApiError(400, f"{where}: {what}", where) from None
        if req.model and req.model != model_name:  # absent or "": this server's one model, as before
            shown = req.model if len(req.model) <= 100 else req.model[:100] + "..."
            raise ApiError(404, f"The model `{shown}` does not exist: this server serves `{model_name}` "
                                f"(GET /v1/models)", "model", "invalid_request_error", code="model_not_found")
        bad = req.unsupported()
        if bad:
            raise ApiError(400, bad[0][1], bad[0][0])
        if engine.draining:
            raise ApiError(503, "the server is shutting down")
        return req

    def check_prompt(ids: list[int]) -> list[int]:
        if not ids:
            raise ApiError(400, "the prompt is empty: give at least one token", "prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"prompt token id {bad[0]} is outside the vocabulary (size {vocab})", "prompt")
        if len(ids) >= engine.max_len:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) leaves no room in the context of "
                                f"{engine.max_len} tokens", "prompt")
        return ids

    def sampling(req, n_prompt: int, kind: str, default_max: int | None) -> Sampling:
        room = engine.max_len - n_prompt
        max_tokens = req.max_tokens
        if kind == "chat" and req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        if max_tokens is None:
            max_tokens = min(default_max or room, room)
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        if max_tokens > room:
            raise ApiError(400, f"the prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context "
                                f"of {engine.max_len} tokens", "max_tokens")
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        top_p = 1.0 if req.top_p is None else float(req.top_p)
        if not 0 <= temperature <= 2:
            raise ApiError(400, f"temperature must be in [0, 2], got {temperature}", "temperature")
        if not 0 < top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP:
            raise ApiError(400, f"at most {MAX_STOP} stop strings", "stop")
        if stop and tokenizer is None:
            raise ApiError(400, "stop strings need the checkpoint's tokenizer.json", "stop")
        if req.seed is not None and not 0 <= req.seed < 2**63:
            raise ApiError(400, "seed must be in [0, 2**63)", "seed")
        if kind == "chat":
            top = req.top_logprobs
            logprobs = (top or 0) if req.logprobs else None
            if top is not None and not 0 <= top <= 20:
                raise ApiError(400, "top_logprobs must be in [0, 20]", "top_logprobs")
        else:
            logprobs = req.logprobs
            if logprobs is not None and not 0 <= logprobs <= 5:
                raise ApiError(400, "logprobs must be in [0, 5]", "logprobs")
        opts = req.stream_options or {}
        return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=req.seed, stop=stop,
                        logprobs=logprobs, stream=bool(req.stream), kind=kind,
                        include_usage=bool(req.stream and opts.get("include_usage")))

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        req = await body(request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if prompt is None or (isinstance(prompt, list) and prompt and not isinstance(prompt[0], int)):
            raise ApiError(400, "give one prompt (a string or a list of token ids); batches are not supported",
                           "prompt")
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ApiError(400, "this checkpoint has no tokenizer.json: give the prompt as token ids", "prompt")
            ids = tokenizer.encode(prompt).ids  # as `moe-runtime generate --prompt` encodes it
        else:
            ids = list(prompt)
        ids = check_prompt(ids)
        return await answer(request, ids, sampling(req, len(ids), "completion", 16))

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        req = await body(request, ChatRequest)
        if not req.messages:
            raise ApiError(400, "messages is empty: give at least one message", "messages")
        if template is None:
            raise ApiError(400, "this checkpoint has no chat template (tokenizer_config.json's chat_template or "
                                "chat_template.jinja): use /v1/completions", "messages")
        if tokenizer is None:
            raise ApiError(400, "this checkpoint has no tokenizer.json: chat needs one", "messages")
        messages = [message_text(i, m) for i, m in enumerate(req.messages)]
        try:
            text = template.render(messages)
        except TemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        ids = check_prompt(tokenizer.encode(text, add_special_tokens=False).ids)
        return await answer(request, ids, sampling(req, len(ids), "chat", None))

    async def answer(request: HttpRequest, ids: list[int], s: Sampling):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        if s.stream:
            def emit(ev):  # on the worker thread: each token wakes the event loop
                loop.call_soon_threadsafe(queue.put_nowait, ev)
        else:
            held: list[Delta] = []

            def emit(ev):  # on the worker thread: a plain answer needs only its end, so the loop wakes once
                if isinstance(ev, Delta) and ev.finish_reason is None:
                    held.append(ev)
                else:
                    loop.call_soon_threadsafe(queue.put_nowait, (held, ev))
        job = Request(ids, s.max_tokens, emit, temperature=s.temperature, top_p=s.top_p, seed=s.seed, stop=s.stop,
                      logprobs=s.logprobs)
        try:
            engine.submit(job)
        except QueueFull:
            raise ApiError(429, f"the queue is full ({engine.max_queue} requests waiting): retry later") from None
        except Draining:
            raise ApiError(503, "the server is shutting down") from None
        rid = ("chatcmpl-" if s.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        shape = _Shape(s.kind, rid, model_name, len(ids))
        if s.stream:
            return StreamingResponse(stream(job, queue, shape, s), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await collect(request, job, queue, shape)

    async def collect(request: HttpRequest, job: Request, queue: asyncio.Queue, shape: _Shape):
        try:
            while True:
                try:
                    held, ev = await asyncio.wait_for(queue.get(), 0.5)
                    break
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return Response(status_code=499)
        except asyncio.CancelledError:
            job.cancel()
            raise
        if isinstance(ev, Failure):
            return JSONResponse(error_body(500, ev.message), status_code=500)
        deltas = [*held, ev]
        text, ids = "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids]
        lps = [lp for d in deltas for lp in d.logprobs or []] if job.logprobs is not None else None
        return JSONResponse(shape.full(text, ids, lps, ev.finish_reason))

    async def stream(job: Request, queue: asyncio.Queue, shape: _Shape, s: Sampling):
        n = 0
        try:
            if shape.kind == "chat":
                yield _sse(shape.chunk({"role": "assistant", "content": ""}, [], None, None))
            done = False
            while not done:
                events = [await queue.get()]
                while not queue.empty():  # the tokens that came meanwhile: one write, one event each
                    events.append(queue.get_nowait())
                out = []
                for ev in events:
                    if isinstance(ev, Failure):
                        out.append(_sse(error_body(500, ev.message)))
                        done = True
                        break
                    n += len(ev.token_ids)
                    out.append(shape.chunk_sse(ev.text, ev.token_ids,
                                               ev.logprobs if job.logprobs is not None else None, ev.finish_reason))
                    if ev.finish_reason is not None:
                        if s.include_usage:
                            out.append(_sse({**shape.head("chunk"), "choices": [], "usage": shape.usage(n)}))
                        done = True
                        break
                if done:
                    out.append("data: [DONE]\n\n")
                yield "".join(out).encode()
        finally:  # the client went away (the task is cancelled) or the stream ended: stop decoding for it
            job.cancel()

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "moe-runtime"}]}

    @app.get("/health")
    async def health():
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


_encode = json.JSONEncoder(separators=(",", ":")).encode  # built once: json.dumps builds one per call


def _sse(obj) -> str:
    return f"data: {_encode(obj)}\n\n"


class _Shape:
    """OpenAI's response objects for one request (completion or chat)."""

    def __init__(self, kind: str, rid: str, model: str, n_prompt: int) -> None:
        self.kind, self.rid, self.model, self.n_prompt = kind, rid, model, n_prompt
        self.created = int(time.time())
        self._chunk_head = f'data: {_encode(self.head("chunk"))[:-1]},"choices":['  # written once per stream

    def head(self, what: str) -> dict:
        obj = {"completion": "text_completion", "chat": "chat.completion"}[self.kind]
        if what == "chunk" and self.kind == "chat":
            obj = "chat.completion.chunk"
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def usage(self, n: int) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": n, "total_tokens": self.n_prompt + n}

    def _logprobs(self, lps: list[dict] | None):
        if lps is None:
            return None
        if self.kind == "chat":
            return {"content": [{"token": lp["token"], "logprob": lp["logprob"], "bytes": None,
                                 "top_logprobs": [{"token": t, "logprob": v, "bytes": None}
                                                  for t, v in lp["top"].items()]} for lp in lps]}
        return {"tokens": [lp["token"] for lp in lps], "token_logprobs": [lp["logprob"] for lp in lps],
                "top_logprobs": [lp["top"] for lp in lps], "text_offset": None}

    def full(self, text: str, ids: list[int], lps, finish: str) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": self._logprobs(lps),
                      "finish_reason": finish, "token_ids": ids}
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(lps), "finish_reason": finish,
                      "token_ids": ids}
        return {**self.head("full"), "choices": [choice], "usage": self.usage(len(ids))}

    def chunk_sse(self, text: str, ids: list[int], lps, finish: str | None) -> str:
        """``_sse(self.chunk(...))`` for a token's chunk, its fixed head serialized once per stream."""
        return f"{self._chunk_head}{_encode(self._choice(text, ids, lps, finish))}]}}\n\n"

    def chunk(self, text, ids: list[int], lps, finish: str | None) -> dict:
        return {**self.head("chunk"), "choices": [self._choice(text, ids, lps, finish)]}

    def _choice(self, text, ids: list[int], lps, finish: str | None) -> dict:
        if self.kind == "chat":
            delta = text if isinstance(text, dict) else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": self._logprobs(lps), "finish_reason": finish,
                    "token_ids": ids}
        return {"index": 0, "text": text, "logprobs": self._logprobs(lps), "finish_reason": finish, "token_ids": ids}
