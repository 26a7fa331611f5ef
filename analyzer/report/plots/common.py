"""What every figure of a run shares: the plot registry, lazy matplotlib, figures in the report's style,
saving, labels and axis helpers.

Every plot is a function ``(df, ax, **opts) -> ax`` (or ``(df, fig, **opts) -> fig`` for a
multi-panel figure) that draws with seaborn onto what it is given and never reads files. Each is
registered in :data:`PLOTS` with :func:`plot` and carries ``requires``: the DataFrame columns it
needs. :func:`check` tells whether a DataFrame has what a plot needs (and why not), so that a report
can skip a figure with a reason.

matplotlib (Agg backend) and seaborn are imported lazily, on the first plot (:func:`mpl`): importing
this module costs nothing and never touches a display. Nothing here imports torch.
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


def mpl():
    """(pyplot, seaborn), imported on first use with the Agg backend."""
    global _MPL
    if _MPL is None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import seaborn as sns
        _MPL = (plt, sns)
    return _MPL


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
def new_figure(width: float = 8.0, height: float = 4.5, nrows: int = 1, ncols: int = 1,
               layout: str | None = "constrained", **kw):
    """A new figure (and axes) in the report's style. ``layout=None``: no layout engine; call
    :func:`fixed_margins` once the figure is drawn."""
    plt, sns = mpl()
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, layout=layout, **kw)
    return fig, axes


def figure(width: float = 8.0, height: float = 4.5, layout: str | None = "constrained"):
    """A new empty figure (for the ``(df, fig)`` plots); ``layout`` as in :func:`new_figure`."""
    plt, sns = mpl()
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
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


def save(fig, path: str | os.PathLike, dpi: int = 100) -> str:
    """Save ``fig`` as PNG (through :func:`analyzer.trace.files.atomic_write`: a temporary name, then
    a rename) and close it. Returns ``path`` as a string."""
    plt, _ = mpl()
    try:
        return atomic_write(os.fspath(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
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
    """Steps are integers: no fractional ticks on the x axis."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def bin_columns(steps: np.ndarray, max_columns: int) -> np.ndarray:
    """Column index of each of the sorted distinct ``steps`` when at most ``max_columns`` columns are
    drawn: consecutive steps are grouped into equal-count bins."""
    n = len(steps)
    if n <= max_columns:
        return np.arange(n)
    return (np.arange(n) * max_columns) // n
