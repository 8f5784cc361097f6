"""The one way this project writes output files: checked before the work, written atomically.

Contract:
- ``check_output(path, what, inputs=[...], kind=..., force=...)`` runs before
  any work: it creates missing parent directories and raises one ``MoeError``
  line when the file cannot be written there (the path is a directory or not a
  regular file, a parent is a regular file, the directory is not writable or on
  a read-only file system). It writes nothing under ``path`` itself.
  ``check_output_dir`` does the same for an output directory (which may not
  be the checkout's top folder, its code or docs, or hold a checkpoint).
- Outputs never replace inputs (the rule of every command): a path that
  resolves (symlinks, ``..``, hard links by st_dev/st_ino) to one of the run's
  ``inputs``, to an existing file inside an input folder, or to a file the
  project ships (the checkout's configs/ and traces/) is refused; an existing
  non-empty file that is not an earlier output of the same ``kind`` (recognised
  by its first bytes, ``KINDS``) is replaced only with ``force`` (``--force``).
- ``write_atomic(path, write)`` calls ``write(binary_file)`` on a temporary file
  in the same directory, fsyncs it, gives it the usual mode (0666 less the
  umask, i.e. 0644 by default) and renames it over ``path``. Whatever fails
  (the writer, a full disk, a permission), ``path`` keeps its old content (or
  stays absent), the temporary file is removed, and an ``OSError`` becomes one
  ``MoeError`` line naming ``path``. ``write_text_atomic`` and
  ``write_json_atomic`` are the text and JSON forms.
- Temporary files are named ``.moe-tmp-<pid>-<name>-<random>``, so a run killed
  with SIGKILL leaves files that ``remove_stale_temps(directory)`` recognises
  and removes (only those of processes that no longer run).

This module knows nothing about what is written.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from moe_runtime.core.errors import MoeError

TMP_PREFIX = ".moe-tmp-"


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _existing_ancestor(path: Path, label: str) -> Path:
    """The nearest ancestor of ``path`` (or itself) that exists; refuses one that is not a directory."""
    p = path
    while not os.path.lexists(p):
        p = p.parent
    if not p.is_dir():
        raise MoeError(f"cannot write {label}: {p} is a file, not a directory")
    return p


def _check_writable_dir(directory: Path, label: str) -> None:
    """Probe by creating (and removing) a temporary file: permissions, read-only mounts and root
    all answer the same way, which ``os.access`` alone does not."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=f"{TMP_PREFIX}{os.getpid()}-probe-")
    except OSError as e:
        raise MoeError(f"cannot write {label}: directory {directory} is not writable ({_reason(e)})") from None
    os.close(fd)
    os.unlink(probe)


def _make_dirs(directory: Path, label: str) -> None:
    if directory.is_dir():
        return
    anc = _existing_ancestor(directory, label)  # names the regular file that blocks the way
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoeError(f"cannot write {label}: cannot create directory {directory} "
                       f"({_reason(e)}; under {anc})") from None


REPO = Path(__file__).resolve().parents[2]
FORCE_HELP = "replace an existing output file that is not an earlier output of the same kind"
SHIPPED = ("configs", "traces")  # folders of the checkout whose files the project ships
# folders of the checkout that hold its code and documents: no output directory goes in them (nor in the
# checkout's top folder itself, where a sweep's files would mix with the project's)
SOURCE = ("moe_runtime", "simulator", "tests", "benchmarks", "docs", ".git", ".ci")


def _is_json_with(*keys: bytes) -> Callable[[bytes], bool]:
    return lambda head: head.lstrip()[:1] == b"{" and any(k in head for k in keys)


# kind -> does this file start like one this project writes as that kind (first 64 KiB)
KINDS: dict[str, Callable[[bytes], bool]] = {
    "trace": lambda head: head.startswith(b"PK\x03\x04") and b"format_version.npy" in head[:256],
    "packed experts": lambda head: head.startswith(b"MOEPACK"),
    "timeline": _is_json_with(b'"traceEvents"'),
    "replay report": _is_json_with(b'"tokens_per_s"', b'"accesses_per_wall_s"'),
    "device profile": lambda head: b"h2d_bandwidth_gbps:" in head and b"moe-runtime profile" in head,
    "host profile": lambda head: head.startswith(b"# Host profile written from") and b"memory_bandwidth_gbps:" in head,
    "adapters": lambda head: b"moe-offload/aligned-adapters" in head[:65536],
    "plot": lambda head: head.startswith(b"\x89PNG"),
    "plan": lambda head: head.startswith(b"# moe-sim plan: ") and b"\nexpected:" in head,
}


def _ident(p) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _inside(child: str, folder: str) -> bool:
    return child == folder or child.startswith(folder.rstrip(os.sep) + os.sep)


def _shipped_files() -> dict[tuple[int, int], str]:
    """(st_dev, st_ino) of every file under the shipped folders: a hard link to one is one of them."""
    out = {}
    for top in SHIPPED:
        for root, _, files in os.walk(REPO / top):
            for f in files:
                ident = _ident(os.path.join(root, f))
                if ident is not None:
                    out[ident] = os.path.relpath(os.path.join(root, f), REPO)
    return out


def _head(p: Path, label: str) -> bytes:
    try:
        with open(p, "rb") as f:
            return f.read(65536)
    except OSError as e:
        raise MoeError(f"cannot write {label}: {_reason(e)}") from None


def _is_kind(p: Path, kind: str | None) -> bool:
    return kind is not None and p.is_file() and KINDS[kind](_head(p, str(p)))


def refuse_inputs(p: Path, label: str, inputs=(), kind: str | None = None) -> None:
    """MoeError when ``p`` is (or replaces) one of ``inputs`` or a shipped file (see the module docstring)."""
    real = os.path.realpath(p)
    ident = _ident(p)
    for top in SHIPPED:
        if (REPO / top).is_dir() and _inside(real, os.path.realpath(REPO / top)):
            raise MoeError(f"refusing to write {label}: it is under {top}/, which this project ships; "
                           "choose another path")
    if ident is not None:
        shipped = _shipped_files().get(ident)
        if shipped:
            raise MoeError(f"refusing to write {label}: it is the same file as {shipped}, which this project "
                           "ships; choose another path")
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        ireal = os.path.realpath(os.fspath(inp))
        if os.path.isdir(ireal):  # an earlier output of this kind in the folder is no input of this run
            if os.path.lexists(p) and _inside(real, ireal) and not _is_kind(p, kind):
                raise MoeError(f"refusing to write {label}: it would replace a file inside the input {inp} of "
                               "this run; choose another path")
        elif real == ireal or (ident is not None and ident == _ident(ireal)):
            raise MoeError(f"refusing to write {label}: it is the input {inp} of this run; choose another path")


def check_replace(p: Path, label: str, kind: str | None, force: bool) -> None:
    """MoeError when ``p`` holds something other than an earlier ``kind`` output and ``force`` is not given."""
    if force or kind is None or not p.is_file():
        return
    head = _head(p, label)
    if head and not KINDS[kind](head):
        raise MoeError(f"{label} exists and is not an earlier {kind} output; give --force to replace it")


def check_output(path, what: str = "output", *, inputs=(), kind: str | None = None, force: bool = False) -> Path:
    """Check that ``path`` can be written as a file, creating its parent directories; return it.

    ``what`` names the output in the error line (e.g. "--out", "timeline"); ``inputs`` are the run's input
    paths (files or folders; None skipped); ``kind`` one of ``KINDS`` (None: no content check).
    """
    p = Path(os.fspath(path))
    label = f"{what} {p}"
    if str(p) in ("", "."):
        raise MoeError(f"{what}: an output file name is needed")
    if p.is_dir():
        raise MoeError(f"cannot write {label}: it is a directory")
    if os.path.lexists(p) and not p.is_file():  # a device or FIFO: a rename would replace the node
        raise MoeError(f"cannot write {label}: it exists and is not a regular file")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")  # a programming error, not input
    refuse_inputs(p, label, inputs, kind)
    check_replace(p, label, kind, force)
    _make_dirs(p.parent, label)
    _check_writable_dir(p.parent, label)
    return p


def check_output_dir(path, what: str = "output directory", *, inputs=(), checkpoint: bool = False) -> Path:
    """Create directory ``path`` (and parents) if missing and check that files can be written in it. Refused:
    a folder inside a shipped folder or one of ``inputs`` (as ``check_output``), the checkout's top folder or
    its code and docs, and, unless the output is itself a ``checkpoint``, a folder holding a checkpoint."""
    p = Path(os.fspath(path))
    label = f"{what} {p}"
    if os.path.lexists(p) and not p.is_dir():
        raise MoeError(f"cannot write {label}: it exists and is not a directory")
    real = os.path.realpath(p)
    if real == os.path.realpath(REPO):
        raise MoeError(f"refusing to write {label}: it is this project's top folder; choose a folder such as "
                       "out/NAME")
    for top in SHIPPED + SOURCE:
        if (REPO / top).is_dir() and _inside(real, os.path.realpath(REPO / top)):
            why = "which this project ships" if top in SHIPPED else "which holds this project's own files"
            raise MoeError(f"refusing to write {label}: it is under {top}/, {why}; choose another path")
    for inp in inputs:
        if inp is not None and str(inp) != "" and _inside(real, os.path.realpath(os.fspath(inp))):
            raise MoeError(f"refusing to write {label}: it is (inside) the input {inp} of this run")
    if not checkpoint and (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        raise MoeError(f"refusing to write {label}: it holds a model checkpoint; choose a folder of its own")
    _make_dirs(p, label)
    _check_writable_dir(p, label)
    return p


def file_mode() -> int:
    """0666 less the process umask: the mode ``open()`` would give a new file (0644 by default)."""
    try:  # read the umask without changing it (os.umask is process-wide and racy with threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path, write: Callable) -> None:
    """Call ``write(f)`` on a binary temp file beside ``path``, fsync, then rename it over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise MoeError(f"cannot write {path}: it is a directory")
    if not os.path.isdir(directory):  # commands create it up front, with check_output
        raise MoeError(f"cannot write {path}: directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f"{TMP_PREFIX}{os.getpid()}-{os.path.basename(path)}-")
    except OSError as e:
        raise MoeError(f"cannot write {path}: {_reason(e)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):  # disk full, permission, ...: one line for the user
            raise MoeError(f"cannot write {path}: {_reason(e)}") from None
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    """Make the rename itself durable; best effort (some file systems refuse fsync on a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def write_json_atomic(path, obj, indent: int | None = None) -> None:
    """Serialise first (a TypeError leaves nothing behind), then write atomically."""
    data = json.dumps(obj, indent=indent)
    write_text_atomic(path, data + ("\n" if indent is not None else ""))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temps(directory) -> list[Path]:
    """Temporary files in ``directory`` left by writers that no longer run (a killed run)."""
    out = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return out
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_file(follow_symlinks=False):
            continue
        pid = entry.name[len(TMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or (int(pid) != os.getpid() and not _pid_alive(int(pid))):
            out.append(Path(entry.path))
    return out


def remove_stale_temps(directory) -> int:
    """Remove ``stale_temps(directory)``; return how many were removed."""
    n = 0
    for p in stale_temps(directory):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise MoeError(f"cannot remove stale temporary file {p}: {_reason(e)}") from None
    return n
