"""What every figure of a run shares: the plot registry, lazy matplotlib, figures in the report's style,
saving, labels and axis helpers.

Every plot is a function ``(df, ax, **opts) -> ax`` (or ``(df, fig, **opts) -> fig`` for a
multi-panel figure) that draws onto what it is given and never reads files: lines and bars with plain
matplotlib (:func:`series_lines`: seaborn's lineplot cost a third of a report's figure time), seaborn
for the theme and the categorical plots (box and strip plots). Each is
registered in :data:`PLOTS` with :func:`plot` and carries ``requires``: the DataFrame columns it
needs. :func:`check` tells whether a DataFrame has what a plot needs (and why not), so that a report
can skip a figure with a reason.

matplotlib (Agg backend) is imported lazily, on the first plot (:func:`mpl`), and seaborn only when a
plot uses it (the report's own figures do not: seaborn loads scipy.stats, about 1 s in every drawing
process); importing this module costs nothing and never touches a display. Nothing here imports torch.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import numpy as np
import pandas as pd

from ...trace.files import atomic_write

#: name -> plotting function (each has ``requires`` and ``kind`` = "ax" or "fig").
PLOTS: dict[str, Callable] = {}

#: Most columns the layer x step heatmap draws; longer runs are binned by averaging.
MAX_HEATMAP_COLUMNS = 400
#: Most legend entries drawn; beyond that layers are coloured by id with a colour bar instead.
MAX_LEGEND = 12

_MPL = None


class _Seaborn:
    """seaborn, imported at the first use of one of its names (``sns.boxplot``)."""

    def __getattr__(self, name):
        import seaborn
        return getattr(seaborn, name)


def mpl():
    """(pyplot, seaborn): pyplot imported on first use with the Agg backend; seaborn imported when one
    of its names is first used."""
    global _MPL
    if _MPL is None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        _MPL = (plt, _Seaborn())
    return _MPL


_WARM = []


def warm_up() -> None:
    """Import matplotlib and draw a small figure with text (fonts found and loaded), so that processes
    forked afterwards draw their first figure without that cost (about 1 s each). Once per process."""
    if _WARM:
        return
    _WARM.append(True)
    plt, _ = mpl()
    fig, ax = new_figure(2, 1)
    ax[0, 0].plot([0, 1], [0, 1], label="x")
    ax[0, 0].set_title("warm-up 0.5")
    ax[0, 0].legend()
    fig.canvas.draw()
    plt.close(fig)


def plot(requires: Iterable[str], kind: str = "ax") -> Callable:
    """Register a plotting function with the DataFrame columns it needs."""
    def deco(fn: Callable) -> Callable:
        fn.requires = tuple(requires)
        fn.kind = kind
        PLOTS[fn.__name__] = fn
        return fn
    return deco


def check(df: pd.DataFrame | None, requires: Iterable[str] | Callable) -> str | None:
    """Why ``df`` cannot feed a plot, or None if it can.

    ``requires`` is a plotting function (its ``requires`` is used) or a list of column names.
    A DataFrame can feed a plot if it has rows, every required column, and at least one finite value
    in every required numeric column (and, taken together, at least one row where all of them are
    finite).
    """
    cols = tuple(getattr(requires, "requires", requires))
    if df is None or not len(df):
        return "no data"
    missing = [c for c in cols if c not in df.columns]
    if missing:
        return f"missing column(s) {', '.join(missing)}"
    num = [c for c in cols if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    ok = np.ones(len(df), bool)
    for c in num:
        fin = np.isfinite(df[c].to_numpy(np.float64, na_value=np.nan))
        if not fin.any():
            return f"no finite values of {c}"
        ok &= fin
    if num and not ok.any():
        return f"no row with finite {', '.join(num)}"
    return None


# ---------------------------------------------------------------------------------------- helpers
#: The report's style: the rcParams that seaborn's ``set_theme(style="whitegrid", context="notebook",
#: font_scale=0.9)`` sets (seaborn 0.13; written out so that drawing needs no seaborn), plus titles at a
#: fixed height above the axes (matplotlib otherwise measures every axis' tick labels at each draw to lift
#: a title over top ticks, which no figure here has: about a sixth of the time of a report's figures).
RC = {"axes.axisbelow": True, "axes.edgecolor": ".8", "axes.grid": True, "axes.labelcolor": ".15",
      "axes.labelsize": 10.8, "axes.linewidth": 1.25, "axes.titlesize": 10.8, "axes.titley": 1.0,
      "font.sans-serif": ["Arial", "DejaVu Sans", "Liberation Sans", "Bitstream Vera Sans", "sans-serif"],
      "font.size": 10.8, "grid.color": ".8", "grid.linewidth": 1.0, "legend.fontsize": 9.9,
      "legend.title_fontsize": 10.8, "lines.solid_capstyle": "round", "patch.edgecolor": "w",
      "patch.force_edgecolor": True, "text.color": ".15", "xtick.bottom": False, "xtick.color": ".15",
      "xtick.labelsize": 9.9, "xtick.major.size": 6.0, "xtick.major.width": 1.25, "xtick.minor.size": 4.0,
      "xtick.minor.width": 1.0, "ytick.color": ".15", "ytick.labelsize": 9.9, "ytick.left": False,
      "ytick.major.size": 6.0, "ytick.major.width": 1.25, "ytick.minor.size": 4.0, "ytick.minor.width": 1.0,
      "image.cmap": "viridis"}
#: seaborn's default ("deep") colour cycle
DEEP = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
        "#64b5cd")
#: what the other seaborn styles change against "whitegrid"
STYLES = {"whitegrid": {}, "white": {"axes.edgecolor": ".15", "axes.grid": False},
          "ticks": {"axes.edgecolor": ".15", "axes.grid": False, "xtick.bottom": True, "ytick.left": True}}


def theme(style: str = "whitegrid") -> None:
    """The report's style (:data:`RC`, then :data:`STYLES` ``[style]``), set before a figure."""
    plt, _ = mpl()
    from cycler import cycler
    plt.rcParams.update(RC)
    plt.rcParams.update(STYLES[style])
    plt.rcParams["axes.prop_cycle"] = cycler(color=list(DEEP))


def palette(name: str, n: int) -> list:
    """``n`` colours of the matplotlib colormap ``name`` as seaborn's ``color_palette(name, n)`` picks
    them: the first ``n`` of a qualitative map (repeated past its length: tab10, tab20), else ``n``
    evenly spaced inside a continuous one (its ends left out)."""
    plt, _ = mpl()
    cmap = plt.get_cmap(name)
    n = max(int(n), 0)
    colors = getattr(cmap, "colors", None)
    if colors is not None and cmap.N <= 20:
        return [tuple(colors[i % len(colors)][:3]) for i in range(n)]
    return [tuple(c[:3]) for c in cmap(np.linspace(0, 1, n + 2)[1:-1])]


def cell_image(ax, z: np.ndarray, cmap: str, vmin: float, vmax: float, label: str | None = None,
               colorbar: bool = True):
    """A matrix as coloured cells: cell (i, j) covers [j, j+1] x [i, i+1] with row 0 at the top (as
    seaborn's heatmap draws it, without its extra full draw of the figure); non-finite cells blank;
    no grid, no spines; a colour bar with ``label`` when ``colorbar``. Returns the image."""
    z = np.asarray(z, np.float64)
    nr, nc = z.shape
    im = ax.imshow(np.ma.masked_invalid(z), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest", extent=(0, nc, nr, 0))
    ax.grid(False)
    for sp in ax.spines.values():
        sp.set_visible(False)
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, label=label)
        cb.outline.set_visible(False)
    return im


def new_figure(width: float = 8.0, height: float = 4.5, nrows: int = 1, ncols: int = 1,
               layout: str | None = "constrained", **kw):
    """A new figure (and axes) in the report's style. ``layout=None``: no layout engine; call
    :func:`fixed_margins` once the figure is drawn."""
    plt, _ = mpl()
    theme()
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, layout=layout, **kw)
    return fig, axes


def figure(width: float = 8.0, height: float = 4.5, layout: str | None = "constrained"):
    """A new empty figure (for the ``(df, fig)`` plots); ``layout`` as in :func:`new_figure`."""
    plt, _ = mpl()
    theme()
    return plt.figure(figsize=(width, height), layout=layout)


def fixed_margins(fig, left: float | None = None, right: float = 0.25, top: float = 0.45, bottom: float = 0.55,
                  gap: float = 0.6):
    """Place the subplots of a figure made with ``layout=None`` with margins in inches, instead of a
    layout engine (which lays a figure out in an extra full draw: a third of the time of a simple
    figure). For the per-layer figures, drawn once per layer with the same structure.

    Args:
        fig: the drawn figure (ticks, labels and titles set).
        left: left margin; None = room for the widest y tick label (estimated from the formatted
            tick strings and the font size, see :func:`_ytick_room`) and the y axis label.
        right, top, bottom, gap: margins and the gap between rows of subplots (inches); ``top``
            holds an axes title (add about 0.3 for a suptitle).

    Returns:
        fig.
    """
    w, h = fig.get_size_inches()
    grid = [a for a in fig.axes if a.get_subplotspec() is not None]
    if left is None:
        left = max([_ytick_room(a) for a in grid if a.get_label() != "<colorbar>"] or [0.8])
    rows = {a.get_subplotspec().rowspan.start for a in grid}
    n = max(1, len(rows))
    axh = max(0.1, (h - top - bottom - gap * (n - 1)) / n)
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h,
                        hspace=gap / axh)
    return fig


def _ytick_room(ax) -> float:
    """Inches left of an axes taken by its y tick labels and y label (an estimate without drawing:
    characters of the formatted tick labels times 0.62 em, superscripts of log-scale labels at 0.7,
    plus the tick, the paddings and one line of label text; 0.1 inch to spare)."""
    import re

    from matplotlib import rcParams
    from matplotlib.font_manager import FontProperties
    axis = ax.yaxis
    lo, hi = sorted(ax.get_ylim())
    locs = [v for v in axis.get_majorticklocs() if lo <= v <= hi]
    chars = 0.0
    for t in axis.get_major_formatter().format_ticks(locs) if locs else []:
        sup = re.search(r"\^\{?([^}$]*)\}?", t)
        base = re.sub(r"\\mathdefault|\$|\{|\}|\^.*", "", t)
        chars = max(chars, len(base) + (0.7 * len(sup.group(1)) if sup else 0.0))
    tick_pt = FontProperties(size=rcParams["ytick.labelsize"]).get_size_in_points()
    label_pt = FontProperties(size=rcParams["axes.labelsize"]).get_size_in_points()
    pts = chars * 0.62 * tick_pt + rcParams["ytick.major.size"] + rcParams["ytick.major.pad"]
    if axis.get_label_text():
        pts += 1.25 * label_pt + rcParams["axes.labelpad"]
    return pts / 72 + 0.1


#: zlib level of the saved PNGs: 1 encodes a report's figures in about 0.6 of the time of PIL's default 6,
#: for files 2-8 % larger (measured on a 12-block GPT-2 report)
PNG_COMPRESS_LEVEL = 1


def save(fig, path: str | os.PathLike, dpi: int = 100) -> str:
    """Save ``fig`` as PNG (through :func:`analyzer.trace.files.atomic_write`: a temporary name, then
    a rename; zlib level :data:`PNG_COMPRESS_LEVEL`) and close it. Returns ``path`` as a string."""
    plt, _ = mpl()
    try:
        return atomic_write(os.fspath(path), lambda tmp: fig.savefig(
            tmp, dpi=dpi, format="png", pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL}))
    finally:
        plt.close(fig)


def close(fig) -> None:
    """Close a figure (free its memory)."""
    plt, _ = mpl()
    plt.close(fig)


def text(s) -> str:
    """A model-provided string made safe for matplotlib text (no mathtext)."""
    return str(s).replace("$", r"\$")


def layer_label(layer_id, name) -> str:
    """Axis/legend label of a layer: "id: dotted name" ("(model)" for the root module)."""
    return f"{int(layer_id)}: {text(name)}" if name else f"{int(layer_id)}: (model)"


def with_labels(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of df with a "layer_label" column."""
    d = df.copy()
    d["layer_label"] = [layer_label(i, n) for i, n in zip(d["layer_id"], d["layer"])]
    return d


def layer_order(d: pd.DataFrame) -> list[str]:
    """The "layer_label"s of ``d`` (see :func:`with_labels`) in layer id order."""
    return list(d.drop_duplicates("layer_id").sort_values("layer_id")["layer_label"])


def positive(x) -> np.ndarray:
    """Values for a log axis: non-positive and non-finite become NaN."""
    a = np.asarray(x, np.float64)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def legend_outside(ax, title: str | None = None) -> None:
    """Move an axes' legend (if any) to the right of it, small, without a frame."""
    leg = ax.get_legend()
    if leg is None:
        return
    handles, labels = ax.get_legend_handles_labels()
    labels = ["layer" if lab == "layer_label" else lab for lab in labels]
    ax.legend(handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              fontsize="small", title_fontsize="small")


def epoch_spans(df: pd.DataFrame, col: str) -> pd.DataFrame:
    """Per epoch: first step, last step and the mean of ``col`` over the epoch (NaN skipped)."""
    d = df[["step", "epoch", col]].copy()
    g = d.groupby("epoch", sort=True)
    out = g.agg(start=("step", "min"), end=("step", "max"), mean=(col, "mean")).reset_index()
    return out


def overlay_epoch_means(ax, df: pd.DataFrame, col: str, color="black", label="epoch mean") -> None:
    """Each epoch's mean of ``col`` as a thick segment across the epoch's steps (dot at its centre),
    dotted vertical lines at the epoch boundaries."""
    ep = epoch_spans(df, col)
    ep = ep[np.isfinite(ep["mean"])]
    if not len(ep):
        return
    # each epoch's mean as a horizontal segment across the epoch's steps, joined as a step line
    xs, ys = [], []
    for r in ep.itertuples(index=False):
        end = r.end + 1 if r.end > r.start else r.start + 0.5
        xs += [r.start, end]
        ys += [r.mean, r.mean]
    ax.plot(xs, ys, color=color, lw=2.0, label=label, zorder=5)
    ax.plot((ep["start"] + ep["end"]) / 2.0, ep["mean"], "o", color=color, ms=4, zorder=6)
    for s in ep["start"].iloc[1:]:
        ax.axvline(s, color="0.6", lw=0.6, ls=":", zorder=1)


def value_ticks(ax, values, max_ticks: int = 10) -> None:
    """x ticks of a heatmap whose columns start at the sorted ``values``: round values placed by
    interpolation between the columns (exact column centres when a value starts a column)."""
    from matplotlib.ticker import MaxNLocator
    v = np.asarray(values, np.float64)
    if not len(v):
        return
    if len(v) <= max_ticks:
        ax.set_xticks(np.arange(len(v)) + 0.5)
        ax.set_xticklabels([f"{x:g}" for x in v], rotation=0)
        return
    t = MaxNLocator(nbins=max_ticks, integer=True, steps=[1, 2, 2.5, 5, 10]).tick_values(v[0], v[-1])
    t = t[(t >= v[0]) & (t <= v[-1])]
    ax.set_xticks(np.interp(t, v, np.arange(len(v))) + 0.5)
    ax.set_xticklabels([f"{x:g}" for x in t], rotation=0)


def integer_x(ax) -> None:
    """Steps are integers: no fractional ticks on the x axis. Call it once the data is drawn: data at one
    step only (one weight snapshot, one sampled step) is shown from half a step before to half a step after,
    with that step its one tick (matplotlib would spread fractional ticks around it)."""
    from matplotlib.ticker import FixedLocator, MaxNLocator
    lo, hi = ax.dataLim.intervalx
    if lo == hi and np.isfinite(lo) and float(lo).is_integer():
        ax.set_xlim(lo - 0.5, lo + 0.5)
        ax.xaxis.set_major_locator(FixedLocator([lo]))
        return
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def bin_columns(steps: np.ndarray, max_columns: int) -> np.ndarray:
    """Column index of each of the sorted distinct ``steps`` when at most ``max_columns`` columns are
    drawn: consecutive steps are grouped into equal-count bins."""
    n = len(steps)
    if n <= max_columns:
        return np.arange(n)
    return (np.arange(n) * max_columns) // n


#: dash patterns and markers of the 1st, 2nd, ... line style (seaborn's defaults; "" = solid)
DASHES = ("", (4, 1.5), (1, 1), (3, 1.25, 1.5, 1.25), (5, 1, 1, 1), (5, 1, 2, 1, 2, 1), (2, 2, 3, 1.5),
          (1, 2.5, 3, 1.2))
MARKERS = ("o", "X", (4, 0, 45), "P", (4, 0, 0), (4, 1, 0), "^", (4, 1, 45), "v")


def series_lines(ax, d: pd.DataFrame, x: str, y: str, hue: str, color_of: Callable, style: str | None = None,
                 styles: list | None = None, markers: bool = False, units: str | None = None,
                 label_of: Callable | None = None, **kw) -> None:
    """One matplotlib line per ``hue`` value (and ``style``, ``units`` value), in first-seen order, its points
    sorted by ``x``; rows with a non-finite x or y are left out (as seaborn's lineplot with
    ``estimator=None``, without its per-call cost of about 0.3 s on a figure of 150 lines).

    Args:
        d: the rows; x, y: numeric columns; hue: the column whose value picks the colour.
        color_of: hue value -> a matplotlib colour.
        style: a column whose value picks the dash pattern (and marker) from :data:`DASHES` /
            :data:`MARKERS`, by its position in ``styles`` (default: first-seen order).
        markers: draw the style's marker at every point.
        units: a column that splits lines further without changing their look.
        label_of: hue value -> the legend label of its first line (for ``ax.get_legend_handles_labels``);
            None: no labels.
        **kw: passed to ``ax.plot`` (lw, alpha, ...).
    """
    xv = d[x].to_numpy(np.float64, na_value=np.nan)
    yv = d[y].to_numpy(np.float64, na_value=np.nan)
    d = d.loc[np.isfinite(xv) & np.isfinite(yv)]
    if style is not None and styles is None:
        styles = list(dict.fromkeys(d[style]))
    keys = [hue] + [c for c in (style, units) if c is not None]
    labelled = set()
    for key, g in d.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        h = key[0]
        i = styles.index(key[1]) if style is not None else 0
        g = g.sort_values(x, kind="stable")
        lk = dict(kw, color=color_of(h))
        if label_of is not None and h not in labelled:
            labelled.add(h)
            lk["label"] = label_of(h)
        if DASHES[i % len(DASHES)]:
            lk["dashes"] = DASHES[i % len(DASHES)]
        if markers:
            lk.setdefault("marker", MARKERS[i % len(MARKERS)])
            lk.setdefault("markersize", 5)
            lk.setdefault("markeredgecolor", "white")
            lk.setdefault("markeredgewidth", 0.5)
        ax.plot(g[x].to_numpy(np.float64), g[y].to_numpy(np.float64), **lk)


def line_legend(ax, hues: list[tuple[str, object]], title: str | None = None, styles: list | None = None,
                style_title: str | None = None, markers: bool = False, **kw):
    """A legend right of ``ax`` (small, no frame) for :func:`series_lines`: a solid line per (label,
    colour) in ``hues`` under ``title``, then, when ``styles`` are given, a grey line per style under
    ``style_title`` (dash pattern and marker as drawn). Returns the legend."""
    from matplotlib.lines import Line2D
    handles, labels = [], []

    def head(t):
        if t:
            handles.append(Line2D([], [], linestyle="none"))
            labels.append(t)
    head(title if styles else None)
    for lab, c in hues:
        handles.append(Line2D([], [], color=c, lw=1.5))
        labels.append(lab)
    if styles:
        head(style_title)
        for i, s in enumerate(styles):
            lk = {"dashes": DASHES[i % len(DASHES)]} if DASHES[i % len(DASHES)] else {}
            if markers:
                lk.update(marker=MARKERS[i % len(MARKERS)], markersize=5)
            handles.append(Line2D([], [], color="0.3", lw=1.5, **lk))
            labels.append(str(s))
    opts = {**dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small",
                   title_fontsize="small"), **kw}
    leg = ax.legend(handles, labels, title=None if styles else title, **opts)
    return inside_legend(leg) if opts.get("bbox_to_anchor") is None else leg


def inside_legend(leg):
    """A legend placed inside its axes (``loc="best"``, no ``bbox_to_anchor``) left out of the layout
    engine's measurements: it needs no room of its own, and measuring it means searching its best
    place once per layout pass (a third of the time of a figure of 150 lines). Returns ``leg``."""
    leg.set_in_layout(False)
    return leg


def no_minor_log_ticks(ax) -> None:
    """Leave out the minor ticks of a log y axis spanning more than 1.2 decades with at least two powers of
    ten in view: in the report's style they have no marks and no grid lines, and matplotlib labels them only
    below one decade, yet each is built and measured at every draw (about a tenth of the time of a figure
    with two log axes). Where fewer than two powers of ten are in view (a weight norm from 0.6 to 6:
    matplotlib would label 10^0 alone), the minor ticks stay and some are labelled (2, 3, 4, 6 times a power
    of ten up to two decades, all of them under half a decade). Call once the data are drawn (the limits
    are read)."""
    from matplotlib.ticker import LogFormatterSciNotation, NullLocator
    if ax.get_yscale() != "log":
        return
    lo, hi = sorted(ax.get_ylim())
    if not (lo > 0 and np.isfinite(hi)):
        return
    powers = int(np.floor(np.log10(hi) + 1e-9) - np.ceil(np.log10(lo) - 1e-9)) + 1   # powers of ten in view
    if powers < 2:
        ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    elif hi / lo > 10 ** 1.2:
        ax.yaxis.set_minor_locator(NullLocator())
