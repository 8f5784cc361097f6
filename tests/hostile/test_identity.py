"""Class 5 of issue 24: what is read is what was written, from the checkpoint it claims.

A packed expert file is bound to the checkpoint's weights (``packed.weights_digest``) and carries a CRC-32
per record, checked at the record's first read; an old (version 1) pack is refused with a line that says to
pack again. The simulator's bounds cache is validated before it is trusted (else recomputed), and a resumed
sweep's rows must match the grid point their key names (else the point runs again).
"""

from __future__ import annotations

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
