"""Fidelity: does the simulator predict the executor's decode time? (target: within 10%)

    python3 benchmarks/fidelity.py [--work out/fidelity] [--tokens 96] [--device cpu]

1. writes a tiny random Mixtral-style checkpoint (``moe-runtime make-tiny``),
2. profiles this machine with it (``moe-runtime profile --device D --model DIR``:
   copy bandwidth/latency, layer compute; a device YAML in the simulator's schema),
3. for several expert budgets and predictors, decodes with the executor
   (``moe-runtime generate --budget B --policy lru --predictor P --record-trace T
   --json``; sampling at temperature 1 so routing varies) and records the trace,
4. replays each trace with the same budget/policy/predictor/lookahead on the
   profile (``moe-sim replay --device PROFILE --json``) and prints simulated vs
   measured decode time (the executor's ``decode_s``; the replay's
   ``phase_s.decode``: steps whose token was recorded as decode), the error, and
   both miss counts. Measured times are the median of ``--repeats`` runs.

Only the public commands are used, so this checks the documented interfaces too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

TARGET = 0.10


def sh(*argv: str) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"command failed ({r.returncode}): {' '.join(argv)}\n{r.stderr.strip()}")
    return r.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="out/fidelity", help="directory for the checkpoint, profile and traces")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per decode")
    ap.add_argument("--budgets", default="8,16,32,64", help="expert budgets (counts; the tiny model has 64)")
    ap.add_argument("--predictors", default="none,history")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny-mixtral"
    if not (model / "config.json").is_file():
        sh("moe-runtime", "make-tiny", "--family", "mixtral", "--out", str(model))
    profile = work / f"{args.device}-profile.yaml"
    sh("moe-runtime", "profile", "--device", args.device, "--model", str(model), "--out", str(profile))
    print(f"profile {profile}:\n  " + Path(profile).read_text().strip().replace("\n", "\n  "))
    common = ["--policy", "lru", "--lookahead", "1", "--max-inflight", "4"]
    print(f"\n{'budget':>6} {'predictor':>9} {'measured s':>11} {'simulated s':>12} {'error':>7} "
          f"{'misses (exec / sim)':>20} {'late (exec / sim)':>18}")
    errors = []
    for pred in args.predictors.split(","):
        for b in args.budgets.split(","):
            trace = work / f"trace-{pred}-{b}.npz"
            runs = []
            for r in range(args.repeats):
                out = sh("moe-runtime", "generate", "--model", str(model), "--prompt-ids", "1",
                         "--max-new-tokens", str(args.tokens), "--temperature", "1.0", "--seed", str(args.seed),
                         "--device", args.device, "--budget", b, "--predictor", pred, *common,
                         *(["--record-trace", str(trace)] if r == 0 else []), "--json")
                runs.append(json.loads(out.strip().splitlines()[-1]))
            measured = statistics.median(x["decode_s"] for x in runs)
            sim = json.loads(sh("moe-sim", "replay", "--trace", str(trace), "--model", str(model),
                                "--device", str(profile), "--budget", b, "--eviction", "lru", "--predictor", pred,
                                "--lookahead", "1", "--max-inflight", "4", "--json"))
            simulated = sim["phase_s"]["decode"]
            err = simulated / measured - 1
            errors.append(abs(err))
            print(f"{b:>6} {pred:>9} {measured:>11.4f} {simulated:>12.4f} {100 * err:>6.1f}% "
                  f"{runs[0]['misses']:>9} / {sim['misses']:<8} {runs[0]['late']:>7} / {sim['late']:<8}")
    worst, mean = max(errors), statistics.mean(errors)
    print(f"\nmean |error| {100 * mean:.1f}%, worst {100 * worst:.1f}% (target within {100 * TARGET:.0f}%: "
          f"{'met' if worst <= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
