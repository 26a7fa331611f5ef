"""The overview heatmaps: every layer of a model at once, layer x step, grouped by block.

A 150-layer transformer gets one figure per quantity instead of one per layer. Rows are layers in id
order, labelled by their names with the common prefix removed (``transformer.h.3.attn.c_attn`` ->
``h.3.attn.c_attn``), every row labelled; repeated blocks (the first numbered part of a name, ``h.3``,
``encoder.layer.7``, ``layers.0``) are separated by lines and named on the right. Columns are steps,
averaged over bins of consecutive steps past :data:`~.common.MAX_HEATMAP_COLUMNS`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from .common import MAX_HEATMAP_COLUMNS, bin_columns, mpl, plot, positive, text, theme, value_ticks

#: Height of one heatmap row (inches): 0.15 in = 10.8 pt holds a 7-point label.
ROW_INCHES = 0.15
#: Margins of an overview heatmap figure above (the title) and below (x tick labels, x label) the map, inches.
TOP_INCHES, BOTTOM_INCHES = 0.5, 0.75


def common_prefix(names: list[str]) -> str:
    """The longest dotted prefix (whole components, with its trailing dot) shared by every name of
    ``names``, leaving each at least its last component and never ending at the name of a numbered
    container (``transformer.h.`` of ``transformer.h.3...``: the block keeps its name ``h.3``).
    ``""`` when there is none."""
    parts = [n.split(".") for n in names if n]
    if len(parts) < 2:
        return ""
    k = 0
    while all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
        k += 1
    while k and any(p[k].isdigit() for p in parts):
        k -= 1
    return ".".join(parts[0][:k]) + "." if k else ""


#: share of the names that must start with one component for :func:`name_prefix` to remove their prefix
MAJORITY = 0.9


def name_prefix(names: list[str]) -> str:
    """The prefix :func:`short_names` removes: the :func:`common_prefix` of the names that share the most
    common first component when they are at least :data:`MAJORITY` of ``names`` or every other name
    is a single component (a GPT-2's ``transformer.`` beside its ``lm_head``), else that of all names."""
    first = pd.Series([n.split(".", 1)[0] for n in names if n], dtype=object)
    if len(first) >= 2:
        top = first.value_counts()
        others = [n for n in names if n and n.split(".", 1)[0] != top.index[0]]
        if top.iloc[0] >= 2 and (top.iloc[0] >= MAJORITY * len(names) or all("." not in n for n in others)):
            return common_prefix([n for n in names if n and n.split(".", 1)[0] == top.index[0]])
    return common_prefix(names)


def short_names(names: list[str]) -> list[str]:
    """``names`` without their :func:`name_prefix` where they start with it ("(model)" for the root
    module's empty name)."""
    pre = name_prefix(names)
    return [n[len(pre):] if pre and n.startswith(pre) else (n or "(model)") for n in names]


def block_of(name: str) -> str:
    """The repeated block a (short) layer name belongs to: its components up to and including the
    first all-digit one (``h.3.attn.c_attn`` -> ``h.3``), or ``""`` outside numbered blocks."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return ""


def heatmap_height(rows: int) -> float:
    """Figure height (inches) that gives every one of ``rows`` rows room for its label."""
    return max(3.2, TOP_INCHES + BOTTOM_INCHES + ROW_INCHES * rows)


def label_inches(labels: list[str], size: float) -> float:
    """Width (inches) of the widest of ``labels`` at ``size`` points (0.62 em a character: DejaVu Sans'
    widest lower-case letters and digits; an estimate that errs wide, made without drawing)."""
    return max((len(s) for s in labels), default=0) * 0.62 * size / 72


class HeatmapLayout(NamedTuple):
    """Where the parts of an overview heatmap figure go, fixed before drawing (no layout engine), so
    that the page can place a tooltip over every row without measuring the picture.

    Attributes:
        width, height: figure size (inches); saved at ``dpi`` it is ``width*dpi`` x ``height*dpi`` px.
        ax, cax: [left, bottom, width, height] of the heatmap and of its colour bar, in figure fractions.
        rows: number of rows. fontsize: of the row labels (points).
        names: the full names of the rows (top to bottom). labels: their tick labels.
        blocks: (block name, first row, end row) of every run of rows in one repeated block.
        prefix: the prefix removed from the names (see :func:`name_prefix`).
    """

    width: float
    height: float
    ax: tuple
    cax: tuple
    rows: int
    fontsize: float
    names: list
    labels: list
    blocks: list
    prefix: str


def block_spans(shorts: list[str]) -> list[tuple[str, int, int]]:
    """(block, first row, end row) of every run of consecutive rows in the same block (see :func:`block_of`);
    a block of one row is no block (a ``Sequential``'s ``features.3``): such rows join the unnamed run
    around them, so that nothing is named twice."""
    blocks = [block_of(s) for s in shorts]
    spans, start = [], 0
    for i in range(1, len(shorts) + 1):
        if i == len(shorts) or blocks[i] != blocks[start]:
            name = blocks[start] if i - start >= 2 else ""
            if spans and not name and not spans[-1][0]:
                spans[-1] = ("", spans[-1][1], i)
            else:
                spans.append((name, start, i))
            start = i
    return spans


def heatmap_layout(df: pd.DataFrame, ids: bool = True, width: float = 12.0) -> HeatmapLayout:
    """The layout of the overview heatmap of ``df`` (rows (step, layer_id, layer, ...), one heatmap row
    per layer_id in id order), labelled "id: short name" (``ids``) or by short name only."""
    layers = df.drop_duplicates("layer_id").sort_values("layer_id")
    names = [str(n) for n in layers["layer"]]
    shorts = short_names(names)
    labels = [f"{int(i)}: {s}" if ids else s for i, s in zip(layers["layer_id"], shorts)]
    n = len(names)
    size = 9 if n <= 30 else 7
    spans = block_spans(shorts)
    named = [b for b, _, _ in spans if b]
    left = label_inches(labels, size) + 0.55          # tick, padding, the y axis label
    right = (label_inches(named, size) + 0.2 if named else 0.1) + 0.12 + 0.16 + 0.9   # blocks, gap, bar, its label
    if left + right > 0.6 * width:                    # very long names: a wider figure, never a cut label
        width = (left + right) / 0.6
    h = heatmap_height(n)
    axh = h - TOP_INCHES - BOTTOM_INCHES
    axw = width - left - right
    bar_left = width - 0.9 - 0.16
    return HeatmapLayout(width, h, (left / width, BOTTOM_INCHES / h, axw / width, axh / h),
                         (bar_left / width, BOTTOM_INCHES / h, 0.16 / width, axh / h), n, size, names,
                         labels, spans, name_prefix(names))


def row_areas(lay: HeatmapLayout) -> list[dict]:
    """One tooltip area per row of a heatmap laid out as ``lay``: its band from the image's left edge
    (the label) to the heatmap's right edge, in percent of the image, titled with the row's full name.

    Returns:
        [{"top", "height", "left", "width" (percent, floats), "title" (the full name, not escaped)}]
    """
    x0, y0, w, h = lay.ax
    top = 1.0 - (y0 + h)
    step = h / lay.rows if lay.rows else 0.0
    return [{"top": round(100 * (top + i * step), 4), "height": round(100 * step, 4), "left": 0.0,
             "width": round(100 * (x0 + w), 4), "title": nm or "(model)"} for i, nm in enumerate(lay.names)]


def layer_matrix(df: pd.DataFrame, value: str, log: bool = True, max_columns: int = MAX_HEATMAP_COLUMNS
                 ) -> tuple[np.ndarray, pd.DataFrame, np.ndarray, int]:
    """The layer x column matrix of ``value`` (log10 of it when ``log``; non-positive values are blank).

    Args:
        df: rows (step, layer_id, layer, value): one value per layer and step.

    Returns:
        (matrix (layers, columns) float64 with NaN where nothing was recorded, the layers (layer_id,
        layer) in id order, the first step of each column, the number of distinct steps).
    """
    d = df[["step", "layer_id", "layer", value]].copy()
    v = d[value].to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        d["_v"] = np.log10(positive(v)) if log else np.where(np.isfinite(v), v, np.nan)
    steps = np.sort(d["step"].unique())
    col = bin_columns(steps, max_columns)
    d["_c"] = col[np.searchsorted(steps, d["step"].to_numpy())]
    layers = d.drop_duplicates("layer_id").sort_values("layer_id")[["layer_id", "layer"]].reset_index(drop=True)
    ncol = int(col[-1]) + 1 if len(col) else 0
    m = d.pivot_table(index="layer_id", columns="_c", values="_v", aggfunc="mean", dropna=False)
    m = m.reindex(index=layers["layer_id"], columns=np.arange(ncol))
    first = pd.Series(steps).groupby(col).min().to_numpy()
    return m.to_numpy(np.float64), layers, first, len(steps)


def layer_heatmap(df: pd.DataFrame, ax, value: str, label: str, title: str, log: bool = True,
                  cmap: str = "magma", max_columns: int = MAX_HEATMAP_COLUMNS, cax=None, ids: bool = True,
                  vmin: float | None = None, vmax: float | None = None, what: str = "layer"):
    """Draw the row x step heatmap of ``value`` on ``ax`` with every row labelled and blocks marked.

    Args:
        df: rows (step, layer_id, layer, ``value``): one heatmap row per layer_id, in id order.
        label: the colour bar's label. title: the axes title.
        log: colour by log10 of the value. vmin, vmax: the colour range (default: the data's).
        cax: the colour bar's axes (default: taken from ``ax``).
        ids: label rows "id: short name" (else the short name only). what: the rows' noun ("layer", "site").
    """
    m, layers, first, nsteps = layer_matrix(df, value, log, max_columns)
    lay = heatmap_layout(df, ids)
    n = lay.rows
    fin = m[np.isfinite(m)]
    lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
    lo, hi = lo if vmin is None else vmin, hi if vmax is None else vmax
    img = ax.imshow(np.ma.masked_invalid(m), aspect="auto", interpolation="nearest", cmap=cmap,
                    vmin=lo, vmax=hi if hi > lo else lo + 1e-12, extent=(0, m.shape[1], n, 0))
    if cax is not None:
        ax.figure.colorbar(img, cax=cax, label=label)
    else:
        ax.figure.colorbar(img, ax=ax, label=label, pad=0.01, fraction=0.03)
    ax.grid(False)
    value_ticks(ax, first, 10)
    ax.set_yticks(np.arange(n) + 0.5)
    ax.set_yticklabels([text(s) for s in lay.labels], fontsize=lay.fontsize)
    for _, a, _b in lay.blocks[1:]:
        ax.axhline(a, color="white", lw=1.2)
    named = [(b, a, e) for b, a, e in lay.blocks if b]
    if named:
        right = ax.secondary_yaxis("right")
        right.set_yticks([(a + e) / 2 for _, a, e in named])
        right.set_yticklabels([text(b) for b, _, _ in named], fontsize=lay.fontsize)
        right.tick_params(length=0)
    binned = nsteps > m.shape[1]
    pre = lay.prefix
    ax.set_xlabel("step" + (f" ({nsteps} steps averaged into {m.shape[1]} columns)" if binned else "")
                  + (f"  ·  {what} names shown without the prefix {text(pre)}" if pre else ""))
    ax.set_ylabel(what + (" (id: name)" if ids else ""))
    ax.set_title(title)
    return ax


@plot(requires=("step", "layer_id", "layer", "l2"))
def grad_heatmap(df: pd.DataFrame, ax, max_columns: int = MAX_HEATMAP_COLUMNS, **opts):
    """Layer x step heatmap of log10 of each layer's gradient L2 norm (all its parameters together)."""
    return layer_heatmap(df, ax, "l2", "log10 ‖g‖₂", opts.get("title", "Gradient L2 norm per layer and step (log10)"),
                         max_columns=max_columns, cax=opts.get("cax"))


@plot(requires=("step", "layer_id", "layer", "update_ratio"))
def update_ratio_heatmap(df: pd.DataFrame, ax, max_columns: int = MAX_HEATMAP_COLUMNS, **opts):
    """Layer x snapshot heatmap of log10 of each layer's update ratio ‖Δw‖/‖w_prev‖."""
    return layer_heatmap(df, ax, "update_ratio", "log10 ‖Δw‖ / ‖w‖", opts.get(
        "title", "Weight update ratio per layer and snapshot (log10)"), cmap="viridis", max_columns=max_columns,
        cax=opts.get("cax"))


@plot(requires=("step", "layer_id", "layer", "l2"))
def weight_l2_heatmap(df: pd.DataFrame, ax, max_columns: int = MAX_HEATMAP_COLUMNS, **opts):
    """Layer x snapshot heatmap of log10 of each layer's weight L2 norm (all its parameters together)."""
    return layer_heatmap(df, ax, "l2", "log10 ‖w‖₂", opts.get("title", "Weight L2 norm per layer and snapshot (log10)"),
                         cmap="cividis", max_columns=max_columns, cax=opts.get("cax"))


def site_rows(df: pd.DataFrame, order: list[str] | None = None) -> pd.DataFrame:
    """A per-(step, site) table as overview heatmap rows: ``layer_id`` = the site's position in
    ``order`` (the trace's forward order; sites not in it after, in table order), ``layer`` = the site."""
    sites = [str(s) for s in dict.fromkeys(df["site"].astype(str))]
    if order is not None:
        known = set(sites)
        sites = [s for s in map(str, order) if s in known] + [s for s in sites if s not in set(map(str, order))]
    pos = {s: i for i, s in enumerate(sites)}
    d = df.copy()
    d["layer"] = d["site"].astype(str)
    d["layer_id"] = d["layer"].map(pos).astype(np.int64)
    return d


@plot(requires=("step", "layer_id", "layer", "dead_fraction"))
def dead_fraction_heatmap(df: pd.DataFrame, ax, max_columns: int = MAX_HEATMAP_COLUMNS, **opts):
    """Site x step heatmap of the fraction of each site's units dead at that step (0 white, 1 dark red);
    rows from :func:`site_rows`."""
    return layer_heatmap(df, ax, "dead_fraction", "fraction of units dead", opts.get(
        "title", "Dead units per activation site and step"), log=False, cmap="Reds", vmin=0.0, vmax=1.0,
        max_columns=max_columns, cax=opts.get("cax"), ids=False, what="site")


@plot(requires=("step", "layer_id", "layer", "saturated"))
def saturation_heatmap(df: pd.DataFrame, ax, max_columns: int = MAX_HEATMAP_COLUMNS, **opts):
    """Site x step heatmap of the fraction of each site's values saturated at that step (0 white, 1
    dark purple); rows from :func:`site_rows`, only the sites whose kind has a saturation rule."""
    return layer_heatmap(df, ax, "saturated", "fraction of values saturated", opts.get(
        "title", "Saturation per activation site and step"), log=False, cmap="Purples", vmin=0.0, vmax=1.0,
        max_columns=max_columns, cax=opts.get("cax"), ids=False, what="site")


#: the heatmaps whose rows are activation sites (labelled without ids)
SITE_HEATMAPS = ("dead_fraction_heatmap", "saturation_heatmap")


def heatmap_figure(plotfn, df: pd.DataFrame, width: float = 12.0):
    """A figure laid out by :func:`heatmap_layout` for ``df``'s rows with ``plotfn`` (one of the
    heatmaps above) drawn on it; no layout engine, so :func:`row_areas` tells where every row is."""
    plt, _ = mpl()
    theme("whitegrid")
    lay = heatmap_layout(df, plotfn.__name__ not in SITE_HEATMAPS, width)
    fig = plt.figure(figsize=(lay.width, lay.height))
    ax = fig.add_axes(lay.ax)
    cax = fig.add_axes(lay.cax)
    plotfn(df, ax, cax=cax)
    return fig


def heatmap_areas(plotfn, df: pd.DataFrame, width: float = 12.0) -> list[dict]:
    """The tooltip areas of :func:`heatmap_figure` ``(plotfn, df, width)`` (see :func:`row_areas`)."""
    return row_areas(heatmap_layout(df, plotfn.__name__ not in SITE_HEATMAPS, width))


__all__ = ["ROW_INCHES", "TOP_INCHES", "BOTTOM_INCHES", "HeatmapLayout", "common_prefix", "MAJORITY", "name_prefix",
           "short_names", "block_of",
           "block_spans", "heatmap_height", "label_inches", "heatmap_layout", "row_areas", "layer_matrix",
           "layer_heatmap", "grad_heatmap", "update_ratio_heatmap", "weight_l2_heatmap", "site_rows",
           "dead_fraction_heatmap", "saturation_heatmap", "SITE_HEATMAPS", "heatmap_figure", "heatmap_areas"]
