"""`moe-trace`: import, inspect, measure and synthesise routing traces.

Subcommands: ``import`` (other systems' routing -> trace), ``info`` (shape and
metadata), ``stats`` (popularity, locality, cross-layer predictability, reuse),
``synth`` (synthetic traces, optionally fitted to a real one with ``--like``).
Bad input prints one line ``moe-trace: error: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from moe_runtime.core.flags import SEED, integer, number
from moe_runtime.core.errors import ArgumentParser, MoeError, run_cli
from moe_runtime.core.outputs import FORCE_HELP, check_output
from moe_runtime.core.shapes import load_model_spec
from moe_runtime.traces import TraceMeta, load_trace, save_trace
from moe_runtime.traces.format import trace_summary
from moe_runtime.traces.importers import import_routing
from moe_runtime.traces.stats import compute_stats, format_stats, phase_counts
from moe_runtime.traces.synth import TARGETS, SynthKnobs, fit_knobs, headline, synth_trace

PROG = "moe-trace"


def _emit(obj: dict, as_json: bool, text: str) -> None:
    try:
        print(json.dumps(obj, indent=2) if as_json else text)
        sys.stdout.flush()
    except BrokenPipeError:  # `moe-trace info X | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cmd_import(args) -> int:
    check_output(args.out, "--out", inputs=[args.src, args.model], kind="trace", force=args.force)  # before the work
    spec = load_model_spec(args.model)
    result = import_routing(args.src, spec, source=args.source)
    save_trace(result.trace, args.out)
    t = result.trace
    obj = {"out": args.out, "format": result.source_format, "model": spec.name, "tokens": t.n_tokens,
           "dropped_tokens": result.dropped_tokens, "dropped": [list(d) for d in result.dropped],
           "sequences": len(t.sequences())}
    text = f"{args.out}: {t.n_tokens} tokens in {obj['sequences']} sequences from {args.src} ({result.source_format})"
    if result.dropped_tokens:
        text += (f"\ndropped {result.dropped_tokens} token(s) missing layers (sequence, token, layers present): "
                 + ", ".join(str(tuple(d)) for d in result.dropped))
    _emit(obj, args.json, text)
    return 0


def trace_info(path: str) -> dict:
    """Read lazily (``trace_summary``): the routing arrays are never decompressed, only what info shows."""
    t = trace_summary(path)
    lens = np.array([b - a for _, a, b in t.sequences()] or [0])
    m = t.meta
    return {"file": path, "model": m.model, "source": m.source, "tokens": t.n_tokens, "layers": m.n_layers,
            "experts": m.n_experts, "top_k": m.top_k, "expert_bytes": m.expert_bytes, "dtype": m.dtype,
            "sequences": len(t.sequences()),
            "sequence_lengths": {"min": int(lens.min()), "median": float(np.median(lens)), "max": int(lens.max())},
            "phases": phase_counts(t),
            "predictors": {k: {"lookahead": int(v[2]), "per_distance": int(v[3])} for k, v in t.predictions.items()},
            "extra": m.extra}


def cmd_info(args) -> int:
    i = trace_info(args.file)
    sl = i["sequence_lengths"]
    preds = ", ".join(f"{k} (lookahead {v['lookahead']}, {v['per_distance']} per distance)"
                      for k, v in i["predictors"].items()) or "none"
    extra = ", ".join(f"{k}={v}" if len(str(v)) <= 60 else f"{k}=<{len(v)} items>" for k, v in i["extra"].items())
    text = "\n".join([
        f"file          {i['file']}",
        f"model         {i['model']} ({i['dtype']}, {i['expert_bytes']:,} bytes per expert)",
        f"source        {i['source']}",
        f"shape         {i['tokens']} tokens x {i['layers']} MoE layers x top-{i['top_k']} of {i['experts']} experts",
        f"sequences     {i['sequences']} (length min {sl['min']}, median {sl['median']:g}, max {sl['max']})",
        f"phases        {i['phases']['prefill']} prefill, {i['phases']['decode']} decode",
        f"predictors    {preds}",
        f"extra         {extra or 'none'}"])
    _emit(i, args.json, text)
    return 0


def cmd_stats(args) -> int:
    s = compute_stats(load_trace(args.file), with_reuse=not args.no_reuse)
    _emit(s.to_dict(), args.json, format_stats(s))
    return 0


def _synth_meta(args, like) -> TraceMeta:
    """Shape from --like's trace, else --model, else the explicit flags; explicit flags must agree."""
    if like is not None and args.model:  # --model names the trace's model; it must have --like's shape
        base = TraceMeta.for_spec(load_model_spec(args.model), source="")
        mine, theirs = (base.n_layers, base.n_experts, base.top_k), (like.n_layers, like.n_experts, like.top_k)
        if mine != theirs:
            raise MoeError(f"--model {args.model} has {mine[0]} MoE layers x {mine[1]} experts, top-{mine[2]}, but the "
                           f"--like trace {theirs[0]} x {theirs[1]}, top-{theirs[2]}; drop one of them")
    elif like is not None:
        base = like.meta
    elif args.model:
        base = TraceMeta.for_spec(load_model_spec(args.model), source="")
    else:
        missing = [f for f in ("layers", "experts", "top_k") if getattr(args, f) is None]
        if missing:
            raise MoeError("give --model, --like, or all of --layers, --experts, --top-k "
                           f"(missing: {', '.join('--' + m.replace('_', '-') for m in missing)})")
        base = TraceMeta(model="synthetic", n_layers=args.layers, n_experts=args.experts, top_k=args.top_k,
                         expert_bytes=0, dtype="unknown", source="")
    shape = {"layers": base.n_layers, "experts": base.n_experts, "top_k": base.top_k}
    for flag, value in shape.items():
        given = getattr(args, flag)
        if given is not None and given != value and (like is not None or args.model):
            raise MoeError(f"--{flag.replace('_', '-')} {given} contradicts the model's {value}")
    return base


def cmd_synth(args) -> int:
    check_output(args.out, "--out", inputs=[args.like, args.model], kind="trace", force=args.force)
    like = load_trace(args.like) if args.like else None
    explicit = {k: getattr(args, k) for k in ("skew", "locality", "correlation") if getattr(args, k) is not None}
    if like is not None and explicit:
        raise MoeError(f"--like fits the knobs itself; drop {', '.join('--' + k for k in explicit)}")
    base = _synth_meta(args, like)
    knobs = fit_knobs(like, seed=args.seed) if like is not None else SynthKnobs(**explicit)
    n_tokens = args.tokens if args.tokens is not None else (like.n_tokens if like is not None else 1000)
    seq_len = args.seq_len
    if seq_len is None and like is not None:
        seq_len = max(1, round(like.n_tokens / len(like.sequences())))
    source = (f"synthetic (skew={knobs.skew}, locality={knobs.locality}, correlation={knobs.correlation}, "
              f"seed={args.seed})" + (f" fitted to {args.like}" if like is not None else ""))
    meta = TraceMeta(model=base.model, n_layers=base.n_layers, n_experts=base.n_experts, top_k=base.top_k,
                     expert_bytes=base.expert_bytes, dtype=base.dtype, source=source,
                     extra={"synth": {"skew": knobs.skew, "locality": knobs.locality,
                                      "correlation": knobs.correlation, "seed": args.seed, "seq_len": seq_len}})
    trace = synth_trace(meta, n_tokens, knobs, args.seed, seq_len)
    save_trace(trace, args.out)
    obj = {"out": args.out, "tokens": n_tokens, "knobs": {"skew": knobs.skew, "locality": knobs.locality,
                                                           "correlation": knobs.correlation}, "seed": args.seed}
    text = f"{args.out}: {n_tokens} synthetic tokens, {source}"
    if like is not None:
        real, synth = headline(like), headline(trace)
        untuned = headline(synth_trace(meta, n_tokens, SynthKnobs(), args.seed, seq_len))
        num = lambda v: None if not np.isfinite(v) else round(float(v), 4)  # noqa: E731  (JSON has no NaN)
        obj["fit"] = {s: {"real": num(real[s]), "synth": num(synth[s]), "untuned": num(untuned[s])}
                      for s in TARGETS}
        rows = [f"{'statistic':<20} {'real':>7} {'synth':>7} {'untuned':>8}"]
        rows += [f"{s:<20} {real[s]:>7.3f} {synth[s]:>7.3f} {untuned[s]:>8.3f}" for s in TARGETS]
        text += "\n" + "\n".join(rows)
    _emit(obj, args.json, text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("import", help="convert recorded routing (ESFT npz or routing JSONL) to a trace")
    s.add_argument("src", help="routing file; its format is detected from its content")
    s.add_argument("--model", required=True, help="model name in configs/models/ or a model YAML path")
    s.add_argument("--out", required=True, help="trace file to write (.npz)")
    s.add_argument("--source", help="provenance to store as meta.source (default: a description of SRC)")
    s.add_argument("--force", action="store_true", help=FORCE_HELP)
    s.set_defaults(fn=cmd_import)

    s = sub.add_parser("info", help="shape, sequences, phases, predictors and metadata of a trace")
    s.add_argument("file")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("stats", help="popularity entropy, adjacent overlap, cross-layer recall, reuse")
    s.add_argument("file")
    s.add_argument("--no-reuse", action="store_true", help="skip the reuse-distance pass (the slow part)")
    s.set_defaults(fn=cmd_stats)

    s = sub.add_parser("synth", help="generate a synthetic trace (optionally fitted to a real one)")
    s.add_argument("--out", required=True, help="trace file to write (.npz)")
    s.add_argument("--tokens", type=integer(1), help="tokens to generate (default: --like's count, else 1000)")
    s.add_argument("--layers", type=integer(1), help="MoE layers (default: from --model / --like)")
    s.add_argument("--experts", type=integer(1), help="experts per layer (default: from --model / --like)")
    s.add_argument("--top-k", type=integer(1), dest="top_k", help="experts per token and layer")
    s.add_argument("--skew", type=number(0, 10), help="Zipf exponent of per-layer popularity (default 0: uniform)")
    s.add_argument("--locality", type=number(0, 1), help="P(reuse the previous token's expert at a layer), 0..1")
    s.add_argument("--correlation", type=number(0, 1), help="P(follow the previous layer's expert mapping), 0..1")
    s.add_argument("--seed", type=SEED, default=0, help="random seed (same seed, same trace)")
    s.add_argument("--seq-len", type=integer(1), dest="seq_len", help="tokens per sequence (default: all in one)")
    s.add_argument("--model", help="model name or YAML for shape and metadata")
    s.add_argument("--like", help="real trace to fit skew/locality/correlation and shape to")
    s.add_argument("--force", action="store_true", help=FORCE_HELP)
    s.set_defaults(fn=cmd_synth)

    for name, action in sub.choices.items():
        action.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def main(argv: list[str] | None = None) -> None:
    def body():
        args = build_parser().parse_args(argv)  # inside: Ctrl-C while importing is one line too
        return args.fn(args)
    run_cli(body, PROG)


if __name__ == "__main__":
    main(sys.argv[1:])
