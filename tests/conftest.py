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


@pytest.fixture(scope="session")
def mixtral4(tmp_path_factory) -> Path:
    """A 4-layer tiny Mixtral written by ``make-tiny``'s writer (no transformers), for predictor tests."""
    from moe_runtime.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mix4"), seed=0, num_hidden_layers=4)


@pytest.fixture
def run_cli(capsys):
    """Run ``moe-runtime ARGV`` in-process; returns (exit code, stdout, stderr)."""
    from moe_runtime.cli.runtime import main

    def run(argv):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return e.value.code, out, err
    return run
