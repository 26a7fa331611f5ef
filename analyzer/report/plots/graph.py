"""Drawings of the recorded function graph: a layered layout in numpy, the graph drawn with matplotlib
(when Graphviz ``dot`` is not used) and bar charts of the cost per module. The data (tables, DOT
text) is :mod:`analyzer.graph`."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ...graph import COLORS, fmt_flops, node_category, node_label
from .common import mpl, new_figure, save, text


def layered_layout(g: dict) -> tuple[np.ndarray, np.ndarray]:
    """Positions for drawing: level = longest path from a source (node ids are a topological order,
    every edge goes from a lower to a higher id); within a level nodes are spread in id order.

    Returns:
        (x, y) float arrays of length n_nodes; y = -level, x centred on 0 with unit spacing.
    """
    n = len(g["nodes"])
    level = np.zeros(n, np.int64)
    src = np.array([e["src"] for e in g["edges"]], np.int64)
    dst = np.array([e["dst"] for e in g["edges"]], np.int64)
    order = np.argsort(dst, kind="stable")
    for s, d in zip(src[order], dst[order]):  # edges in increasing dst: sources final before use
        level[d] = max(level[d], level[s] + 1)
    x = np.zeros(n, np.float64)
    for lv in np.unique(level):
        idx = np.flatnonzero(level == lv)
        x[idx] = np.arange(len(idx)) - (len(idx) - 1) / 2.0
    return x, -level.astype(np.float64)


def draw(g: dict, path: str) -> str:
    """Draw the graph with matplotlib (layered layout) into the PNG ``path``; returns it."""
    plt, _ = mpl()
    x, y = layered_layout(g)
    n = len(x)
    w = max(6.0, min(40.0, 2.2 * (np.ptp(x) + 1) if n else 6.0))
    h = max(4.0, min(80.0, 1.0 * (np.ptp(y) + 1) if n else 4.0))
    fig, ax = plt.subplots(figsize=(w, h), layout="constrained")
    for e in g["edges"]:
        ax.annotate("", xy=(x[e["dst"]], y[e["dst"]] + 0.18), xytext=(x[e["src"]], y[e["src"]] - 0.18),
                    arrowprops={"arrowstyle": "->", "color": "#555555", "lw": 0.8})
    fs = 8 if n < 60 else 6
    for nd in g["nodes"]:
        i = nd["id"]
        ax.text(x[i], y[i], text(node_label(nd)), ha="center", va="center", fontsize=fs,
                bbox={"boxstyle": "round,pad=0.3", "fc": COLORS[node_category(nd)], "ec": "#333333", "lw": 0.6})
    ax.set_xlim(x.min() - 1 if n else -1, x.max() + 1 if n else 1)
    ax.set_ylim(y.min() - 0.7 if n else -1, 0.7)
    ax.axis("off")
    ax.set_title(f"Function graph: {n} ops ({fmt_flops(g.get('total_flops', 0))} FLOPs)")
    return save(fig, path)


def cost_bars(mods: pd.DataFrame, col: str, path: str, max_depth: int | None = None) -> str | None:
    """Bar chart of ``col`` ("flops" or "time_s") per module at the smallest depth > 0 that
    splits the model (or ``max_depth``), in call order; None when there is nothing finite to draw."""
    d = mods[mods["depth"] > 0]
    if not len(d):
        d = mods
    depth = int(d["depth"].min()) if max_depth is None else int(max_depth)
    d = d[d["depth"] <= depth]
    vals = d[col].to_numpy(np.float64)
    if not len(d) or not np.isfinite(vals).any():
        return None
    fig, axes = new_figure(width=max(6.0, 0.35 * len(d) + 3), height=4.5)
    ax = axes[0, 0]
    lab = [text(f"{nm} ({tp})") for nm, tp in zip(d["name"], d["type"])]
    y = vals * (1e3 if col == "time_s" else 1.0)
    ax.bar(np.arange(len(lab)), y, width=0.8, color="#4c72b0" if col == "flops" else "#55a868")
    ax.set_xlim(-0.5, len(lab) - 0.5)
    ax.xaxis.grid(False)
    ax.set_xticks(range(len(lab)))
    ax.set_xticklabels(lab, rotation=90 if len(lab) > 4 else 0, fontsize="small")
    ax.set_xlabel("module (depth <= %d)" % depth)
    ax.set_ylabel("FLOPs per forward" if col == "flops" else "forward time (ms, median, inclusive)")
    ax.set_title("FLOPs per module" if col == "flops" else "Forward time per module")
    return save(fig, path)
