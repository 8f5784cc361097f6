"""Hostile trace files: forged .npy headers declaring huge shapes, truncated, non-zip, pickled, wrong kinds."""

from __future__ import annotations

import io
import os
import zipfile

import numpy as np
import pytest

from .conftest import LAW, assert_one_error, run_bounded


def _forge(dst, member: str, shape=None, dtype=None, src=LAW) -> str:
    """Copy the bundled trace, rewriting one member's .npy header (the data stays as it was)."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            data = zi.read(info)
            if info.filename == member + ".npy":
                f = io.BytesIO(data)
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                old_shape, fortran, old_dtype = read(f)
                header = io.BytesIO()
                np.lib.format.write_array_header_2_0(header, {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(dtype or old_dtype)), "fortran_order": fortran,
                    "shape": old_shape if shape is None else shape})
                data = header.getvalue() + data[f.tell():]
            zo.writestr(info.filename, data)
    return str(dst)


HUGE = [("expert_ids", (10**9, 26, 6), None), ("weights", (2**62, 2**62), None), ("seq_id", (10**12,), None),
        ("meta", (), "<U100000000"), ("format_version", (10**10,), None)]


@pytest.mark.parametrize("member,shape,dtype", HUGE, ids=[h[0] for h in HUGE])
def test_huge_declared_shapes_are_refused_in_process(trace_cli, tmp_path, member, shape, dtype):
    path = _forge(tmp_path / "huge.npz", member, shape, dtype)
    code, _, err = trace_cli("info", path)
    assert_one_error(code, err, "moe-trace", "huge.npz", repr(member))


def test_huge_declared_shape_in_a_bounded_process(tmp_path):
    """The command that once allocated 300 GB, under a 1 GiB heap limit: one line, fast."""
    path = _forge(tmp_path / "huge.npz", "expert_ids", (10**9, 26, 6))
    p = run_bounded("simulator.cli", ["replay", "--trace", path, "--device", "t4"], timeout=60)
    assert_one_error(p.returncode, p.stderr, "moe-sim", "'expert_ids' declares shape")


def test_object_dtype_is_refused_without_unpickling(trace_cli, tmp_path):
    path = _forge(tmp_path / "obj.npz", "seq_id", dtype=object)
    code, _, err = trace_cli("info", path)
    assert_one_error(code, err, "moe-trace", "seq_id", "Python objects")


def test_single_npy_with_huge_header_is_refused_before_reading(trace_cli, tmp_path):
    with open(tmp_path / "one.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    code, _, err = trace_cli("info", tmp_path / "one.npy")
    assert_one_error(code, err, "moe-trace", "single .npy array")


def _damaged(tmp_path) -> dict:
    raw = open(LAW, "rb").read()
    cases = {"empty.npz": b"", "text.npz": b"hello\n", "half.npz": raw[: len(raw) // 2],
             "tail.npz": raw[len(raw) // 2:], "pk-only.npz": b"PK\x03\x04" + bytes(100),
             "zeroed.npz": raw[:2000] + bytes(len(raw) - 4000) + raw[-2000:]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with zipfile.ZipFile(tmp_path / "nested.npz", "w") as z:  # a member that is itself a zip, named .npy
        z.writestr("expert_ids.npy", raw)
        z.writestr("format_version.npy", b"\x93NUMPY\x01\x00" + b"\xff" * 200)
    return cases


@pytest.mark.parametrize("name", ["empty.npz", "text.npz", "half.npz", "tail.npz", "pk-only.npz", "zeroed.npz",
                                  "nested.npz"])
def test_truncated_and_non_zip_files(trace_cli, sim, tmp_path, name):
    _damaged(tmp_path)
    code, _, err = trace_cli("info", tmp_path / name)
    assert_one_error(code, err, "moe-trace", name)
    code, _, err = sim("replay", "--trace", tmp_path / name, "--device", "t4")
    assert_one_error(code, err, "moe-sim", name)


def test_directory_and_device_as_trace(trace_cli, tmp_path):
    code, _, err = trace_cli("info", tmp_path)
    assert_one_error(code, err, "moe-trace", "is a directory")
    code, _, err = trace_cli("stats", "/dev/null")
    assert_one_error(code, err, "moe-trace", "/dev/null")
    os.mkfifo(tmp_path / "fifo.npz")  # opening it to read would wait for a writer forever
    code, _, err = trace_cli("info", tmp_path / "fifo.npz")
    assert_one_error(code, err, "moe-trace", "fifo.npz", "not a regular file")
