"""The module graph picture of the report: the modules that split the model at a depth, repeated blocks
collapsed into one box (``h.0-11 x12``), drawn with matplotlib (no Graphviz) to fit a screen 1280 px
wide. The data is :func:`analyzer.graph.module_graph`; the full op graph stays in graph.dot.

The boxes are placed before drawing (a layered layout in inches on axes filling the figure), so that
:func:`node_areas` tells the page where each box is, for a tooltip with its members' full names.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pandas as pd

from ...graph import fmt_flops
from .common import mpl, palette, text, theme
from .overview import short_names

#: widest picture (inches at 100 dpi: 1250 px, inside a 1280-px screen's page)
MAX_WIDTH = 12.5
#: box size and the gaps between boxes (inches)
BOX_W, BOX_H, GAP_X, GAP_Y = 2.05, 0.62, 0.25, 0.38
#: most levels in one column before the picture wraps into another column
MAX_LEVELS = 12
#: margins (inches): the title above, a little room around
TOP, MARGIN = 0.55, 0.15
#: characters of a box line
CHARS = 26


class GraphLayout(NamedTuple):
    """Where the boxes go: centre x and y (inches from the bottom left) per node id, the figure size."""

    x: np.ndarray
    y: np.ndarray
    width: float
    height: float


def _levels(n: int, edges: list) -> np.ndarray:
    """Longest path from a source, per node (edges of a DAG; a node on a cycle keeps what it had); a
    source other than the input sits just above its first consumer (a GPT-2's position embedding
    beside the token embedding, not beside the input, so no arrow crosses a box)."""
    level = np.zeros(n, np.int64)
    for _ in range(n):
        changed = False
        for a, b in edges:
            if level[b] < level[a] + 1:
                level[b] = level[a] + 1
                changed = True
        if not changed:
            break
    has_pred = {b for _, b in edges}
    for i in range(1, n):
        succ = [level[b] for a, b in edges if a == i]
        if i not in has_pred and succ:
            level[i] = max(0, min(succ) - 1)
    return level


def graph_layout(mg: dict) -> GraphLayout:
    """Layered layout of a module graph: levels (longest path) top to bottom; a level with more boxes
    than fit the width is spread over several rows; more than :data:`MAX_LEVELS` rows wrap into
    columns side by side (as many as fit :data:`MAX_WIDTH`)."""
    n = len(mg["nodes"])
    level = _levels(n, mg["edges"])
    per_row = max(1, int((MAX_WIDTH - 2 * MARGIN + GAP_X) // (BOX_W + GAP_X)))
    rows: list[list[int]] = []
    for lv in range(int(level.max()) + 1 if n else 0):
        ids = [i for i in range(n) if level[i] == lv]
        rows += [ids[k:k + per_row] for k in range(0, len(ids), per_row)]
    cols, per_col = 1, max(1, len(rows))
    while per_col > MAX_LEVELS:     # wrap into columns while they fit the width
        c = cols + 1
        pc = math.ceil(len(rows) / c)
        if sum(_col_width(rows[k:k + pc]) for k in range(0, len(rows), pc)) + 2 * MARGIN > MAX_WIDTH:
            break
        cols, per_col = c, pc
    col_w = [_col_width(rows[k:k + per_col]) for k in range(0, len(rows), per_col)] or [BOX_W + GAP_X]
    width = max(6.0, sum(col_w) + 2 * MARGIN)
    height = TOP + MARGIN + per_col * (BOX_H + GAP_Y)
    x, y = np.zeros(n), np.zeros(n)
    for r, ids in enumerate(rows):
        c, k = divmod(r, per_col)
        x0 = MARGIN + sum(col_w[:c]) + col_w[c] / 2 - (len(ids) - 1) * (BOX_W + GAP_X) / 2
        for j, i in enumerate(ids):
            x[i] = x0 + j * (BOX_W + GAP_X)
            y[i] = height - TOP - k * (BOX_H + GAP_Y) - BOX_H / 2
    return GraphLayout(x, y, width, height)


def _col_width(rows: list) -> float:
    return max((len(r) for r in rows), default=1) * (BOX_W + GAP_X)


def _cut(s: str) -> str:
    return s if len(s) <= CHARS else s[:CHARS - 1] + "…"


def box_labels(mg: dict) -> list[str]:
    """The text of each box: the name without the prefix all modules share (a collapsed run:
    ``h.0-11 x12``), the type, FLOPs and summed median forward time."""
    nodes = mg["nodes"]
    shorts = short_names([n["label"] for n in nodes[1:]])
    out = ["input"]
    for nd, s in zip(nodes[1:], shorts):
        t = nd["time_s"]
        cost = f"{fmt_flops(nd['flops'])} FLOPs" + (f" · {t * 1e3:.3g} ms" if np.isfinite(t) else "")
        out.append("\n".join((_cut(s), _cut(nd["type"]), cost)))
    return out


def draw_module_graph(mg: dict, title: str):
    """The module graph as a figure (see the module docstring)."""
    plt, _ = mpl()
    theme("white")
    lay = graph_layout(mg)
    fig = plt.figure(figsize=(lay.width, lay.height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, lay.width)
    ax.set_ylim(0, lay.height)
    ax.axis("off")
    x, y = lay.x, lay.y
    for a, b in mg["edges"]:
        wrap = y[b] > y[a]          # into the next column: a light dashed line
        skip = abs(y[a] - y[b]) > BOX_H + GAP_Y + 1e-9 and not wrap
        ax.annotate("", xy=(x[b], y[b] + BOX_H / 2), xytext=(x[a], y[a] - BOX_H / 2),
                    arrowprops={"arrowstyle": "->", "color": "#bbbbbb" if wrap else "#555555", "lw": 0.9,
                                "ls": "--" if wrap else "-", "connectionstyle": f"arc3,rad={0.3 if skip else 0.0}"},
                    zorder=1)
    from matplotlib.patches import FancyBboxPatch
    for nd, lab in zip(mg["nodes"], box_labels(mg)):
        i = nd["id"]
        fc = "#b7e4c7" if i == 0 else ("#ffd6a5" if len(nd["members"]) > 1 else "#dbe9f6")
        ax.add_patch(FancyBboxPatch((x[i] - BOX_W / 2, y[i] - BOX_H / 2), BOX_W, BOX_H,
                                    boxstyle="round,pad=0,rounding_size=0.06", fc=fc, ec="#333333", lw=0.7,
                                    zorder=2))
        ax.text(x[i], y[i], text(lab), ha="center", va="center", fontsize=7.5, linespacing=1.15, zorder=3)
    fig.text(0.5, 1 - 0.3 / lay.height, text(title), ha="center", va="center", fontsize=11)
    return fig


def node_areas(mg: dict) -> list[dict]:
    """One tooltip area per box of :func:`draw_module_graph` (percent of the picture, as
    :func:`analyzer.report.plots.overview.row_areas`), titled with the full names of its modules."""
    lay = graph_layout(mg)
    out = []
    for nd in mg["nodes"]:
        i = nd["id"]
        members = nd["members"] or ["input"]
        title = (f"{nd['label']} ({len(members)} modules: " + ", ".join(members) + ")" if len(members) > 1
                 else members[0]) + (f" — {nd['type']}" if nd["type"] else "")
        out.append({"left": round(float(100 * (lay.x[i] - BOX_W / 2) / lay.width), 4),
                    "top": round(float(100 * (lay.height - lay.y[i] - BOX_H / 2) / lay.height), 4),
                    "width": round(100 * BOX_W / lay.width, 4), "height": round(100 * BOX_H / lay.height, 4),
                    "title": title})
    return out


def module_bars(t: pd.DataFrame, title: str):
    """Horizontal bars of FLOPs (left) and median forward time (right) per module of a
    :func:`analyzer.graph.module_table`, one row per module in call order, labelled without the prefix
    all names share; rows of one repeated group in one colour."""
    plt, _ = mpl()
    theme("whitegrid")
    n = len(t)
    names = [str(x) for x in t["name"]]
    labels = [text(s) for s in short_names(names)]
    size = 9 if n <= 30 else 7
    left = max(len(s) for s in labels) * 0.62 * size / 72 + 0.3 if n else 1.0
    width = min(MAX_WIDTH, max(9.0, left + 8.0))
    height = max(2.6, 1.3 + 0.2 * n)
    fig, axes = plt.subplots(1, 2, figsize=(width, height), sharey=True)
    fig.subplots_adjust(left=left / width, right=1 - 0.25 / width, top=1 - 0.55 / height, bottom=0.6 / height,
                        wspace=0.08)
    groups = [g for g in dict.fromkeys(t["group"]) if g]
    pal = dict(zip(groups, palette("tab10", max(1, len(groups)))))
    colors = [pal.get(g, (0.55, 0.6, 0.65)) for g in t["group"]]
    pos = np.arange(n)
    for ax, col, scale, xl in ((axes[0], "flops", 1.0, "FLOPs per forward"),
                               (axes[1], "time_s", 1e3, "forward time (ms, median per call, inclusive)")):
        v = t[col].to_numpy(np.float64) * scale
        ax.barh(pos, np.where(np.isfinite(v), v, 0.0), color=colors, height=0.75)
        ax.set_xlabel(xl)
        if col == "flops":
            from matplotlib.ticker import EngFormatter, MaxNLocator
            ax.xaxis.set_major_formatter(EngFormatter(sep=" "))
            ax.xaxis.set_major_locator(MaxNLocator(5))
        if not np.isfinite(v).any():
            ax.text(0.5, 0.5, "not timed", transform=ax.transAxes, ha="center", va="center", color="0.4")
    axes[0].set_yticks(pos)
    axes[0].set_yticklabels(labels, fontsize=size)
    axes[0].invert_yaxis()
    fig.suptitle(text(title), fontsize=11, y=1 - 0.28 / height)
    return fig


__all__ = ["MAX_WIDTH", "GraphLayout", "graph_layout", "box_labels", "draw_module_graph", "node_areas", "module_bars"]
