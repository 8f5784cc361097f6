"""`moe-runtime profile`: its flags and the YAML it writes; the measurements are ``offload/profile.py``'s
(see its docstring for what each field means)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import yaml

from moe_runtime.core.errors import MoeError
from moe_runtime.core.flags import add_option_flags, integer
from moe_runtime.core.options import OffloadOptions, parse_expert_source
from moe_runtime.core.outputs import FORCE_HELP, check_output, write_text_atomic
from moe_runtime.model.device import check_fits, use_cpu_threads
from moe_runtime.offload.packed import read_header
from moe_runtime.offload.profile import (interleaved_rounds, measure_copy, measure_copy_slowdown, measure_handoff,
                                         measure_hbm, measure_layer_compute, measure_protocol, measure_tflops,
                                         memory_gib, peak_bytes, rounds_summary)
from moe_runtime.offload.session import ExecutorOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", required=True, choices=["cpu", "cuda"], help="device to profile")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (config.json + safetensors)")
    src.add_argument("--model-config", help="model spec YAML or name in configs/models (synthetic weights)")
    p.add_argument("--layers", type=integer(1), default=2, help="MoE layers of a synthetic model (default 2)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: the checkpoint's; bfloat16 on cuda and float32 on cpu "
                        "for --model-config)")
    p.add_argument("--repeats", type=integer(1, 10000), default=10,
                   help="copies timed per size and round (default 10)")
    p.add_argument("--rounds", type=integer(1, 1000), default=5,
                   help="interleaved rounds of the copy, memory, matmul and layer measurements; each figure is "
                        "the median of its rounds, and a wide spread is warned about (default 5)")
    p.add_argument("--vocab", type=integer(1), default=None,
                   help="vocabulary of a synthetic model (default: the spec's; the LM head of a cut-down "
                        "model must match the one it predicts)")
    # the storage link is measured too with a disk source: direct-I/O reads of the model's experts where a
    # run reads them (a synthetic model's experts are packed beside --out for it)
    add_option_flags(p, OffloadOptions, only=("expert_source",))
    add_option_flags(p, ExecutorOptions, only=("read_depth",))
    p.add_argument("--name", default=None, help="profile name (default: <device>-profiled)")
    p.add_argument("--out", help="YAML file to write (default: print)")
    p.add_argument("--host-out", metavar="FILE",
                   help="also measure this host's expert compute (the executor's host kernels, every expert format, "
                        "batches 1-32, at the model's expert shape) and write it as a host profile "
                        "(--host-profile FILE in generate, replay, sweep and plan)")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoeError("--device cuda requested but CUDA is not available")
    inputs = [args.model, args.model_config, parse_expert_source(args.expert_source)[1]]
    if args.out:
        check_output(args.out, "--out", inputs=inputs,
                     kind="device profile", force=args.force)  # before minutes of measuring
    if args.host_out:
        if args.out and Path(args.out).resolve() == Path(args.host_out).resolve():
            raise MoeError(f"--out and --host-out name the same file ({args.out}): give each its own")
        check_output(args.host_out, "--host-out", inputs=inputs,
                     kind="host profile", force=args.force)
    kind, packed = parse_expert_source(args.expert_source)
    if kind == "memory" and args.read_depth != ExecutorOptions.read_depth:
        raise MoeError("--read-depth sets the storage reads in flight: give --expert-source disk too")
    if packed is not None:
        read_header(packed)  # a missing, foreign or truncated file is refused before measuring
    use_cpu_threads(device)  # as the executor runs: a core left to the copy thread
    from moe_runtime.model.checkpoint import DTYPES, load_model

    if args.model:
        from moe_runtime.model.checkpoint import checkpoint_dtype
        from moe_runtime.core.model_config import load_config

        check_fits(f"profiling {args.model}", peak_bytes(load_config(args.model),
                                                         checkpoint_dtype(args.model, args.dtype)), device)
        model, store = load_model(args.model, device, DTYPES[args.dtype] if args.dtype else None)
        model_name = os.path.basename(os.path.normpath(args.model))
    else:
        from moe_runtime.core.shapes import load_model_spec
        from moe_runtime.model.synthetic import config_from_spec, synthetic_model

        spec = load_model_spec(args.model_config)
        dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        cfg = config_from_spec(spec, args.layers)
        if args.vocab:
            import dataclasses
            cfg = dataclasses.replace(cfg, vocab_size=args.vocab)
        check_fits(f"a synthetic {spec.name} of {cfg.n_moe_layers} MoE layers (--layers {args.layers})",
                   peak_bytes(cfg, dtype), device)
        model, store = synthetic_model(cfg, device, dtype)
        model_name = spec.name
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    # one slot for every expert, reused by each compute measurement (allocating it is not what is timed)
    pool = torch.empty(store.n_moe_layers * store.n_experts, store.layout.numel, dtype=store.layout.dtype,
                       device=device)
    samples = interleaved_rounds({  # each round measures each in turn: a slow spell hits them all alike
        "copy": lambda: dict(zip(("h2d_bandwidth_gbps", "h2d_latency_us"),
                                 measure_copy(store.layout.numel, store.layout.dtype, device, args.repeats))),
        "hbm": lambda: {"hbm_bandwidth_gbps": measure_hbm(device)},
        "matmul": lambda: {"peak_tflops": measure_tflops(device)},
        "layer": lambda: {"layer_compute_ms": measure_layer_compute(model, store, device, steps=8, pool=pool)},
    }, args.rounds)
    med, spread, warning = rounds_summary(samples, {"h2d_bandwidth_gbps": "host-to-device GB/s",
                                                    "hbm_bandwidth_gbps": "device-memory GB/s",
                                                    "peak_tflops": "TFLOP/s", "layer_compute_ms": "ms per layer"})
    if warning:
        print(f"moe-runtime: {warning}", file=sys.stderr)
    gbps, latency_us = med["h2d_bandwidth_gbps"], med["h2d_latency_us"]
    handoff_us = measure_handoff(device)
    latency_us = max(latency_us - handoff_us, 0.0)  # the hand-off is charged once per waiting layer instead
    host_us, pred_us = measure_protocol(store.n_moe_layers, store.n_experts, store.top_k)

    def slowdown(link=None) -> float:
        return measure_copy_slowdown(model, store, device, pool=pool, link=link)
    # on a CPU the storage link is the link of a run from disk (two tiers): its reads are what slows compute
    storage = measure_storage(args.model, packed, args.read_depth, args.out, store,
                              slowdown if device.type == "cpu" else None) if kind == "disk" else {}
    read_note = storage.pop("_read", "")
    copy_slowdown = storage.pop("_slowdown") if "_slowdown" in storage else slowdown()
    profile = {
        "name": args.name or f"{args.device}-profiled",
        "nominal": False,
        "h2d_bandwidth_gbps": round(gbps, 3),
        "h2d_latency_us": round(latency_us, 2),
        "copy_engines": 1,
        "hbm_bandwidth_gbps": round(med["hbm_bandwidth_gbps"], 2),
        "peak_tflops": round(med["peak_tflops"], 4),
        "memory_gib": round(memory_gib(device), 2),
        "layer_compute_ms": round(med["layer_compute_ms"], 4),
        "host_layer_us": round(host_us, 2),
        "demand_us": round(handoff_us, 2),
        "copy_slowdown": round(copy_slowdown, 4),
        "predictor_us": pred_us,
        **storage,
        "model": model_name,
        "source": f"moe-runtime profile on {name}: expert copies of {store.layout.nbytes} bytes "
                  f"({store.layout.dtype}), {args.repeats} repeats, "
                  + ("pinned host to device on the copy stream" if device.type == "cuda"
                     else "host to host on the copy thread") + read_note
                  + f"; medians of {args.rounds} interleaved rounds, spread (max-min)/median: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in spread.items()),
    }
    text = yaml.safe_dump(profile, sort_keys=False)
    if args.out:
        write_text_atomic(args.out, text)
        print(f"wrote {args.out}: {gbps:.2f} GB/s, {latency_us:.1f} us per copy, "
              f"{profile['layer_compute_ms']} ms per MoE layer")
    else:
        print(text, end="")
    if args.host_out:
        write_host_profile(args.host_out, f"{args.name or 'this-host'}", store.layout)
    return 0


def write_host_profile(path: str, name: str, layout) -> None:
    """Measure this host's expert compute at ``layout``'s shape and write it as a host profile."""
    from moe_runtime.offload.host_bench import host_profile_yaml, measure_host

    run = measure_host(layout.hidden_size, layout.intermediate_size, reps=10)
    write_text_atomic(path, host_profile_yaml([run], name))
    best = {r["format"]: r["gbps"] for r in run["rows"] if r["batch"] == 1}
    print(f"wrote {path}: memcpy {run['memcpy_gbps']:.1f} GB/s; one expert at 1 token: "
          + ", ".join(f"{f} {g:.2f} GB/s" for f, g in best.items()))


def measure_storage(model_dir: str | None, packed: str | None, read_depth: int, out: str | None, store,
                    slowdown=None) -> dict:
    """The storage link's profile fields: direct-I/O read bandwidth at ``read_depth`` reads in flight and
    one read's latency, reading the model's experts where a run reads them (``packed``, or the checkpoint
    ``model_dir``'s own files; a synthetic model's first layer packed beside ``out``); with ``slowdown`` (a
    CPU), also ``_slowdown``: ``slowdown(link)`` with reads as the link's work."""
    import tempfile

    from moe_runtime.offload.packed import write_packed
    from moe_runtime.offload.storage import measure_read
    from moe_runtime.offload.tiers import disk_source

    nbytes, scratch = store.layout.nbytes, None
    if model_dir:  # the experts where a run reads them: the packed file, or the checkpoint's own files
        src = disk_source(model_dir, store, packed)
        paths = src.paths
        segs = [src.segments(m, e) for m in range(store.n_moe_layers) for e in range(store.n_experts)]
    else:  # a synthetic model: its first layer's experts (up to 32) packed on this disk, removed after
        scratch = tempfile.mkdtemp(prefix="moe-profile-", dir=os.path.dirname(os.path.abspath(out or ".")))
        path = os.path.join(scratch, "experts.pack")
        n = min(store.n_experts, 32)
        write_packed(path, fingerprint="profile", dtype=str(store.layout.dtype).removeprefix("torch."),
                     record_bytes=nbytes, n_moe_layers=1, n_experts=n,
                     layers=[store.layer_buffer(0)[:n].contiguous().view(torch.uint8).numpy().reshape(n, -1)])
        hdr = read_header(path)
        paths, segs = [path], [hdr.segments(0, e) for e in range(n)]
    extra = {}
    try:
        gbps, alone_s, mode = measure_read(paths, segs, nbytes, depth=read_depth)
        if slowdown is not None:
            extra["_slowdown"] = slowdown(lambda: measure_read(paths, segs, nbytes, depth=read_depth,
                                                               seconds=1.0))
    finally:
        if scratch is not None:
            import shutil
            shutil.rmtree(scratch, ignore_errors=True)
    latency_us = max(alone_s - nbytes / (gbps * 1e9), 0.0) * 1e6
    return {**extra, "read_bandwidth_gbps": round(gbps, 3), "read_latency_us": round(latency_us, 2),
            "read_queue_depth": read_depth, "_read": f"; storage reads of {nbytes} bytes, {mode} I/O, "
                                                          f"{read_depth} in flight"}


