"""Starting `moe-runtime serve`'s server in-process on 127.0.0.1 (a free port) for the serve tests, and the
solo decodes its answers are compared with. Tests importing this skip when the serve extra is missing."""

from __future__ import annotations

import contextlib

import pytest

for _mod in ("fastapi", "uvicorn", "prometheus_client", "jinja2", "httpx"):
    pytest.importorskip(_mod, reason="the serve extra is not installed")

from moe_runtime.model.generate import generate, load_tokenizer  # noqa: E402
from moe_runtime.offload.session import load_run  # noqa: E402
from moe_runtime.serve.server import Server, ServeOptions  # noqa: E402
from moe_runtime.serve.text import ChatTemplate  # noqa: E402

CONTEXT = 96


@contextlib.contextmanager
def serving(model_dir, opts=None, xopts=None, *, max_len: int = CONTEXT, **serve):
    """A running server (resident when ``opts`` is None, else offloaded with those OffloadOptions and the
    executor's ``xopts``)."""
    sopts = ServeOptions(port=0, drain_timeout=serve.pop("drain_timeout", 5.0), **serve)
    run = load_run(model_dir, opts, xopts, device="cpu", prompt_lens=[1] * sopts.max_batch)
    server = Server(model_dir, run, sopts, tokenizer=load_tokenizer(model_dir), template=ChatTemplate.load(model_dir),
                    max_len=max_len)
    server.start_background()
    try:
        yield server
    finally:
        server.stop()


def url(server) -> str:
    return f"http://127.0.0.1:{server.port}"


class Solo:
    """Greedy tokens of ``generate()`` on one prompt alone (cached), as `moe-runtime generate` decodes them
    (``chunk``: prefilled in forwards of that many tokens, as ``ExecutorOptions(chunk=...)`` runs it)."""

    def __init__(self, model_dir, chunk: int | None = None) -> None:
        from moe_runtime.offload.session import ExecutorOptions

        self.run = load_run(model_dir, None, ExecutorOptions(chunk=chunk), device="cpu")
        self.cache: dict = {}

    def __call__(self, prompt_ids, max_tokens: int) -> list[int]:
        key = (tuple(prompt_ids), max_tokens)
        if key not in self.cache:
            res = generate(self.run.model, self.run.provider, list(prompt_ids), max_tokens,
                           eos_ids=self.run.model.cfg.eos_token_ids)
            self.cache[key] = res.token_ids
        return self.cache[key]


def metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
