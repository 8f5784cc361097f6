"""Shared fixtures: tiny random checkpoints (see tiny_checkpoints.py), built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import tiny_checkpoints`

from tiny_checkpoints import make_tiny_checkpoint  # noqa: E402

# tiny tensors: extra threads only add contention on the 2-core CI machine
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Factory: tiny_checkpoint(family, **overrides) -> directory, cached per (family, overrides)."""
    made: dict[tuple, Path] = {}

    def make(family: str, **overrides) -> Path:
        key = (family, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in made:
            made[key] = make_tiny_checkpoint(family, tmp_path_factory.mktemp(family), **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_mixtral(tiny_checkpoint) -> Path:
    """A float32 tiny Mixtral checkpoint written by transformers."""
    return tiny_checkpoint("mixtral")
