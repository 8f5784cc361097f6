"""Token streams for calibration and evaluation: a text file through the checkpoint's tokenizer, or random ids.

Contract:

- The data flags of ``moe-runtime calibrate`` and ``eval-predictors``
  (``--data FILE.txt`` or ``--random-tokens N``, ``--seed``, ``--seq-len``,
  ``--max-tokens``) are defined once, in ``cli/predictors.py``.
- ``load_tokens(model_dir, vocab_size, data=..., random_tokens=..., seed=...,
  max_tokens=...)`` returns a 1-D int64 numpy array of token ids, every id in
  ``[0, vocab_size)``. Text is read as UTF-8 and encoded with
  ``<model_dir>/tokenizer.json`` (the ``tokenizers`` library, as one string);
  random ids are uniform, from ``numpy.random.default_rng(seed)``.
- ``token_chunks(tokens, seq_len)`` splits it into consecutive chunks of
  ``seq_len`` ids (the last may be shorter); each chunk is run as one
  independent sequence starting at position 0.
- Anything wrong (no such file, not UTF-8, empty text, no tokenizer, ids out of
  range, non-positive sizes) raises ``MoeError`` naming it.

This module does not run the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_runtime.core.errors import MoeError
from moe_runtime.core.config_files import input_file
from moe_runtime.model.generate import load_tokenizer

DEFAULT_SEQ_LEN = 256


def load_tokens(model_dir: str | Path, vocab_size: int, data: str | Path | None = None,
                random_tokens: int | None = None, seed: int = 0, max_tokens: int | None = None) -> np.ndarray:
    """Token ids [N] int64 from ``data`` (text file) or ``random_tokens`` (count); see the module docstring."""
    if (data is None) == (random_tokens is None):
        raise MoeError("give exactly one of --data FILE.txt or --random-tokens N")
    if max_tokens is not None and max_tokens <= 0:
        raise MoeError(f"--max-tokens must be positive, got {max_tokens}")
    if random_tokens is not None:
        if random_tokens <= 0:
            raise MoeError(f"--random-tokens must be positive, got {random_tokens}")
        n = random_tokens if max_tokens is None else min(random_tokens, max_tokens)
        from moe_runtime.core.resources import check_fits

        check_fits(f"--random-tokens {n}", 8 * n)  # the ids alone, before a forward pass sees them
        return np.random.default_rng(seed).integers(0, vocab_size, size=n, dtype=np.int64)
    path = Path(input_file(data, "--data file"))  # says FIFO, directory or missing
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MoeError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise MoeError(f"{path} is empty")
    tokenizer = load_tokenizer(model_dir)
    if tokenizer is None:
        raise MoeError(f"--data needs {Path(model_dir) / 'tokenizer.json'}; use --random-tokens N instead")
    ids = np.asarray(tokenizer.encode(text).ids, dtype=np.int64)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.size == 0:
        raise MoeError(f"{path} encodes to no tokens")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise MoeError(f"the tokenizer produced id {int(bad[0])}, outside the model's vocabulary of {vocab_size}")
    return ids


def token_chunks(tokens: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Consecutive chunks of ``seq_len`` ids (the last may be shorter)."""
    if seq_len <= 0:
        raise MoeError(f"--seq-len must be positive, got {seq_len}")
    return [tokens[i:i + seq_len] for i in range(0, len(tokens), seq_len)]
