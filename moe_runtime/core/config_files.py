"""YAML config files (models, devices, experiments): find by name or path, load safely, parse.

One place for the rules every config loader shares: a bare name is looked up
in its configs/ folder, a path is taken as given, and every problem is one
MoeError line that names the file. Config files are small and hand-written, so
the YAML reader (a SafeLoader) refuses what only an attack needs before
anything walks the document: files over ``MAX_CONFIG_BYTES``, anchors and
aliases (the "billion laughs" expansion), nesting deeper than ``MAX_DEPTH``.
Numbers are read as YAML 1.2 reads them (``1e-300`` and ``1e5`` are floats,
where YAML 1.1 makes them strings). ``check_number`` is the one check for a
numeric field (type, finite, range) and ``short`` the one way to quote a value
in an error, so no message grows with the input.
This module knows nothing about what the files hold.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Callable, TypeVar

import yaml

from moe_runtime.core.errors import MoeError

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]  # the checkout (an editable install runs from it)
MODELS_DIR = REPO / "configs" / "models"
DEVICES_DIR = REPO / "configs" / "devices"
HOSTS_DIR = REPO / "configs" / "hosts"

MAX_CONFIG_BYTES = 1 << 20  # the bundled configs are under 2 KiB
MAX_DEPTH = 32  # nesting of mappings and lists; the schemas need 2
_MAX_MESSAGE = 400  # characters of an error line about a config file


def short(value, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters: how errors quote what the user gave."""
    try:
        r = repr(value)
    except (ValueError, RecursionError):  # an int past Python's digit limit, a self-referencing list
        r = f"<{type(value).__name__}>"
    return r if len(r) <= limit else r[:limit - 3] + "..."


def names(items, limit: int = 5) -> str:
    """A comma list of (at most ``limit``) user-given names, each cut to 40 characters, for errors."""
    items = [str(i) if len(str(i)) <= 40 else str(i)[:37] + "..." for i in items]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_number(field: str, value, *, lo=None, hi=None, lo_open: bool = False, integer: bool = False):
    """``value`` if it is a finite number (an int when ``integer``) in the range; else MoeError
    "<field> must be a number > 0 and <= 1e+06, got inf". ``lo_open`` makes ``lo`` exclusive."""
    fmt = lambda v: str(v) if isinstance(v, int) else f"{v:g}"  # noqa: E731  (an int bound as written)
    parts = ([f"{'>' if lo_open else '>='} {fmt(lo)}"] if lo is not None else []) + \
            ([f"<= {fmt(hi)}"] if hi is not None else [])
    want = f"{field} must be {'an integer' if integer else 'a number'}" + \
           (" " + " and ".join(parts) if parts else "")
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise MoeError(f"{want}, got {short(value)}")
    if (isinstance(value, float) and not math.isfinite(value)) or (lo is not None and (value <= lo if lo_open else value < lo)) \
            or (hi is not None and value > hi):
        raise MoeError(f"{want}, got {short(value)}")
    return value


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases and deep nesting while composing (before any
    expansion), refuses a key given twice in one mapping (YAML says keys are unique; PyYAML lets the last
    win silently), and reads YAML 1.2 floats such as ``1e5``."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise MoeError(f"YAML anchors and aliases (&name, *name) are not allowed in config files "
                           f"(line {event.start_mark.line + 1})")
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise MoeError(f"nested deeper than {MAX_DEPTH} levels (line {event.start_mark.line + 1})")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise MoeError(f"key {short(key_node.value)} is given twice in one mapping "
                                   f"(line {key_node.start_mark.line + 1}); keep one")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 wants a dot and a signed exponent (1.0e+5); YAML 1.2 and people also write 1e5, 1e-300, 2.5E3
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def parse_yaml(text: str):
    """The document in ``text``, read with the rules above; MoeError or yaml.YAMLError on bad input."""
    loader = _ConfigLoader(text)  # a SafeLoader subclass: what yaml.safe_load does, with the rules above
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def name_inside(name, what: str) -> str:
    """``name`` (taken from a data file) if it names something inside the folder it came from, checked
    lexically: a non-empty relative path without ``..`` or NUL. Not by resolving symlinks: a Hugging Face
    snapshot's files are symlinks into its blob folder, and must keep working."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise MoeError(f"{what} {short(name)} is not a file name")
    parts = Path(name).parts
    if os.path.isabs(name) or name.startswith("~") or ".." in parts:
        raise MoeError(f"{what} {short(name)} points outside its folder (an absolute path or '..'); only names "
                       "inside the folder are read")
    return name


def input_file(path, what: str = "file") -> str:
    """``path`` if it is a regular file that can be opened without blocking, else one MoeError line that says
    what it is: not found, a directory, or a FIFO/socket/device (opening a FIFO blocks until a writer comes,
    and a device never ends). Every reader of a file the user names calls this before ``open``."""
    import stat

    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise MoeError(f"{what} not found: {path}") from None
    except OSError as e:
        raise MoeError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise MoeError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise MoeError(f"{what} {path} is {kind}; give a regular file")
    return path


def bundled(path) -> str:
    """``path`` as given when it exists (or is absolute), else relative to the checkout: bundled traces and
    configs resolve the same way from any working directory."""
    path = str(path)
    return path if Path(path).is_absolute() or Path(path).exists() or not (REPO / path).exists() else str(REPO / path)


def available(directory: Path) -> list[str]:
    """The config names in ``directory`` (YAML file stems)."""
    return sorted(p.stem for p in directory.glob("*.yaml"))


def resolve(name_or_path, directory: Path, kind: str, file_kind: str | None = None) -> Path:
    """``directory/NAME.yaml`` for a bare name, else the path itself; MoeError if there is no such file.

    Errors say "unknown <kind>" and "<file_kind or kind> file not found".
    """
    s = str(name_or_path)
    path = Path(s)
    if not (s.endswith((".yaml", ".yml")) or "/" in s or path.is_file()):
        path = directory / f"{s}.yaml"
        if not path.is_file():
            raise MoeError(f"unknown {kind} {s!r} (known: {', '.join(available(directory)) or 'none'}; "
                           "or give a YAML file)")
    else:
        path = Path(bundled(s))  # configs/devices/t4.yaml from any working directory
    if not path.is_file():
        raise MoeError(f"{file_kind or kind} file not found: {path}")
    return path


def read_config_text(path) -> str:
    """The text of a config file: a regular file of at most MAX_CONFIG_BYTES, UTF-8."""
    if not os.path.lexists(path):
        raise MoeError(f"{path}: file not found")
    if not os.path.isfile(path):  # a FIFO or device would block or never end
        raise MoeError(f"{path}: not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise MoeError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise MoeError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; config files are small")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MoeError(f"{path}: not UTF-8 text (byte {e.start})") from None


def load_yaml(path: Path, parse: Callable[[object], T]) -> T:
    """``parse(document)``, with YAML, MoeError and TypeError problems prefixed by the file."""
    text = read_config_text(path)
    try:
        data = parse_yaml(text)
    except (yaml.YAMLError, ValueError, OverflowError) as e:  # ValueError: a date 2001-13-45, a 5000-digit int
        raise MoeError(_cap(f"{path}: not valid YAML ({(str(e).splitlines() or [type(e).__name__])[0]})")) from None
    except MoeError as e:
        raise MoeError(_cap(f"{path}: {e}")) from None
    try:
        return parse(data)
    except (MoeError, TypeError) as e:  # TypeError: e.g. a mapping where a number belongs
        raise MoeError(_cap(f"{path}: {e}")) from None


def _cap(message: str) -> str:
    """The safety net under ``short``: no error line about a config file grows with the input."""
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE - 3] + "..."
