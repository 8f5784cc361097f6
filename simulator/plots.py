"""Plots of sweep results (matplotlib, Agg backend: no display needed).

``plot_sweep(rows, path)``: tokens/s against the budget (% of all experts), one
panel per (predictor, lookahead, scope), one line per eviction policy (colour),
one line style per device; per device the all-resident bound as a horizontal
dashed line and the best possible at each budget as a dotted black line.
Rows are the dicts ``sweep`` writes. This module knows nothing about replays.
"""

from __future__ import annotations

import os
from collections import defaultdict

from moe_runtime.outputs import write_atomic

STYLES = ("-", "--", "-.", ":")


def plot_sweep(rows: list[dict], path, title: str = "") -> str | None:
    """Write the PNG atomically and return its path; None when there is nothing to plot."""
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["predictor"], r["lookahead"] if r["predictor"] != "none" else 0, r["scope"])
                     for r in rows})
    devices = sorted({r["device"] for r in rows})
    policies = sorted({r["eviction"] for r in rows})
    colours = {p: f"C{i % 10}" for i, p in enumerate(policies)}
    n = len(panels)
    cols = min(3, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False, sharey=True)
    for ax, (pred, la, scope) in zip(axes.flat, panels):
        sel = [r for r in rows if r["predictor"] == pred and r["scope"] == scope
               and (pred == "none" or r["lookahead"] == la)]
        lines = defaultdict(list)
        for r in sel:
            lines[(r["device"], r["eviction"])].append((100 * r["budget_fraction"], r["tokens_per_s"]))
        for (dev, pol), pts in sorted(lines.items()):
            pts.sort()
            ax.plot(*zip(*pts), STYLES[devices.index(dev) % len(STYLES)], color=colours[pol], marker="o",
                    ms=3, label=pol if len(devices) == 1 else f"{pol} ({dev})")
        for i, dev in enumerate(devices):
            drows = [r for r in sel if r["device"] == dev]
            if not drows:
                continue
            ax.axhline(drows[0]["all_resident_tokens_per_s"], color="grey", ls="--", lw=1,
                       label="all resident" if len(devices) == 1 else f"all resident ({dev})")
            best = sorted({(100 * r["budget_fraction"], r["best_tokens_per_s"]) for r in drows})
            ax.plot(*zip(*best), ":", color="black", lw=1.2,
                    label="best possible" if len(devices) == 1 else f"best possible ({dev})")
        ax.set_title(f"predictor {pred}" + (f", lookahead {la}" if pred != "none" else "") + f", {scope}",
                     fontsize=9)
        ax.set_xlabel("expert budget (% of all experts)")
        ax.set_ylabel("tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = os.fspath(path)
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path
