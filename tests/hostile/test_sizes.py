"""Sizes asked on the command line: refused up front with the size and what the machine has
(``moe_runtime.core.resources.check_fits``), before anything is allocated; the bounded cases run under RLIMIT_DATA."""

from __future__ import annotations

import json
import shutil

import numpy as np

import pytest

from moe_runtime.core.errors import MoeError
from moe_runtime.core.resources import available_bytes, check_fits

from .conftest import DATA_LIMIT, LAW, assert_one_error, precious, run_bounded


def test_check_fits_names_the_size_and_the_machine():
    check_fits("a little", 1)
    with pytest.raises(MoeError, match=r"^a lot needs .* of memory; this machine has .* available$"):
        check_fits("a lot", available_bytes() + 1)


def test_synth_tokens_beyond_memory(trace_cli, tmp_path):
    out = precious(tmp_path / "s.npz")
    code, _, err = trace_cli("synth", "--model", "mixtral-8x7b", "--tokens", 10**9, "--out", out, "--force")
    assert_one_error(code, err, "moe-trace", "1000000000 tokens", "available")
    assert out.read_text() == "precious"


def test_profile_layers_beyond_memory(runtime, tmp_path):
    out = precious(tmp_path / "dev.yaml")
    code, _, err = runtime("profile", "--device", "cpu", "--model-config", "mixtral-8x7b", "--layers", 10000,
                           "--out", out, "--force")
    assert_one_error(code, err, "moe-runtime", "--layers 10000", "GiB", "available")
    assert out.read_text() == "precious"


def _long_context(tiny, tmp_path):
    """The tiny model, claiming 10**9 positions: only memory can refuse a long decode."""
    ck = tmp_path / "long"
    shutil.copytree(tiny, ck)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "max_position_embeddings": 10**9}))
    return ck


def test_generate_beyond_max_position_embeddings(runtime, tiny):
    code, out, err = runtime("generate", "--model", tiny, "--prompt-ids", "1,2", "--max-new-tokens", 10**7)
    assert_one_error(code, err, "moe-runtime", "10000002 positions", "max_position_embeddings (2048)")


def test_generate_kv_cache_beyond_memory(runtime, tiny, tmp_path):
    code, out, err = runtime("generate", "--model", _long_context(tiny, tmp_path), "--prompt-ids", "1,2",
                             "--max-new-tokens", 10**7)
    assert_one_error(code, err, "moe-runtime", "KV cache", "--max-new-tokens 10000000", "available")


def test_bounded_processes_refuse_fast(tmp_path):
    """Under a 1 GiB heap limit the estimate is held against the limit: one line, no MemoryError, no hang."""
    p = run_bounded("moe_runtime.cli.trace", ["synth", "--model", "mixtral-8x7b", "--tokens", 10**6,
                                              "--out", tmp_path / "s.npz"], timeout=60)
    assert_one_error(p.returncode, p.stderr, "moe-trace", "1000000 tokens", f"{DATA_LIMIT / 2**30:.1f} GiB")
    p = run_bounded("moe_runtime.cli.runtime", ["profile", "--device", "cpu", "--model-config", "mixtral-8x7b",
                                                "--layers", 1], timeout=120)
    assert_one_error(p.returncode, p.stderr, "moe-runtime", "--layers 1", "available")


def test_replay_batch_is_capped(sim):
    code, out, err = sim("replay", "--trace", LAW, "--device", "t4", "--tokens", 5, "--batch", 10**9)
    assert_one_error(code, err, "moe-sim", "batch", "1000000000", "65536")


# -- issue 24 class 4: sizes declared in files, refused with the numbers before they are allocated ----------------

def _declare(tiny, tmp_path, **fields):
    ck = shutil.copytree(tiny, tmp_path / "big")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, **fields}))
    return ck


def test_config_declaring_a_billion_layers_is_refused_in_seconds(tiny, tmp_path):
    import time
    t0 = time.monotonic()
    p = run_bounded("moe_runtime.cli.runtime", ["generate", "--model", _declare(tiny, tmp_path, num_hidden_layers=10**9),
                                                "--prompt-ids", "1,2", "--max-new-tokens", 1], timeout=60)
    assert_one_error(p.returncode, p.stderr, "moe-runtime", "1,000,000,000 layers", "GiB", "1.0 GiB available")
    assert time.monotonic() - t0 < 30


def test_config_and_sparse_safetensors_header_that_agree(tiny, tmp_path):
    """vocab_size 10**8 in config.json and in the (sparse) safetensors file: 48 GiB of embeddings declared."""
    import struct
    vocab = 10**8
    ck = _declare(tiny, tmp_path, vocab_size=vocab)
    st = ck / "model.safetensors"
    raw = st.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    offset = 0
    for name in [k for k in header if k != "__metadata__"]:
        t = header[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            t["shape"] = [vocab, t["shape"][1]]
        size = 4 * int(np.prod(t["shape"])) if t["dtype"] == "F32" else 2 * int(np.prod(t["shape"]))
        t["data_offsets"] = [offset, offset + size]
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(st, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)  # sparse: no block is written
    p = run_bounded("moe_runtime.cli.runtime", ["generate", "--model", ck, "--prompt-ids", "1,2",
                                                "--max-new-tokens", 1], timeout=60)
    assert_one_error(p.returncode, p.stderr, "moe-runtime", "as config.json declares", "GiB of memory",
                     "available")


def test_trace_expansion_is_held_against_memory_and_info_reads_lazily(trace_cli, monkeypatch):
    from moe_runtime.core import resources
    from moe_runtime.traces import format as fmt
    from moe_runtime.traces import load_trace

    monkeypatch.setattr(resources, "_host_available", lambda: 100 << 10)  # 100 KiB left
    with pytest.raises(MoeError, match=r"the trace's arrays, as their headers declare .* needs .* 100.0 KiB"):
        load_trace(LAW)
    read = []
    real = fmt._read
    monkeypatch.setattr(fmt, "_read", lambda data, key: (read.append(key), real(data, key))[1])
    code, out, err = trace_cli("info", LAW, "--json")
    assert code == 0, err
    assert sorted(read) == ["meta", "phase", "seq_id"]  # never expert_ids, weights, position or predictions
    assert json.loads(out)["tokens"] == 1000 or json.loads(out)["tokens"] > 0
