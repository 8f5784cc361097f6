"""Starting a server: the options, assembling the run, the engine and the app, and uvicorn with a drain.

Contract:

- ``ServeOptions``: the server's own settings, defined once with ``option(...)`` fields (their flags come
  from ``core/flags.py`` as the offloading ones do).
- ``check_servable(opts, xopts)``: MoeError for options that need the future (belady, oracle,
  noisy-oracle, recorded predictions, routes from a trace): a server does not know what comes next.
- ``Server(model_dir, run, sopts, ...)`` builds the engine, metrics and app for an assembled ``Run``
  (``load_run``) and a socket from ``bind`` (bound at ``serve()`` when not given); ``listen()`` makes it
  accept connections and returns its URL (the real port when ``--port 0``); ``serve()`` runs uvicorn in the calling thread until SIGINT/SIGTERM, then drains:
  new requests get 503 (or find the socket closed), running ones get ``drain_timeout`` seconds to
  finish, and the run is finished (copies drained). ``start_background()`` / ``stop()`` do the same on
  a thread (tests, benchmarks).
- ``bind(host, port)``: the server's TCP socket, bound and not yet listening; MoeError naming the address
  and the reason (in use, permission). `moe-runtime serve` binds before loading weights: a taken port fails
  before minutes of loading, and the address is announced only once it is held.
"""

from __future__ import annotations

import errno
import signal
import socket
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


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: any free one), not yet listening; MoeError naming the
    address and the reason when the address cannot be had."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise MoeError(f"cannot listen on {where}: --host {host!r} is not an address of this machine "
                       f"({getattr(e, 'strerror', None) or e})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses a TIME_WAIT port
        sock.bind(addr)
    except OSError as e:
        sock.close()
        hint = {errno.EADDRINUSE: " (another process listens there: stop it, or give another --port; 0 picks a "
                                  "free one)",
                errno.EACCES: " (ports below 1024 need privileges: give a --port of 1024 or more)",
                errno.EADDRNOTAVAIL: " (not an address of this machine: check --host)"}.get(e.errno, "")
        raise MoeError(f"cannot listen on {where}: {e.strerror or e}{hint}") from None
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a bound socket (the real port: a port of 0 was any free one)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server:
    def __init__(self, model_dir, run, sopts: ServeOptions, *, tokenizer=None, template=None,
                 max_len: int | None = None, sock: socket.socket | None = None) -> None:
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
        self.sock = sock
        self._listening = False

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
                # as uvicorn's, but the signal is not recorded: uvicorn re-raises a recorded one once it has
                # stopped, and SIGTERM's default action then killed the process before serve() finished the
                # run (the copies drained, --timeline written) and returned 0
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                else:
                    self.should_exit = True

            def install_signal_handlers(self):
                if signals:
                    super().install_signal_handlers()

        self.uvicorn = _Uvicorn(self._config())
        return self.uvicorn

    @property
    def port(self) -> int:
        """The bound port (once bound: a port of 0 was any free one)."""
        return self.sock.getsockname()[1] if self.sock is not None else self.sopts.port

    def listen(self) -> str:
        """Bind (unless a socket was given) and accept connections: a client connecting from now on waits in
        the backlog until uvicorn serves it. Returns the URL."""
        if self.sock is None:
            self.sock = bind(self.sopts.host, self.sopts.port)
        if not self._listening:
            self.sock.listen(self._config().backlog)
            self._listening = True
        return url(self.sock)

    def close_socket(self) -> None:
        """Release the socket of a server that will not serve (a later failure)."""
        if self.sock is not None:
            self.sock.close()

    def serve(self) -> None:
        """Run until SIGINT/SIGTERM in this thread, then drain and finish the run."""
        self.listen()
        self.engine.start()
        server = self._make(signals=True)
        try:
            server.run(sockets=[self.sock])
        finally:
            self._finish()

    def start_background(self, timeout: float = 30.0) -> None:
        self.listen()
        self.engine.start()
        server = self._make(signals=False)
        self.thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]}, name="moe-serve-http",
                                       daemon=True)
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
        self.close_socket()
        try:
            self.run.finish()
        except Exception:  # noqa: BLE001  the copy engine must stop even when the report fails
            self.run.close()
