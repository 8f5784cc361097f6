"""Plots of sweep results (matplotlib, Agg backend: no display needed).

``plot_sweep(rows, path)``: a grid of panels, a row per trace and a column per
predictor (``none`` first, then in order of appearance); in a panel, tokens/s
against the budget (% of all experts), one colour per eviction policy and one
line style per (lookahead, scope, device); per (scope, device) the all-resident
bound as a grey dashed line, the copy-only best possible at each budget as a
dotted black line and, where rows carry it, the hybrid best possible (copy or
compute on the host) as a dash-dotted black line. With several miss policies
(or hosts, or host layers) a line's name adds them: "lru / auto". Rows are the dicts ``sweep`` writes (rows of old results have no
``trace``: one row of panels). This module knows nothing about replays.
"""

from __future__ import annotations

import os
from collections import defaultdict

from moe_runtime.core.outputs import write_atomic

STYLES = ("-", "--", "-.", ":")


def plot_sweep(rows: list[dict], path, title: str = "") -> str | None:
    """Write the PNG atomically and return its path; None when there is nothing to plot."""
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(r.get("trace") or "" for r in rows))
    preds = list(dict.fromkeys(r["predictor"] for r in rows))
    preds.sort(key=lambda p: p != "none")  # stable: none first, the others as they came
    variants = sorted({(r["lookahead"] if r["predictor"] != "none" else 0, r["scope"], r["device"]) for r in rows})
    hyb = [k for k in ("miss_policy", "host_profile", "n_host_layers")
           if len({r.get(k) for r in rows if r.get(k) is not None}) > 1]  # copy-only rows name no host

    def line_name(r) -> str:
        return " / ".join([r["eviction"], *(f"h{r[k]}" if k == "n_host_layers" else str(r[k])
                                            for k in hyb if r.get(k) is not None)])
    policies = sorted({line_name(r) for r in rows})
    colours = {p: f"C{i % 10}" for i, p in enumerate(policies)}
    fig, axes = plt.subplots(len(traces), len(preds), figsize=(4.6 * len(preds), 3.6 * len(traces)),
                             squeeze=False)
    for i, tr in enumerate(traces):
        for j, pred in enumerate(preds):
            ax = axes[i][j]
            sel = [r for r in rows if (r.get("trace") or "") == tr and r["predictor"] == pred]
            lines = defaultdict(list)
            for r in sel:
                la = r["lookahead"] if pred != "none" else 0
                lines[(line_name(r), la, r["scope"], r["device"])].append(
                    (100 * r["budget_fraction"], r["tokens_per_s"]))
            for (pol, la, scope, dev), pts in sorted(lines.items()):
                pts.sort()
                style = STYLES[variants.index((la, scope, dev)) % len(STYLES)]
                extra = ", ".join(x for x in (f"la {la}" if la else "", scope if len(variants) > 1 else "",
                                              dev if len({v[2] for v in variants}) > 1 else "") if x)
                ax.plot(*zip(*pts), style, color=colours[pol], marker="o", ms=3,
                        label=pol + (f" ({extra})" if extra else ""))
            for scope, dev in sorted({(r["scope"], r["device"]) for r in sel}):
                drows = [r for r in sel if r["scope"] == scope and r["device"] == dev]
                ax.axhline(drows[0]["all_resident_tokens_per_s"], color="grey", ls="--", lw=1,
                           label="all resident")
                best = sorted({(100 * r["budget_fraction"], r["best_tokens_per_s"]) for r in drows})
                ax.plot(*zip(*best), ":", color="black", lw=1.2, label="best possible, copy-only")
                hb = sorted({(100 * r["budget_fraction"], r["best_hybrid_tokens_per_s"]) for r in drows
                             if r.get("best_hybrid_tokens_per_s")})
                if hb:
                    ax.plot(*zip(*hb), "-.", color="black", lw=1.2, label="best possible, hybrid")
            name = os.path.basename(tr)
            ax.set_title((f"{name}: " if name else "") + f"predictor {pred}", fontsize=9)
            ax.set_xlabel("expert budget (% of all experts)")
            ax.set_ylabel("tokens/s")
            ax.grid(alpha=0.3)
            if sel:
                ax.legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path
