"""The CLI wrapper: a closed stdout ends quietly, OS errors are one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moe_runtime.core.errors import run_cli

from .conftest import LAW, REPO, assert_one_error


def _run(capsys, fn):
    with pytest.raises(SystemExit) as e:
        run_cli(fn, "prog")
    return e.value.code, *capsys.readouterr()


def test_broken_pipe_exits_quietly(capsys):
    def body():
        raise BrokenPipeError(32, "Broken pipe")
    code, out, err = _run(capsys, body)
    assert code == 141 and err == ""


@pytest.mark.parametrize("exc,words", [
    (PermissionError(13, "Permission denied", "/x/y"), ["Permission denied", "/x/y"]),
    (OSError(28, "No space left on device"), ["No space left on device"]),
    (MemoryError(), ["out of memory"]),
])
def test_os_errors_are_one_line(capsys, exc, words):
    def body():
        raise exc
    code, out, err = _run(capsys, body)
    assert_one_error(code, err, "prog", *words)


def test_replay_json_into_a_closed_pipe_is_quiet():
    """`moe-sim replay ... --json | head -1`, made certain: the reader is gone before the first write."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "simulator.cli", "replay", "--trace", LAW, "--device", "t4",
                            "--tokens", "20", "--json"], stdout=w, stderr=subprocess.PIPE, text=True, timeout=120,
                           cwd=REPO)
    finally:
        os.close(w)
    assert p.stderr == "" and p.returncode == 141  # no traceback, no 'Exception ignored' at exit


@pytest.mark.parametrize("module,prog,argv", [("moe_runtime.cli.runtime", "moe-runtime", ["make-tiny"]),
                                              ("moe_runtime.cli.trace", "moe-trace", ["stats", LAW]),
                                              ("simulator.cli", "moe-sim", ["replay"])])
def test_ctrl_c_while_the_parser_imports_is_one_line(capsys, monkeypatch, module, prog, argv):
    """Ctrl-C in the first second (building the parser imports torch) is "interrupted", exit 130."""
    import importlib
    mod = importlib.import_module(module)

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(mod, "build_parser", interrupted)
    with pytest.raises(SystemExit) as e:
        mod.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 130 and err == f"{prog}: interrupted\n"
