"""Figures of a recorded run, Cockpit style: small pure plotting functions over tidy DataFrames.

Every plot is a function ``(df, ax, **opts) -> ax`` (or ``(df, fig, **opts) -> fig`` for a
multi-panel figure) that draws with seaborn onto what it is given and never reads files. Each is
registered in :data:`PLOTS` and carries ``requires``: the DataFrame columns it needs.
:func:`check` tells whether a DataFrame has what a plot needs (and why not), so that a report can
skip a figure with a reason.

matplotlib (Agg backend) and seaborn are imported lazily, on the first plot: importing this module
costs nothing and never touches a display. Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Iterable

import numpy as np
import pandas as pd

#: name -> plotting function (each has ``requires`` and ``kind`` = "ax" or "fig").
PLOTS: dict[str, Callable] = {}

#: Most columns the layer x step heatmap draws; longer runs are binned by averaging.
MAX_HEATMAP_COLUMNS = 400
#: Most legend entries drawn; beyond that layers are coloured by id with a colour bar instead.
MAX_LEGEND = 12

_MPL = None


def _mpl():
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
    plt, sns = _mpl()
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.9)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, layout=layout, **kw)
    return fig, axes


def figure(width: float = 8.0, height: float = 4.5, layout: str | None = "constrained"):
    """A new empty figure (for the ``(df, fig)`` plots); ``layout`` as in :func:`new_figure`."""
    plt, sns = _mpl()
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
    """Save ``fig`` as PNG (written to a temporary name, then renamed) and close it."""
    plt, _ = _mpl()
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def close(fig) -> None:
    plt, _ = _mpl()
    plt.close(fig)


def text(s) -> str:
    """A model-provided string made safe for matplotlib text (no mathtext)."""
    return str(s).replace("$", r"\$")


def layer_label(layer_id, name) -> str:
    """Axis/legend label of a layer: "id: dotted name" ("(model)" for the root module)."""
    return f"{int(layer_id)}: {text(name)}" if name else f"{int(layer_id)}: (model)"


def _labels(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of df with a "layer_label" column."""
    d = df.copy()
    d["layer_label"] = [layer_label(i, n) for i, n in zip(d["layer_id"], d["layer"])]
    return d


def _order(d: pd.DataFrame) -> list[str]:
    return list(d.drop_duplicates("layer_id").sort_values("layer_id")["layer_label"])


def _positive(x) -> np.ndarray:
    """Values for a log axis: non-positive and non-finite become NaN."""
    a = np.asarray(x, np.float64)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def _layer_hue(ax, d: pd.DataFrame, legend: bool = True, **lineplot_kw):
    """seaborn lineplot coloured by layer: a legend for a few layers (unless ``legend`` is False), a
    colour bar (by id) for many."""
    plt, sns = _mpl()
    order = _order(d)
    if len(order) <= MAX_LEGEND:
        palette = sns.color_palette("tab10" if len(order) <= 10 else "tab20", len(order))
        sns.lineplot(data=d, hue="layer_label", hue_order=order, palette=palette, ax=ax,
                     legend="auto" if legend else False, **lineplot_kw)
        _legend_outside(ax, title="layer")
    else:
        ids = d["layer_id"].astype(float)
        norm = plt.Normalize(ids.min(), ids.max())
        sns.lineplot(data=d, hue="layer_id", hue_norm=norm, palette="viridis", ax=ax, legend=False,
                     **lineplot_kw)
        if legend:
            sm = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
            ax.figure.colorbar(sm, ax=ax, label=f"layer id ({len(order)} layers)", pad=0.02)
    return ax


def _legend_outside(ax, title: str | None = None) -> None:
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


def _overlay_epoch_means(ax, df: pd.DataFrame, col: str, color="black", label="epoch mean") -> None:
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


def _value_ticks(ax, values, max_ticks: int = 10) -> None:
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


def _integer_x(ax) -> None:
    """Steps are integers: no fractional ticks on the x axis."""
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _auto_log(ax, values, axis: str = "y", ratio: float = 100.0) -> None:
    """Log scale when the positive values span more than ``ratio``."""
    v = _positive(values)
    v = v[np.isfinite(v)]
    if len(v) and v.max() / v.min() > ratio:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


# ---------------------------------------------------------------------------------------- plots
def gradient_flow_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per layer over all steps (rows = per-step, per-layer gradient statistics):
    mean |g| = sum(l1) / sum(count), max |g| = max(max_abs), steps = rows."""
    g = df.groupby(["layer_id", "layer"], sort=True)
    out = g.agg(l1=("l1", "sum"), count=("count", "sum"), max_abs=("max_abs", "max"),
                steps=("l1", "size")).reset_index()
    out["abs_mean"] = out["l1"] / out["count"].where(out["count"] > 0)
    return out[["layer_id", "layer", "steps", "count", "l1", "abs_mean", "max_abs"]]


@plot(requires=("layer_id", "layer", "l1", "count", "max_abs"))
def grad_flow(df: pd.DataFrame, ax, **opts):
    """Gradient flow (BBDecoder 1.x): per layer, mean |g| and max |g| over the steps in ``df`` as
    side-by-side bars on a log axis, layers in id order. ``df``: per-step, per-layer rows."""
    _, sns = _mpl()
    t = _labels(gradient_flow_table(df))
    order = _order(t)
    long = pd.concat([
        pd.DataFrame({"layer_label": t["layer_label"], "statistic": "max |g|", "value": _positive(t["max_abs"])}),
        pd.DataFrame({"layer_label": t["layer_label"], "statistic": "mean |g|", "value": _positive(t["abs_mean"])}),
    ], ignore_index=True)
    sns.barplot(data=long, x="layer_label", y="value", hue="statistic", order=order,
                hue_order=["max |g|", "mean |g|"], palette=["#4c72b0", "#dd8452"], errorbar=None, ax=ax)
    ax.set_yscale("log")
    ax.set_xlabel("layer (id: name)")
    ax.set_ylabel("|gradient| (gradient units)")
    ax.set_title(opts.get("title", "Gradient flow: mean |g| and max |g| per layer"))
    n = len(order)
    step = max(1, math.ceil(n / 60))
    ax.set_xticks(range(0, n, step))
    ax.set_xticklabels(order[::step], rotation=90 if n > 4 else 0, fontsize="small" if n > 20 else None)
    _legend_outside(ax)
    return ax


@plot(requires=("step", "epoch", "l1", "l2"))
def grad_norm_series(df: pd.DataFrame, ax, stat: str = "l2", **opts):
    """One norm of one layer's gradient per iteration (thin line) with each epoch's mean overlaid
    (thick segment across the epoch's steps, dot at its centre)."""
    d = df.sort_values("step")
    # one line, no aggregation: matplotlib directly (a seaborn lineplot costs ~30 ms more per panel)
    ax.plot(d["step"].to_numpy(), d[stat].to_numpy(np.float64), lw=0.8, alpha=0.8, color="#4c72b0",
            label="per iteration")
    _overlay_epoch_means(ax, d, stat, color="#c44e52")
    _auto_log(ax, d[stat])
    if ax.get_yscale() == "linear":
        from matplotlib.ticker import FormatStrFormatter
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    name = {"l1": "L1 norm  sum |g|", "l2": "L2 norm  sqrt(sum g²)"}.get(stat, stat)
    ax.set_ylabel(name)
    _integer_x(ax)
    ax.set_xlabel("step (iteration)")
    ax.set_title(opts.get("title", name))
    ax.legend(loc="best", fontsize="small", frameon=True)
    return ax


@plot(requires=("step", "epoch", "l1", "l2"), kind="fig")
def grad_norms(df: pd.DataFrame, fig, **opts):
    """Two panels, L1 and L2 norm of one layer's gradient per iteration, epoch means overlaid."""
    axes = fig.subplots(2, 1, sharex=True)
    grad_norm_series(df, axes[0], stat="l1", title="L1 norm of the gradient")
    grad_norm_series(df, axes[1], stat="l2", title="L2 norm of the gradient")
    axes[0].set_xlabel("")
    if opts.get("title"):
        fig.suptitle(opts["title"])
    return fig


@plot(requires=("step", "layer_id", "layer", "var"))
def grad_variance_step(df: pd.DataFrame, ax, **opts):
    """Variance of each layer's gradient elements at every iteration (one line per layer, log y).
    ``legend=False`` leaves out the layer legend (when a neighbouring panel shows it)."""
    d = _labels(df.sort_values(["layer_id", "step"]))
    d["var"] = _positive(d["var"])
    _layer_hue(ax, d, legend=opts.get("legend", True), x="step", y="var", lw=0.8, estimator=None, errorbar=None)
    ax.set_yscale("log")
    _integer_x(ax)
    ax.set_xlabel("step (iteration)")
    ax.set_ylabel("Var(g) over the layer's elements (g²)")
    ax.set_title(opts.get("title", "Gradient variance per iteration"))
    return ax


@plot(requires=("epoch", "layer_id", "layer", "statistic", "value"))
def grad_variance_epoch(df: pd.DataFrame, ax, **opts):
    """Per epoch and layer, several variance statistics (column ``statistic``), log y: lines by layer,
    dash style by statistic."""
    plt, sns = _mpl()
    d = _labels(df.sort_values(["layer_id", "epoch"]))
    d["value"] = _positive(d["value"])
    stats = list(dict.fromkeys(d["statistic"]))
    order = _order(d)
    kw = dict(x="epoch", y="value", style="statistic", style_order=stats, markers=True, dashes=True,
              estimator=None, errorbar=None, ax=ax)
    if len(order) <= MAX_LEGEND:
        palette = sns.color_palette("tab10" if len(order) <= 10 else "tab20", len(order))
        sns.lineplot(data=d, hue="layer_label", hue_order=order, palette=palette, units="layer_label", **kw)
        _legend_outside(ax)
    else:
        ids = d["layer_id"].astype(float)
        norm = plt.Normalize(ids.min(), ids.max())
        sns.lineplot(data=d, hue="layer_id", hue_norm=norm, palette="viridis", units="layer_id", **kw)
        # keep only the style entries in the legend
        h, lab = ax.get_legend_handles_labels()
        keep = [(hh, ll) for hh, ll in zip(h, lab) if ll in stats or ll == "statistic"]
        ax.legend([k[0] for k in keep if k[1] != "statistic"], [k[1] for k in keep if k[1] != "statistic"],
                  loc="best", fontsize="small")
        sm = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
        ax.figure.colorbar(sm, ax=ax, label=f"layer id ({len(order)} layers)", pad=0.02)
    ax.set_yscale("log")
    epochs = sorted(d["epoch"].unique())
    if len(epochs) <= 20:
        ax.set_xticks(epochs)
    ax.set_xlabel("epoch")
    ax.set_ylabel("variance (g²)")
    ax.set_title(opts.get("title", "Gradient variance per epoch"))
    return ax


def bin_columns(steps: np.ndarray, max_columns: int) -> np.ndarray:
    """Column index of each of the sorted distinct ``steps`` when at most ``max_columns`` columns are
    drawn: consecutive steps are grouped into equal-count bins."""
    n = len(steps)
    if n <= max_columns:
        return np.arange(n)
    return (np.arange(n) * max_columns) // n


@plot(requires=("step", "layer_id", "layer", "l2"))
def grad_heatmap(df: pd.DataFrame, ax, max_columns: int = MAX_HEATMAP_COLUMNS, **opts):
    """Layer x step heatmap of log10 of each layer's gradient L2 norm (rows: layers in id order;
    columns: steps, averaged (in log10) over bins of consecutive steps when there are more than
    ``max_columns``)."""
    _, sns = _mpl()
    d = _labels(df)
    with np.errstate(divide="ignore", invalid="ignore"):
        d["log_l2"] = np.log10(_positive(d["l2"]))
    steps = np.sort(d["step"].unique())
    col = bin_columns(steps, max_columns)
    d["col"] = col[np.searchsorted(steps, d["step"].to_numpy())]
    order = _order(d)
    m = d.pivot_table(index="layer_label", columns="col", values="log_l2", aggfunc="mean", dropna=False)
    m = m.reindex(index=order, columns=np.arange(col[-1] + 1 if len(col) else 0))
    first_step = pd.Series(steps).groupby(col).min().to_numpy()
    ncol = m.shape[1]
    sns.heatmap(m.to_numpy(), ax=ax, cmap="magma", cbar_kws={"label": "log10 ‖g‖₂"},
                xticklabels=False, yticklabels=False, mask=~np.isfinite(m.to_numpy()))
    _value_ticks(ax, first_step, 10)
    nl = len(order)
    ys = max(1, math.ceil(nl / 40))
    ax.set_yticks(np.arange(0, nl, ys) + 0.5)
    ax.set_yticklabels(order[::ys], rotation=0, fontsize="small" if nl > 15 else None)
    binned = len(steps) > ncol
    ax.set_xlabel("step" + (f" ({len(steps)} steps averaged into {ncol} columns)" if binned else ""))
    ax.set_ylabel("layer (id: name)")
    ax.set_title(opts.get("title", "Gradient L2 norm per layer and step (log10)"))
    return ax


@plot(requires=("step", "bin_left", "bin_right", "count"))
def weight_distribution(df: pd.DataFrame, ax, **opts):
    """Distribution of one parameter's weights over time: snapshot step on x, weight value on y
    (largest at the top), colour = log(1 + count) of elements in each bin."""
    m = df.pivot_table(index="bin_left", columns="step", values="count", aggfunc="sum").sort_index(ascending=False)
    edges_left = m.index.to_numpy(np.float64)
    width = float(np.median(df["bin_right"] - df["bin_left"])) if len(df) else 0.0
    steps = m.columns.to_numpy()
    z = np.log1p(m.to_numpy(np.float64))
    nb, ns = z.shape
    # cell (i, j) covers [j, j+1] x [i, i+1] with row 0 at the top, as in a seaborn heatmap (whose
    # extra full draw of the figure cost a third of this figure's time)
    im = ax.imshow(np.ma.masked_invalid(z), cmap="viridis", aspect="auto", interpolation="nearest",
                   extent=(0, ns, nb, 0))
    ax.figure.colorbar(im, ax=ax, label="log(1 + count)")
    ax.grid(False)
    for sp in ax.spines.values():
        sp.set_visible(False)
    _value_ticks(ax, steps, 10)
    # y: rows are bins, the top row the highest; ticks at round weight values
    if nb:
        from matplotlib.ticker import MaxNLocator
        lo, hi = float(edges_left.min()), float(edges_left.max() + width)
        t = MaxNLocator(nbins=8).tick_values(lo, hi)
        t = t[(t >= lo) & (t <= hi)]
        ax.set_yticks((hi - t) / (hi - lo) * nb)
        ax.set_yticklabels([f"{v:.3g}" if abs(v) > 1e-12 * max(abs(lo), abs(hi)) else "0" for v in t], rotation=0)
        if lo < 0 < hi:
            ax.axhline(hi / (hi - lo) * nb, color="white", lw=0.6, ls="--", alpha=0.7)
    ax.set_xlabel("snapshot step")
    ax.set_ylabel("weight value")
    ax.set_title(opts.get("title", "Weight distribution over time"))
    return ax


@plot(requires=("step", "layer_id", "layer", "param", "l2"))
def weight_magnitude(df: pd.DataFrame, ax, **opts):
    """L2 norm of every parameter at every snapshot: colour by layer, dash style by parameter, log y."""
    return _param_lines(df, ax, "l2", "‖w‖₂ (weight units)", opts.get("title", "Weight magnitude over time"))


@plot(requires=("step", "layer_id", "layer", "param", "update_ratio"))
def update_ratio(df: pd.DataFrame, ax, **opts):
    """‖w_t − w_prev‖ / ‖w_prev‖ between consecutive snapshots per parameter (log y); the first
    snapshot (no predecessor) is dropped."""
    d = df[np.isfinite(df["update_ratio"].to_numpy(np.float64))]
    return _param_lines(d, ax, "update_ratio", "‖Δw‖ / ‖w‖ (between snapshots)",
                        opts.get("title", "Weight update ratio over time"))


def _param_lines(df: pd.DataFrame, ax, col: str, ylabel: str, title: str):
    plt, sns = _mpl()
    d = _labels(df.sort_values(["layer_id", "param", "step"]))
    d[col] = _positive(d[col])
    params = list(dict.fromkeys(d["param"]))
    order = _order(d)
    few_points = bool(d.groupby(["layer_id", "param"]).size().max() <= 20)
    kw = dict(x="step", y=col, style="param" if len(params) <= 6 else None,
              style_order=params if len(params) <= 6 else None, markers=few_points, dashes=True,
              estimator=None, errorbar=None, ax=ax, units="series", lw=1.2)
    d["series"] = d["layer_label"] + "/" + d["param"].astype(str)
    if len(order) <= MAX_LEGEND:
        palette = sns.color_palette("tab10" if len(order) <= 10 else "tab20", len(order))
        sns.lineplot(data=d, hue="layer_label", hue_order=order, palette=palette, **kw)
        _legend_outside(ax)
    else:
        ids = d["layer_id"].astype(float)
        norm = plt.Normalize(ids.min(), ids.max())
        sns.lineplot(data=d, hue="layer_id", hue_norm=norm, palette="viridis", legend=False, **kw)
        sm = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
        ax.figure.colorbar(sm, ax=ax, label=f"layer id ({len(order)} layers)", pad=0.02)
    ax.set_yscale("log")
    _integer_x(ax)
    ax.set_xlabel("snapshot step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return ax


@plot(requires=("step", "epoch", "loss"))
def loss_curve(df: pd.DataFrame, ax, **opts):
    """Training loss per step (thin line) with each epoch's mean overlaid."""
    _, sns = _mpl()
    d = df[["step", "epoch", "loss"]].sort_values("step")
    fin = d[np.isfinite(d["loss"].to_numpy(np.float64))]
    sns.lineplot(data=fin, x="step", y="loss", ax=ax, lw=0.8, alpha=0.8, color="#4c72b0",
                 label="per step", estimator=None, errorbar=None)
    _overlay_epoch_means(ax, fin, "loss", color="#c44e52")
    _integer_x(ax)
    ax.set_xlabel("step (iteration)")
    ax.set_ylabel("loss (as passed to rec.step)")
    ax.set_title(opts.get("title", "Training loss"))
    ax.legend(loc="best", fontsize="small")
    return ax


# ---------------------------------------------------------------------------------------- activations
#: Most rows (units) the unit x step raster draws; more units are grouped (fraction dead per group).
MAX_RASTER_ROWS = 256


def _site_order(df: pd.DataFrame, order: Iterable[str] | None) -> list[str]:
    """Sites present in ``df``, in ``order`` (the trace's forward order) where given."""
    present = list(dict.fromkeys(df["site"].astype(str)))
    if order is None:
        return present
    order = [str(s) for s in order]
    return [s for s in order if s in set(present)] + [s for s in present if s not in set(order)]


def _site_palette(n: int):
    _, sns = _mpl()
    if n <= 10:
        return sns.color_palette("tab10", n)
    if n <= 20:
        return sns.color_palette("tab20", n)
    return sns.color_palette("viridis", n)


def _site_lines(ax, d: pd.DataFrame, y: str, order: list[str], legend: bool = True, style: str | None = None,
                x: str = "step", **kw) -> None:
    """One line per site (colour by site in forward order); a legend for a few sites, a colour bar
    (forward position) for many."""
    plt, sns = _mpl()
    d = d.copy()
    d["site_label"] = d["site"].astype(str).map(text)
    labels = [text(s) for s in order]
    many = len(order) > MAX_LEGEND
    few_points = bool(d.groupby("site").size().max() <= 30) if len(d) else False
    if style is None and few_points:
        kw.setdefault("marker", "o")
        kw.setdefault("markersize", 4)
    sns.lineplot(data=d, x=x, y=y, hue="site_label", hue_order=labels, palette=_site_palette(len(order)),
                 style=style, markers=few_points if style else None, estimator=None, errorbar=None,
                 units="site_label", ax=ax, legend=False if (many or not legend) else "auto", lw=1.2, **kw)
    if many and legend:
        sm = plt.cm.ScalarMappable(norm=plt.Normalize(0, len(order) - 1), cmap="viridis")
        ax.figure.colorbar(sm, ax=ax, label=f"site, forward order ({len(order)} sites)", pad=0.02)
    elif legend:
        leg = ax.get_legend()
        if leg is not None:
            h, lab = ax.get_legend_handles_labels()
            lab = ["site" if x == "site_label" else x for x in lab]
            ax.legend(h, lab, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")


@plot(requires=("step", "site", "dead_fraction"))
def dead_heatmap(df: pd.DataFrame, ax, order: Iterable[str] | None = None,
                 max_columns: int = MAX_HEATMAP_COLUMNS, **opts):
    """Site x step heatmap of the fraction of each site's units dead at that step (0 light, 1 dark
    red); rows in ``order`` (forward order), columns steps (averaged over bins of consecutive steps
    when there are more than ``max_columns``)."""
    _, sns = _mpl()
    d = df[["step", "site", "dead_fraction"]].copy()
    d["site"] = d["site"].astype(str)
    rows = _site_order(d, order)
    steps = np.sort(d["step"].unique())
    col = bin_columns(steps, max_columns)
    d["col"] = col[np.searchsorted(steps, d["step"].to_numpy())]
    m = d.pivot_table(index="site", columns="col", values="dead_fraction", aggfunc="mean", dropna=False)
    m = m.reindex(index=rows, columns=np.arange(col[-1] + 1 if len(col) else 0))
    z = m.to_numpy(np.float64)
    sns.heatmap(z, ax=ax, cmap="Reds", vmin=0.0, vmax=1.0, cbar_kws={"label": "fraction of units dead"},
                xticklabels=False, yticklabels=False, mask=~np.isfinite(z), linewidths=0)
    _value_ticks(ax, pd.Series(steps).groupby(col).min().to_numpy(), 10)
    n = len(rows)
    ys = max(1, math.ceil(n / 40))
    ax.set_yticks(np.arange(0, n, ys) + 0.5)
    ax.set_yticklabels([text(s) for s in rows[::ys]], rotation=0, fontsize="small" if n > 15 else None)
    binned = len(steps) > z.shape[1]
    ax.set_xlabel("step" + (f" ({len(steps)} steps averaged into {z.shape[1]} columns)" if binned else ""))
    ax.set_ylabel("activation site (forward order)")
    ax.set_title(opts.get("title", "Dead units per site and step"))
    return ax


@plot(requires=("step", "unit", "dead"))
def dead_raster(df: pd.DataFrame, ax, max_columns: int = MAX_HEATMAP_COLUMNS, max_rows: int = MAX_RASTER_ROWS,
                **opts):
    """Unit x step raster of one site: dark where a unit is dead at a step. More than ``max_rows``
    units (or ``max_columns`` steps) are grouped; a cell then shows the fraction dead in its group."""
    _, sns = _mpl()
    steps = np.sort(df["step"].unique())
    units = np.sort(df["unit"].unique())
    col = bin_columns(steps, max_columns)
    row = bin_columns(units, max_rows)
    d = pd.DataFrame({"col": col[np.searchsorted(steps, df["step"].to_numpy())],
                      "row": row[np.searchsorted(units, df["unit"].to_numpy())],
                      "dead": df["dead"].to_numpy(np.float64)})
    m = d.pivot_table(index="row", columns="col", values="dead", aggfunc="mean", dropna=False)
    m = m.reindex(index=np.arange(row[-1] + 1 if len(row) else 0), columns=np.arange(col[-1] + 1 if len(col) else 0))
    z = m.to_numpy(np.float64)
    grouped = z.shape[0] < len(units) or z.shape[1] < len(steps)
    sns.heatmap(z, ax=ax, cmap="Greys", vmin=0.0, vmax=1.0, xticklabels=False, yticklabels=False,
                mask=~np.isfinite(z), cbar=grouped,
                cbar_kws={"label": "fraction dead in the cell"} if grouped else None)
    _value_ticks(ax, pd.Series(steps).groupby(col).min().to_numpy(), 10)
    from matplotlib.ticker import MaxNLocator
    first_unit = pd.Series(units).groupby(row).min().to_numpy()
    t = MaxNLocator(nbins=10, integer=True).tick_values(first_unit[0], first_unit[-1]) if len(units) else []
    t = [v for v in t if first_unit[0] <= v <= first_unit[-1]]
    ax.set_yticks(np.interp(t, first_unit, np.arange(len(first_unit))) + 0.5 if len(t) else [])
    ax.set_yticklabels([f"{int(v)}" for v in t], rotation=0)
    ax.set_xlabel("step" + (f" ({len(steps)} steps into {z.shape[1]} columns)" if z.shape[1] < len(steps) else ""))
    ax.set_ylabel("unit" + (f" ({len(units)} units into {z.shape[0]} rows)" if z.shape[0] < len(units) else ""))
    ax.set_title(opts.get("title", "Dead units over time (black = dead at that step)"))
    return ax


@plot(requires=("step", "site", "kind", "saturated"), kind="fig")
def saturation_lines(df: pd.DataFrame, fig, order: Iterable[str] | None = None, **opts):
    """Saturated fraction per site over the steps: one panel for bounded kinds (sigmoid, tanh,
    hardtanh, softmax: fraction within delta of a bound) and one for the ReLU family (fraction at or
    below zero), whichever are present; one line per site."""
    d = df[np.isfinite(df["saturated"].to_numpy(np.float64))].copy()
    d["site"] = d["site"].astype(str)
    relu = d["kind"].isin(("relu", "leaky_relu", "elu", "gelu", "silu", "softplus"))
    parts = [(p, t, y) for p, t, y in (
        (d[~relu], "Bounded activations: values within delta of a bound", "fraction saturated"),
        (d[relu], "ReLU family: values at or below zero", "fraction <= 0")) if len(p)]
    axes = fig.subplots(1, max(1, len(parts)), squeeze=False)[0]
    for ax, (p, title, ylabel) in zip(axes, parts):
        _site_lines(ax, p, "saturated", _site_order(p, order))
        ax.set_ylim(-0.02, 1.02)
        _integer_x(ax)
        ax.set_xlabel("step (iteration)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize="medium")
    if opts.get("title"):
        fig.suptitle(opts["title"])
    return fig


@plot(requires=("site", "unit", "mean", "min", "max", "frac_active"), kind="fig")
def activation_distributions(df: pd.DataFrame, fig, order: Iterable[str] | None = None, **opts):
    """Per site (rows, forward order), the distribution over its units of: the fraction of values
    > 0 (left) and the mean activation with the range of the per-unit min and max (right); a box
    per site with every unit as a dot."""
    _, sns = _mpl()
    d = df.copy()
    d["site"] = d["site"].astype(str)
    rows = _site_order(d, order)
    d["site_label"] = d["site"].map(text)
    labels = [text(s) for s in rows]
    axes = fig.subplots(1, 2, sharey=True, squeeze=False)[0]
    many = d.groupby("site").size().max() > 200
    for ax, col, xlabel, title in ((axes[0], "frac_active", "fraction of values > 0 (per unit)",
                                    "Active fraction per unit"),
                                   (axes[1], "mean", "mean activation (per unit); grey: min … max",
                                    "Mean, min and max per unit")):
        v = d[np.isfinite(d[col].to_numpy(np.float64))]
        if col == "mean":
            rng = d.groupby("site_label").agg(lo=("min", "min"), hi=("max", "max")).reindex(labels)
            for i, (lo, hi) in enumerate(zip(rng["lo"], rng["hi"])):
                if np.isfinite(lo) and np.isfinite(hi):
                    ax.plot([lo, hi], [i, i], color="0.75", lw=6, solid_capstyle="butt", zorder=0)
        with warnings.catch_warnings():   # seaborn passes matplotlib's deprecated vert= to bxp
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*vert.*")
            sns.boxplot(data=v, x=col, y="site_label", order=labels, ax=ax, color="#c6dbef", fliersize=0,
                        width=0.6, linewidth=0.8)
        state = np.random.get_state()   # seaborn jitters with numpy's global generator:
        np.random.seed(0)                 # a fixed jitter keeps the figure reproducible
        try:
            sns.stripplot(data=v, x=col, y="site_label", order=labels, ax=ax, color="#08519c",
                          size=2 if many else 3, alpha=0.5 if many else 0.8, jitter=0.2)
        finally:
            np.random.set_state(state)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("activation site (forward order)" if col == "frac_active" else "")
        ax.set_title(title, fontsize="medium")
        if col == "frac_active":
            ax.set_xlim(-0.03, 1.03)
        else:
            lo = np.nanmin(d["min"].to_numpy(np.float64)) if len(d) else 0.0
            hi = np.nanmax(d["max"].to_numpy(np.float64)) if len(d) else 1.0
            if np.isfinite(lo) and np.isfinite(hi) and max(abs(lo), abs(hi)) > 100:
                ax.set_xscale("symlog", linthresh=1.0)
                if lo >= 0:   # nothing negative (ReLU family): no empty negative decades
                    ax.set_xlim(left=-0.05)
    if opts.get("title"):
        fig.suptitle(opts["title"])
    return fig


@plot(requires=("step", "site", "variance", "similarity"), kind="fig")
def variance_similarity(df: pd.DataFrame, fig, order: Iterable[str] | None = None, method: str = "cosine",
                        dim: int = 1, **opts):
    """Per site with raw samples, over the recorded steps: the variance across dimension ``dim``
    (left, log y when it spans > 100x) and the mean pairwise similarity of the slices along it
    (right; cosine in [-1, 1] or KL divergence in nats)."""
    d = df.copy()
    d["site"] = d["site"].astype(str)
    rows = _site_order(d, order)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    v = d[np.isfinite(d["variance"].to_numpy(np.float64))].copy()
    pos = _positive(v["variance"])
    pos = pos[np.isfinite(pos)]
    log = bool(len(pos) and pos.max() / pos.min() > 100.0)
    if log:                       # zero variance cannot be drawn on a log axis: a gap in the line
        v["variance"] = _positive(v["variance"])
    _site_lines(axes[0], v, "variance", rows, legend=False)
    if log:
        axes[0].set_yscale("log")
    axes[0].set_ylabel(f"variance across dim {dim} (mean over positions)")
    axes[0].set_title(f"Variance across dimension {dim}", fontsize="medium")
    s = d[np.isfinite(d["similarity"].to_numpy(np.float64))]
    _site_lines(axes[1], s, "similarity", rows)
    if method == "cosine":
        axes[1].set_ylim(-1.05, 1.05)
        axes[1].set_ylabel("mean cosine similarity of distinct slices")
    else:
        axes[1].set_ylabel("mean KL(p_i || p_j) of slice softmaxes (nats)")
    axes[1].set_title(f"Similarity between slices along dimension {dim} ({method})", fontsize="medium")
    for ax in axes:
        _integer_x(ax)
        ax.set_xlabel("step (samples recorded)")
    if opts.get("title"):
        fig.suptitle(opts["title"])
    return fig


@plot(requires=("threshold", "site", "sparsity"))
def pruning_sweep(df: pd.DataFrame, ax, order: Iterable[str] | None = None, chosen: float | None = None,
                  xlabel: str = "threshold", **opts):
    """Sparsity (fraction of a site's units that the dead criterion removes) versus the threshold,
    one line per site; the thick black line is all sites' units together, the dashed vertical line
    the threshold of this report."""
    plt, sns = _mpl()
    d = df.copy()
    d["site"] = d["site"].astype(str)
    overall = d[d["site"] == "(all sites)"]
    per = d[d["site"] != "(all sites)"]
    rows = _site_order(per, order)
    if len(per):
        _site_lines(ax, per, "sparsity", rows, x="threshold", alpha=0.85)
    if len(overall):
        o = overall.sort_values("threshold")
        ax.plot(o["threshold"], o["sparsity"], color="black", lw=2.5, marker="o", ms=4, label="all sites",
                zorder=5)
        h, lab = ax.get_legend_handles_labels()
        if len(rows) <= MAX_LEGEND:
            ax.legend(h, lab, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    if chosen is not None and np.isfinite(chosen):
        ax.axvline(chosen, color="0.3", ls="--", lw=1.0)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("sparsity (fraction of units dead)")
    ax.set_title(opts.get("title", "Pruning sweep: sparsity versus threshold"))
    return ax
