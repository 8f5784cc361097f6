"""The sweep's Ray backend: each point a Ray task, on a local Ray instance or a cluster.

``ray_rows(todo, exp, workers, address)`` yields each point's row as its task
finishes. Tasks get plain arguments (the point's key, trace path and device,
its options as a dict) and return the row dict; a worker process loads each
trace once, by path, at its first point (``sweep._STATE``), so the project must
be importable and the trace paths must resolve on every node (install the
project there, or submit the sweep as a Ray job whose runtime environment's
``working_dir`` is the repository). A task that raises, or whose worker is lost
(after one retry), yields a row with its error. Ray is imported only here, and
only when this backend runs.
"""

from __future__ import annotations

from dataclasses import asdict

from moe_runtime.core.errors import MoeError

from . import sweep
from .bounds import BoundsCache
from .replay import ReplayOptions


def _task(point: tuple, opts: dict, model, tokens) -> dict:
    """One point in a Ray worker: plain arguments in (the options as a dict), a row out."""
    if sweep._STATE.get("model", 0) != model or sweep._STATE.get("tokens", 0) != tokens:
        sweep._STATE.clear()
        sweep._STATE.update(model=model, tokens=tokens, inputs={}, workloads={}, devices={}, cache=BoundsCache())
    return sweep._safe_point((*point, ReplayOptions(**opts)))


def ray_rows(todo: list, exp, workers: int, address: str | None):
    """Rows of ``todo`` as their Ray tasks finish (a local Ray instance unless ``address``)."""
    try:
        import ray
    except ImportError:
        raise MoeError("--backend ray needs Ray: pip install -e '.[ray]' (or pip install ray)") from None
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
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
                    yield sweep._failed_row(p, e)
    finally:
        if started:
            ray.shutdown()
