"""The sweep's Ray backend: each point a Ray task, on a local Ray instance or a cluster.

``ray_rows(todo, exp, workers, address)`` yields each point's row as its task
finishes. Tasks get plain arguments (the point's key, trace path and device,
its options as a dict) and return the row dict; a worker process loads each
trace once, by path, at its first point (``sweep_points.use_inputs`` and
``sweep_points.run_point``: the sweep's public worker interface), so the project must
be importable and the trace paths must resolve on every node (install the
project there, or submit the sweep as a Ray job whose runtime environment's
``working_dir`` is the repository). A task that raises, or whose worker is lost
(after one retry), yields a row with its error (``sweep_points.failed_row``). An
``--address HOST:PORT`` that does not answer within ``CONNECT_TIMEOUT_S`` is
one error line, before Ray is started. Ray is imported only here, and only
when this backend runs.
"""

from __future__ import annotations

import socket
from dataclasses import asdict

from moe_runtime.core.errors import MoeError

from . import sweep_points
from .replay import ReplayOptions

CONNECT_TIMEOUT_S = 5.0


def _task(point: tuple, opts: dict, model, tokens) -> dict:
    """One point in a Ray worker: plain arguments in (the options as a dict), a row out."""
    sweep_points.use_inputs(model, tokens)
    return sweep_points.run_point((*point, ReplayOptions(**opts)))


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """MoeError unless a TCP connection to ``address`` (HOST:PORT, optionally ray://) opens within ``timeout``;
    "auto" is left to Ray (it looks for a cluster started on this machine)."""
    if address == "auto" or address.startswith("local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise MoeError(f"--address must be auto or HOST:PORT (e.g. 10.0.0.1:6379), got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise MoeError(f"--address {address}: no Ray cluster answered within {timeout:g} s "
                       f"({e.strerror or type(e).__name__}); start one with `ray start --head` or check the "
                       "address") from None


def ray_rows(todo: list, exp, workers: int, address: str | None):
    """Rows of ``todo`` as their Ray tasks finish (a local Ray instance unless ``address``)."""
    if address:
        check_address(address)
    try:
        import ray
    except ImportError:
        raise MoeError("--backend ray needs Ray: pip install -e '.[ray]' (or pip install ray)") from None
    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            raise MoeError(f"--backend ray: cannot start or join Ray ({' '.join(str(e).split())[:200]})") from None
    task = ray.remote(num_cpus=1, max_retries=1)(_task)
    try:
        refs = {task.remote(p[:3], asdict(p[3]), exp.model, exp.tokens): p for p in todo}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                p = refs.pop(ref)
                try:
                    yield ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a lost worker or a task error: recorded with the point
                    yield sweep_points.failed_row(p, e)
    finally:
        if started:
            ray.shutdown()
