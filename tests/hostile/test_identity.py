"""Class 5 of issue 24: what is read is what was written, from the checkpoint it claims.

A packed expert file is bound to the checkpoint's weights (``packed.weights_digest``) and carries a CRC-32
per record, checked at the record's first read; an old (version 1) pack is refused with a line that says to
pack again. The simulator's bounds cache is validated before it is trusted (else recomputed), and a resumed
sweep's rows must match the grid point their key names (else the point runs again).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_runtime.core.errors import MoeError
from moe_runtime.offload.packed import read_header, write_packed
from moe_runtime.offload.storage import DiskReadEngine
from moe_runtime.traces.format import load_trace

from .conftest import assert_one_error


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two tiny mixtrals of one config.json and different weights, and the first one's pack."""
    from moe_runtime.model.tiny import write_tiny_checkpoint
    from moe_runtime.offload.tiers import pack_model

    d = tmp_path_factory.mktemp("identity")
    a = write_tiny_checkpoint("mixtral", d / "a", seed=0)
    b = write_tiny_checkpoint("mixtral", d / "b", seed=1)
    assert (a / "config.json").read_text() == (b / "config.json").read_text()
    pack_model(a, d / "a.pack")
    pack_model(b, d / "b.pack")
    return a, b, d


def _generate(runtime, model, pack, *extra):
    return runtime("generate", "--model", model, "--prompt-ids", "1,2,3", "--max-new-tokens", 2, "--expert-budget",
                   4, "--expert-source", f"disk:{pack}", *extra)


def test_pack_of_another_checkpoint_with_the_same_config_is_refused(runtime, pair):
    a, b, d = pair
    code, _, err = _generate(runtime, a, d / "b.pack")
    assert_one_error(code, err, "moe-runtime", "packed from another checkpoint with the same config.json",
                     "run `moe-runtime pack` again")
    code, out, err = _generate(runtime, a, d / "a.pack", "--json")  # its own pack decodes
    assert code == 0, err


def test_a_flipped_byte_is_refused_at_the_records_first_read(runtime, pair, tmp_path):
    a, _, d = pair
    code, _, err = _generate(runtime, a, d / "a.pack", "--record-trace", tmp_path / "t.npz")
    assert code == 0, err
    expert = int(load_trace(tmp_path / "t.npz").expert_ids[0, 0, 0])  # read first: the cache starts empty
    hdr = read_header(d / "a.pack")
    blob = bytearray((d / "a.pack").read_bytes())
    (offset, _), = [(o, n) for _, o, n in hdr.segments(0, expert)]
    blob[offset] ^= 1  # the lowest mantissa bit of a float32: still finite, only the CRC can tell
    bad = tmp_path / "bad.pack"
    bad.write_bytes(bytes(blob))
    code, _, err = _generate(runtime, a, bad)
    assert_one_error(code, err, "moe-runtime", f"expert {expert} of MoE layer 0", "is damaged", "pack` again")


def test_a_version_1_pack_is_refused_with_one_line(runtime, pair, tmp_path):
    a, _, d = pair
    blob = (d / "a.pack").read_bytes()
    old = tmp_path / "old.pack"
    old.write_bytes(blob.replace(b'"version": 2', b'"version": 1', 1))
    code, _, err = _generate(runtime, a, old)
    assert_one_error(code, err, "moe-runtime", "older version", "run `moe-runtime pack` again")


def test_a_record_is_checked_at_its_first_read_only(tmp_path):
    rec = np.arange(4096 * 2, dtype=np.uint8).reshape(1, 1, -1) % 251
    write_packed(tmp_path / "r.pack", fingerprint="x", dtype="uint8", record_bytes=rec.shape[-1], n_moe_layers=1,
                 n_experts=1, layers=[rec[0]])
    hdr = read_header(tmp_path / "r.pack")
    src = hdr.segments(0, 0)
    slot = torch.zeros(rec.shape[-1], dtype=torch.uint8)
    eng = DiskReadEngine(1, [hdr.path], threads=2, max_read=rec.shape[-1], direct=False)
    try:
        for _ in range(3):
            eng.submit(0, src, slot, demand=True)
            eng.wait(0)
        assert eng._verified == {tuple(src)}  # verified once, remembered: later reads cost no CRC
        assert np.array_equal(slot.numpy(), rec[0, 0])
    finally:
        eng.close()
    with open(tmp_path / "r.pack", "r+b") as f:  # the same record damaged: a fresh engine refuses it
        f.seek(src[0][1] + 100)
        f.write(b"\xff")
    eng = DiskReadEngine(1, [hdr.path], threads=2, max_read=rec.shape[-1], direct=False)
    try:
        eng.submit(0, src, slot, demand=True)
        with pytest.raises(MoeError, match="expert 0 of MoE layer 0 .* is damaged"):
            eng.wait(0)
    finally:
        eng.close()


def test_a_truncated_checksum_table_is_refused(tmp_path):
    rec = np.zeros((1, 4096), dtype=np.uint8)
    write_packed(tmp_path / "r.pack", fingerprint="x", dtype="uint8", record_bytes=4096, n_moe_layers=1, n_experts=1,
                 layers=[rec])
    p = tmp_path / "r.pack"
    p.write_bytes(p.read_bytes()[:-2])
    with pytest.raises(MoeError, match="truncated"):
        read_header(p)


# -- the simulator: the bounds cache and resumed sweep rows ---------------------------------------------------
def _law_bounds(tmp_path):
    from simulator import bounds as B
    from simulator.replay import build_workload, load_inputs

    from .conftest import LAW

    trace, _ = load_inputs(LAW, None, 20)
    ids = build_workload(trace, 1).ids
    cache = B.BoundsCache(tmp_path / "c")
    key = B.BoundsCache.key(B.trace_digest(trace), 30, "global", 20, 1)
    return B, ids, cache, key, B.belady_misses(ids, 30, "global", trace.n_layers)


@pytest.mark.parametrize("tamper", ["edited count", "no check", "another key's file", "forged but impossible",
                                    "not a mapping"])
def test_a_tampered_bounds_cache_is_recomputed(tmp_path, tamper):
    B, ids, cache, key, true = _law_bounds(tmp_path)
    n_layers = len(ids[0])
    cache.put(key, true)
    f = tmp_path / "c" / f"{key}.json"
    d = json.loads(f.read_text())
    if tamper == "edited count":
        d["belady_misses"] = true + 1  # in range, but not what was written with its check
    elif tamper == "no check":
        d = {"key": key, "belady_misses": true + 1}
    elif tamper == "another key's file":
        other = key.replace("-30-", "-31-")
        d = {"key": other, "belady_misses": true + 1, "check": B.BoundsCache._check(other, true + 1)}
    elif tamper == "forged but impossible":  # a consistent file whose count no replay of this trace can give
        d = {"key": key, "belady_misses": 3, "check": B.BoundsCache._check(key, 3)}
    else:
        d = [1, 2]
    f.write_text(json.dumps(d))
    B._MEMO.clear()
    got = B.cached_belady_misses(ids, n_slots=30, scope="global", n_moe_layers=n_layers, key=key, cache=cache)
    assert got == true
    assert cache.get(key) == true  # and the file was rewritten


def test_a_valid_bounds_cache_entry_is_trusted(tmp_path):
    B, ids, cache, key, true = _law_bounds(tmp_path)
    cache.put(key, true + 1)  # a count this trace could have, written by put: used as is (that is the cache)
    B._MEMO.clear()
    assert B.cached_belady_misses(ids, n_slots=30, scope="global", n_moe_layers=len(ids[0]), key=key,
                                  cache=cache) == true + 1


def test_a_resumed_row_that_is_not_its_keys_point_runs_again(sim, tmp_path):
    import yaml

    from .conftest import LAW

    exp = tmp_path / "e.yaml"
    exp.write_text(yaml.safe_dump({"name": "ident", "trace": LAW, "tokens": 2, "budgets": ["2.5%", "2.75%"],
                                   "evictions": ["lru"], "predictors": ["none"], "devices": ["t4"]}))
    out = tmp_path / "o"
    assert sim("sweep", exp, "--out", out)[0] == 0
    doc = json.loads((out / "results.json").read_text())
    good = {r["key"]: r["tokens_per_s"] for r in doc["results"]}
    doc["results"][0]["budget"] = doc["results"][1]["budget"]  # a row moved under another point's key
    doc["results"][0]["tokens_per_s"] = 1e9
    (out / "results.json").write_text(json.dumps(doc))
    code, text, err = sim("sweep", exp, "--out", out)
    assert code == 0, err
    assert "1 stored result(s)" in text and "running them again" in text
    again = {r["key"]: r["tokens_per_s"] for r in json.loads((out / "results.json").read_text())["results"]}
    assert again == good
