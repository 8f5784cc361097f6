"""The disk tier: experts read from a packed file (or the checkpoint itself) into RAM slots.

Tokens equal the all-in-RAM run for every policy and predictor, misses really read the file
(``bytes_read``), withdrawn prefetches are never read, a truncated or foreign packed file is
refused with one line, and a failed read surfaces as one error, not a hang.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from moe_runtime.core.policies import EVICTION_POLICIES
from moe_runtime.core.errors import MoeError
from moe_runtime.model.tiny import write_tiny_checkpoint
from moe_runtime.offload.packed import ALIGN, read_header, write_packed
from moe_runtime.offload.storage import DiskReadEngine, aligned_pool

PROMPT, NEW = "5,6,7,8", "10"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("disk")
    path = write_tiny_checkpoint("mixtral", tmp / "ckpt", seed=5, num_hidden_layers=3)
    return path, tmp


def gen(run_cli, path, *extra):
    code, out, err = run_cli(["generate", "--model", path, "--prompt-ids", PROMPT, "--max-new-tokens", NEW,
                              "--json", *extra])
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def packed(ckpt):
    from moe_runtime.cli.runtime import main

    path, tmp = ckpt
    with pytest.raises(SystemExit) as e:
        main(["pack", "--model", str(path), "--out", str(tmp / "experts.pack")])
    assert e.value.code == 0
    return tmp / "experts.pack"


def test_pack_layout(ckpt, packed):
    hdr = read_header(packed)
    assert hdr.record_bytes == 3 * 64 * 96 * 4 and hdr.stride % ALIGN == 0 and hdr.data_start == ALIGN
    records = hdr.n_moe_layers * hdr.n_experts
    assert hdr.checksums_at == ALIGN + records * hdr.stride and len(hdr.crcs) == records
    assert os.path.getsize(packed) == hdr.checksums_at + 4 * records  # one CRC-32 per record at the end


@pytest.mark.parametrize("policy", sorted(EVICTION_POLICIES))
@pytest.mark.parametrize("predictor", ["none", "history", "oracle", "gate"])
def test_disk_tokens_equal_ram_tokens(run_cli, ckpt, packed, policy, predictor, tmp_path):
    path, tmp = ckpt
    ram = gen(run_cli, path, "--record-trace", tmp_path / "t.npz")
    forced = ["--route-from-trace", tmp_path / "t.npz"]
    args = ["--expert-budget", "5", "--eviction", policy, "--predictor", predictor, "--max-inflight", "1",
            "--lookahead", "1", *forced]
    for source in (f"disk:{packed}", "disk"):
        r = gen(run_cli, path, "--expert-source", source, *args)
        assert r["token_ids"] == ram["token_ids"], source
        assert r["read_mode"] in ("direct", "dropped-cache")
        copies = r["misses"] + r["prefetch_issued"] - r["prefetch_cancelled"]
        assert r["copies"] == copies > 0
        if source.startswith("disk:"):  # aligned records: each copy reads exactly one record, withdrawn ones none
            assert r["bytes_read"] == copies * read_header(packed).stride
            assert r["reads_from"] == f"packed file {packed}"
        else:  # the checkpoint's own files: aligned over-reads, never less than the experts themselves
            assert r["bytes_read"] >= r["bytes_h2d"]
            assert r["reads_from"].startswith("the checkpoint's safetensors files")


def test_foreign_and_truncated_packed_files_are_refused(run_cli, ckpt, packed, tmp_path):
    path, tmp = ckpt
    other = write_tiny_checkpoint("olmoe", tmp_path / "other", seed=1)
    code, out, err = run_cli(["pack", "--model", other, "--out", tmp_path / "other.pack"])
    assert code == 0, err
    code, _, err = run_cli(["generate", "--model", path, "--prompt-ids", PROMPT, "--expert-source",
                            f"disk:{tmp_path / 'other.pack'}"])
    assert code == 2 and "packed from another model" in err and len(err.strip().splitlines()) == 1
    cut = tmp_path / "cut.pack"
    cut.write_bytes(packed.read_bytes()[:-5000])
    code, _, err = run_cli(["generate", "--model", path, "--prompt-ids", PROMPT, "--expert-source", f"disk:{cut}"])
    assert code == 2 and "truncated" in err and len(err.strip().splitlines()) == 1
    for bad in ("disk:", "tape", "memory:x", "memory:"):
        code, _, err = run_cli(["generate", "--model", path, "--prompt-ids", PROMPT, "--expert-source", bad])
        assert code == 2 and "--expert-source" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is absent")
def test_cuda_without_cuda_is_one_line(run_cli, ckpt, packed):
    path, _ = ckpt
    for extra in ([], ["--expert-source", f"disk:{packed}"]):
        code, _, err = run_cli(["generate", "--model", path, "--prompt-ids", PROMPT, "--device", "cuda", *extra])
        assert code == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1


def test_host_budget_is_refused_on_cpu(run_cli, ckpt, packed):
    path, _ = ckpt
    code, _, err = run_cli(["generate", "--model", path, "--prompt-ids", PROMPT, "--device", "cpu",
                            "--expert-source", f"disk:{packed}", "--host-budget", "50%"])
    assert code == 2 and "no separate host tier" in err


def _packed_random(tmp_path, L=2, E=3, R=5000):
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, (E, R), dtype=np.uint8) for _ in range(L)]
    write_packed(tmp_path / "r.pack", fingerprint="x", dtype="uint8", record_bytes=R, n_moe_layers=L, n_experts=E,
                 layers=iter(data))
    return read_header(tmp_path / "r.pack"), data


def test_reader_reads_exact_bytes_and_withdraws_queued_reads(tmp_path):
    hdr, data = _packed_random(tmp_path)
    pool = aligned_pool(6, hdr.record_bytes, torch.uint8)
    eng = DiskReadEngine(6, [hdr.path], threads=1, max_read=hdr.record_bytes)
    try:
        keys = [(0, 0), (1, 2), (0, 1), (1, 1), (0, 2), (1, 0)]
        with eng._cv:  # hold the reader back so every read is still queued
            for s, (l, e) in enumerate(keys):
                eng.submit(s, hdr.segments(l, e), pool[s], demand=False)
            assert eng.cancel_if_queued(3) and not eng.cancel_if_queued(3)
            eng.promote(5)
        for s, (l, e) in enumerate(keys):
            if s != 3:
                eng.wait(s)
                assert np.array_equal(pool[s].numpy(), data[l][e])
        assert [r.slot for r in eng.records][0] == 5  # promoted ahead of the queued prefetches
        assert 3 not in {r.slot for r in eng.records} and eng.bytes_read == 5 * hdr.stride
    finally:
        eng.close()


def test_failed_read_is_one_error_not_a_hang(tmp_path):
    hdr, _ = _packed_random(tmp_path)
    pool = aligned_pool(1, hdr.record_bytes, torch.uint8)
    eng = DiskReadEngine(1, [hdr.path], threads=1, max_read=hdr.record_bytes)
    try:
        eng.submit(0, ((0, os.path.getsize(hdr.path) + 8192, hdr.record_bytes),), pool[0], demand=True)
        with pytest.raises(MoeError, match="short read"):
            eng.wait(0)
    finally:
        eng.close()


@pytest.mark.parametrize("where", ["first piece", "last piece", "last element"])
def test_non_finite_expert_read_from_disk_is_one_error(tmp_path, where):
    """Every piece is checked by the thread that read it: a NaN or inf anywhere in a float expert fails the read."""
    E, R = 3, 3 * 4096 + 1000  # float32 elements per expert: pieces of 4 KiB multiples and a ragged last one
    rng = np.random.default_rng(1)
    w = rng.standard_normal((1, E, R)).astype(np.float32)
    pos = {"first piece": 17, "last piece": R - 900, "last element": R - 1}[where]
    w[0, 1, pos] = np.inf if where == "last element" else np.nan
    write_packed(tmp_path / "f.pack", fingerprint="x", dtype="float32", record_bytes=R * 4, n_moe_layers=1,
                 n_experts=E, layers=iter(w.view(np.uint8)))
    hdr = read_header(tmp_path / "f.pack")
    pool = aligned_pool(2, R, torch.float32)
    eng = DiskReadEngine(2, [hdr.path], threads=3, max_read=hdr.record_bytes)
    try:
        eng.submit(0, hdr.segments(0, 0), pool[0], demand=True)
        eng.wait(0)
        assert np.array_equal(pool[0].numpy(), w[0, 0])  # a finite expert reads whole, checked
        eng.submit(1, hdr.segments(0, 1), pool[1], demand=True)
        with pytest.raises(MoeError, match="non-finite"):
            eng.wait(1)
        # the threads that found it are gone: a later read is refused, not left waiting for ever
        with pytest.raises(MoeError, match="non-finite"):
            eng.submit(0, hdr.segments(0, 2), pool[0], demand=True)
    finally:
        eng.close()


def test_an_expert_is_checked_once_whatever_object_names_it(tmp_path, monkeypatch):
    """Checked experts are remembered by their segments, not by the id of an object that may be reused."""
    from moe_runtime.offload import storage

    E, R = 3, 4096
    w = np.random.default_rng(2).standard_normal((1, E, R)).astype(np.float32)
    write_packed(tmp_path / "g.pack", fingerprint="x", dtype="float32", record_bytes=R * 4, n_moe_layers=1,
                 n_experts=E, layers=iter(w.view(np.uint8)))
    hdr = read_header(tmp_path / "g.pack")
    checked = []
    monkeypatch.setattr(storage, "all_finite", lambda t: checked.append(t.numel()) or True)
    pool = aligned_pool(1, R, torch.float32)
    eng = DiskReadEngine(1, [hdr.path], threads=2, max_read=hdr.record_bytes)
    try:
        for e in (0, 0, 1, 0):  # a fresh segments object every time, as the tiered engine makes them
            eng.submit(0, hdr.segments(0, e), pool[0], demand=True)
            eng.wait(0)
            assert np.array_equal(pool[0].numpy(), w[0, e])
    finally:
        eng.close()
    assert sum(checked) == 2 * R  # experts 0 and 1, each once, every element
