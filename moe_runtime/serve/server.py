"""Starting a server: the options, assembling the run, the engine and the app, and uvicorn with a drain.

Contract:

- ``ServeOptions``: the server's own settings, defined once with ``option(...)`` fields (their flags come
  from ``core/flags.py`` as the offloading ones do).
- ``check_servable(opts, xopts)``: MoeError for options that need the future (belady, oracle,
  noisy-oracle, recorded predictions, routes from a trace): a server does not know what comes next.
- ``Server(model_dir, run, sopts, ...)`` builds the engine, metrics and app for an assembled ``Run``
  (``load_run``); ``serve()`` runs uvicorn in the calling thread until SIGINT/SIGTERM, then drains:
  new requests get 503 (or find the socket closed), running ones get ``drain_timeout`` seconds to
  finish, and the run is finished (copies drained). ``start_background()`` / ``stop()`` do the same on
  a thread (tests, benchmarks).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

from moe_runtime.core.errors import MoeError
from moe_runtime.core.flags import integer, number
from moe_runtime.core.options import option

FUTURE_POLICIES = ("belady",)
FUTURE_PREDICTORS = ("oracle", "noisy-oracle")


@dataclass(frozen=True)
class ServeOptions:
    host: str = option("127.0.0.1", "--host", help="address to bind (0.0.0.0 exposes the server to the network)")
    port: int = option(8000, "--port", type=integer(0, 65535), help="TCP port (0: any free one)")
    max_batch: int = option(8, "--max-batch", type=integer(1, 4096),
                            help="sequences decoded together at most (KV-cache rows); the KV memory caps it too")
    max_queue: int = option(64, "--max-queue", type=integer(0),
                            help="requests waiting for a row at most; past it the server answers 429")
    max_context: int | None = option(None, "--max-context", type=integer(2),
                                     help="positions per sequence, prompt and output (default: the model's "
                                          "max_position_embeddings)")
    prefill_chunk: int | None = option(None, "--prefill-chunk", type=integer(1),
                                       help="prefill a longer prompt in forwards of this many tokens, one between "
                                            "decode steps, so running requests keep streaming (default: one "
                                            "forward per prompt)")
    api_key: str | None = option(None, "--api-key", help="require 'Authorization: Bearer KEY' on /v1/*")
    drain_timeout: float = option(30.0, "--drain-timeout", type=number(0),
                                  help="seconds running requests get to finish after SIGTERM")
    served_model_name: str | None = option(None, "--served-model-name",
                                           help="the model id clients see (default: the checkpoint directory's "
                                                "name)")


def check_servable(opts, xopts) -> None:
    """Refuse, in one line, what needs the future: the requests are not known in advance."""
    if xopts.route_from_trace:
        raise MoeError("serve cannot take --route-from-trace: requests are not known in advance")
    if opts is None:
        return
    if opts.eviction in FUTURE_POLICIES:
        raise MoeError(f"serve cannot take --eviction {opts.eviction}: it needs the future routing")
    if opts.predictor in FUTURE_PREDICTORS or opts.predictor.startswith("recorded:"):
        raise MoeError(f"serve cannot take --predictor {opts.predictor}: it needs the future routing")
    if xopts.record_trace:
        raise MoeError("serve cannot take --record-trace: a server's sequences come and go")


class Server:
    def __init__(self, model_dir, run, sopts: ServeOptions, *, tokenizer=None, template=None,
                 max_len: int | None = None) -> None:
        from moe_runtime.serve.app import build_app
        from moe_runtime.serve.engine import Engine
        from moe_runtime.serve.metrics import Metrics

        self.run, self.sopts = run, sopts
        cfg = run.model.cfg
        self.max_len = max_len or sopts.max_context or cfg.max_position_embeddings
        self.metrics = Metrics()
        self.engine = Engine(run, tokenizer=tokenizer, max_batch=sopts.max_batch, max_len=self.max_len,
                             max_queue=sopts.max_queue, metrics=self.metrics, prefill_chunk=sopts.prefill_chunk)
        name = sopts.served_model_name or Path(model_dir).resolve().name
        self.app = build_app(self.engine, self.metrics, model_name=name, tokenizer=tokenizer, template=template,
                             api_key=sopts.api_key)
        self.uvicorn = None
        self.thread: threading.Thread | None = None

    def _config(self):
        import uvicorn

        return uvicorn.Config(self.app, host=self.sopts.host, port=self.sopts.port, log_level="warning",
                              timeout_graceful_shutdown=self.sopts.drain_timeout, lifespan="off")

    def _make(self, signals: bool):
        import uvicorn

        engine = self.engine

        class _Uvicorn(uvicorn.Server):
            def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: refuse new work first, then stop listening
                engine.drain()
                super().handle_exit(sig, frame)

            def install_signal_handlers(self):
                if signals:
                    super().install_signal_handlers()

        self.uvicorn = _Uvicorn(self._config())
        return self.uvicorn

    @property
    def port(self) -> int:
        """The bound port (after start: a port of 0 was any free one)."""
        servers = getattr(self.uvicorn, "servers", None) or []
        for s in servers:
            for sock in s.sockets:
                return sock.getsockname()[1]
        return self.sopts.port

    def serve(self) -> None:
        """Run until SIGINT/SIGTERM in this thread, then drain and finish the run."""
        self.engine.start()
        server = self._make(signals=True)
        try:
            server.run()
        finally:
            self._finish()

    def start_background(self, timeout: float = 30.0) -> None:
        self.engine.start()
        server = self._make(signals=False)
        self.thread = threading.Thread(target=server.run, name="moe-serve-http", daemon=True)
        self.thread.start()
        t0 = time.monotonic()
        while not server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > timeout:
                raise MoeError(f"the server did not start on {self.sopts.host}:{self.sopts.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Drain as SIGTERM does, and wait."""
        self.engine.drain()
        if self.uvicorn is not None:
            self.uvicorn.should_exit = True
        if self.thread is not None:
            self.thread.join(self.sopts.drain_timeout + 10)
        self._finish()

    def _finish(self) -> None:
        deadline = time.monotonic() + self.sopts.drain_timeout
        while not self.engine.idle() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.engine.stop()
        try:
            self.run.finish()
        except Exception:  # noqa: BLE001  the copy engine must stop even when the report fails
            self.run.close()
