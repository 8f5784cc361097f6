"""`moe-runtime serve` as a command: a taken port is one error line (exit 2) before any weight loads; the
announced address carries the real port (--port 0) and answers; --force lets --timeline replace another
kind of file, as generate's does."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from serve_helpers import serving  # noqa: F401  (skips the module when the serve extra is missing)

import httpx  # noqa: E402

from moe_runtime.model.tiny import write_tiny_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("serve-cli"), seed=3)


@pytest.fixture
def taken():
    """A port something already listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def _one_error(code, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("moe-runtime: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_a_taken_port_fails_in_one_line_before_the_weights_load(run_cli, tiny, taken, monkeypatch):
    import moe_runtime.offload.session as session

    def no_load(*a, **k):
        raise AssertionError("the weights were loaded before the port was bound")
    monkeypatch.setattr(session, "load_run", no_load)
    code, out, err = run_cli(["serve", "--model", tiny, "--expert-budget", "50%", "--port", taken])
    _one_error(code, err, f"127.0.0.1:{taken}", "in use", "--port")
    assert "serve:" not in err and "http://" not in err


def test_timeline_over_another_file_needs_force(run_cli, tiny, tmp_path):
    other = tmp_path / "notes.json"
    other.write_text("precious")
    code, out, err = run_cli(["serve", "--model", tiny, "--expert-budget", "50%", "--port", 0, "--timeline", other])
    _one_error(code, err, "--force")
    assert other.read_text() == "precious"


def test_port_0_announces_the_bound_port_and_force_replaces_the_timeline(tiny, tmp_path):
    """A real process: the line names the port the kernel picked, that port answers, SIGTERM exits 0 and
    --force let --timeline replace a file that was not a timeline."""
    timeline = tmp_path / "timeline.json"
    timeline.write_text("not a timeline")
    proc = subprocess.Popen([sys.executable, "-m", "moe_runtime.cli.runtime", "serve", "--model", str(tiny),
                             "--device", "cpu", "--expert-budget", "50%", "--port", "0", "--timeline", str(timeline),
                             "--force"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        while not (seen and seen[-1].startswith("serve: ")):
            line = proc.stderr.readline()
            assert line, "".join(seen) + proc.stderr.read()
            seen.append(line)
        m = re.search(r" on http://127\.0\.0\.1:(\d+) \(", seen[-1])
        assert m and int(m.group(1)) != 0, seen[-1]
        r = httpx.get(f"http://127.0.0.1:{m.group(1)}/v1/models", timeout=30)
        assert [d["id"] for d in r.json()["data"]] == [tiny.name]
        r = httpx.post(f"http://127.0.0.1:{m.group(1)}/v1/completions", timeout=60,
                       json={"prompt": [5, 6], "max_tokens": 3, "temperature": 0})
        assert len(r.json()["choices"][0]["token_ids"]) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "traceEvents" in json.loads(timeline.read_text())
