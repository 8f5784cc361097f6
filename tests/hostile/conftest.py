"""Helpers for the hostile-input suite: run a command's ``main(argv)`` in-process, or bounded in a subprocess.

Every case asserts what issue 10 promises: a non-zero exit, exactly one line
``<prog>: error: ...`` on stderr that names the problem, no traceback, and an
existing output left as it was.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAW = str(REPO / "traces/deepseek-v2-lite-law.npz")
GOOD_DEVICE = (REPO / "configs/devices/t4.yaml").read_text()
GOOD_MODEL = (REPO / "configs/models/deepseek-v2-lite.yaml").read_text()
DATA_LIMIT = 1 << 30  # bytes of heap a bounded subprocess may take: a bomb fails fast instead of swapping


def call_main(main, argv, capsys) -> tuple[int, str, str]:
    """``main(argv)`` in-process; (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    code = e.value.code
    return (code if isinstance(code, int) else (0 if code is None else 1)), out, err


def assert_one_error(code: int, err: str, prog: str, *words: str) -> str:
    """Non-zero exit, stderr exactly one ``<prog>: error: ...`` line containing every word, no traceback."""
    lines = err.splitlines()
    assert code != 0, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert len(lines[0]) < 600, "an error line must not grow with the input"
    return lines[0]


def _bounded():
    resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, DATA_LIMIT))  # not RLIMIT_AS: torch reserves address space


def run_bounded(module: str, argv, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    """``python -m module argv`` with a heap limit and a timeout, for cases that could hang or eat memory."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_bounded, env=env, cwd=kw.pop("cwd", REPO), **kw)


@pytest.fixture
def sim(capsys):
    """Run ``moe-sim ARGV`` in-process: (code, stdout, stderr)."""
    from simulator.cli import main
    return lambda *argv: call_main(main, argv, capsys)


@pytest.fixture
def trace_cli(capsys):
    """Run ``moe-trace ARGV`` in-process: (code, stdout, stderr)."""
    from moe_runtime.cli.trace import main
    return lambda *argv: call_main(main, argv, capsys)


@pytest.fixture
def runtime(capsys):
    """Run ``moe-runtime ARGV`` in-process: (code, stdout, stderr)."""
    from moe_runtime.cli.runtime import main
    return lambda *argv: call_main(main, argv, capsys)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A tiny mixtral (2 MoE layers x 8 experts, top-2) written by make-tiny's writer; do not modify it."""
    from moe_runtime.model.tiny import write_tiny_checkpoint
    return write_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("hostile-tiny") / "m")


def precious(path: Path, text: str = "precious") -> Path:
    """An existing output that a failing run must leave as it was."""
    path.write_text(text)
    return path
