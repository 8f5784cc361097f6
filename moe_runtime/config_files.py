"""YAML config files (models, devices, experiments): find by name or path, load safely, parse.

One place for the rules every config loader shares: a bare name is looked up
in its configs/ folder, a path is taken as given, YAML is read with
``yaml.safe_load``, and every problem is one MoeError line that names the file.
This module knows nothing about what the files hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, TypeVar

import yaml

from moe_runtime.errors import MoeError

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent  # the checkout (an editable install runs from it)
MODELS_DIR = REPO / "configs" / "models"
DEVICES_DIR = REPO / "configs" / "devices"


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
    if not path.is_file():
        raise MoeError(f"{file_kind or kind} file not found: {path}")
    return path


def load_yaml(path: Path, parse: Callable[[object], T]) -> T:
    """``parse(yaml.safe_load(file))``, with YAML, MoeError and TypeError problems prefixed by the file."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise MoeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return parse(data)
    except (MoeError, TypeError) as e:  # TypeError: e.g. a mapping where a number belongs
        raise MoeError(f"{path}: {e}") from None
