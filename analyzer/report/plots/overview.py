"""The overview heatmaps: every layer of a model at once, layer x step, grouped by block.

A 150-layer transformer gets one figure per quantity instead of one per layer. Rows are layers in id
order, labelled by their names with the common prefix removed (``transformer.h.3.attn.c_attn`` ->
``h.3.attn.c_attn``), every row labelled; repeated blocks (the first numbered part of a name, ``h.3``,
``encoder.layer.7``, ``layers.0``) are separated by lines and named on the right. Columns are steps,
averaged over bins of consecutive steps past :data:`~.common.MAX_HEATMAP_COLUMNS`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .common import MAX_HEATMAP_COLUMNS, bin_columns, mpl, plot, positive, text, value_ticks

#: Height of one heatmap row (inches): 0.15 in = 10.8 pt holds a 7-point label.
ROW_INCHES = 0.15


def common_prefix(names: list[str]) -> str:
    """The longest dotted prefix (whole components, with its trailing dot) shared by every name of
    ``names``, leaving each at least its last component. ``""`` when there is none."""
    parts = [n.split(".") for n in names if n]
    if len(parts) < 2:
        return ""
    k = 0
    while all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
        k += 1
    return ".".join(parts[0][:k]) + "." if k else ""


def short_names(names: list[str]) -> list[str]:
    """``names`` without their :func:`common_prefix` ("(model)" for the root module's empty name)."""
    pre = common_prefix(names)
    return [n[len(pre):] if n else "(model)" for n in names]


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
    return max(3.2, 1.5 + ROW_INCHES * rows)


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
                  cmap: str = "magma", max_columns: int = MAX_HEATMAP_COLUMNS):
    """Draw the layer x step heatmap of ``value`` on ``ax`` with every layer labelled and blocks marked.

    Args:
        df: rows (step, layer_id, layer, ``value``).
        label: the colour bar's label. title: the axes title.
        log: colour by log10 of the value.
    """
    plt, _ = mpl()
    m, layers, first, nsteps = layer_matrix(df, value, log, max_columns)
    names = [str(n) for n in layers["layer"]]
    shorts = short_names(names)
    n = len(shorts)
    fin = m[np.isfinite(m)]
    vmin, vmax = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
    img = ax.imshow(np.ma.masked_invalid(m), aspect="auto", interpolation="nearest", cmap=cmap,
                    vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-12,
                    extent=(0, m.shape[1], n, 0))
    ax.figure.colorbar(img, ax=ax, label=label, pad=0.01, fraction=0.03)
    ax.grid(False)
    value_ticks(ax, first, 10)
    size = 9 if n <= 30 else 7
    ax.set_yticks(np.arange(n) + 0.5)
    ax.set_yticklabels([text(f"{int(i)}: {s}") for i, s in zip(layers["layer_id"], shorts)], fontsize=size)
    blocks = [block_of(s) for s in shorts]
    spans, start = [], 0
    for i in range(1, n + 1):
        if i == n or blocks[i] != blocks[start]:
            spans.append((blocks[start], start, i))
            start = i
    for _, a, _b in spans[1:]:
        ax.axhline(a, color="white", lw=1.2)
    named = [(b, a, e) for b, a, e in spans if b]
    if named:
        right = ax.secondary_yaxis("right")
        right.set_yticks([(a + e) / 2 for _, a, e in named])
        right.set_yticklabels([text(b) for b, _, _ in named], fontsize=size)
        right.tick_params(length=0)
    binned = nsteps > m.shape[1]
    ax.set_xlabel("step" + (f" ({nsteps} steps averaged into {m.shape[1]} columns)" if binned else ""))
    pre = common_prefix(names)
    ax.set_ylabel("layer (id: name" + (f", after {text(pre)}" if pre else "") + ")")
    ax.set_title(title)
    return ax


@plot(requires=("step", "layer_id", "layer", "l2"))
def grad_heatmap(df: pd.DataFrame, ax, max_columns: int = MAX_HEATMAP_COLUMNS, **opts):
    """Layer x step heatmap of log10 of each layer's gradient L2 norm (all its parameters together)."""
    return layer_heatmap(df, ax, "l2", "log10 ‖g‖₂", opts.get("title", "Gradient L2 norm per layer and step (log10)"),
                         max_columns=max_columns)


@plot(requires=("step", "layer_id", "layer", "update_ratio"))
def update_ratio_heatmap(df: pd.DataFrame, ax, max_columns: int = MAX_HEATMAP_COLUMNS, **opts):
    """Layer x snapshot heatmap of log10 of each layer's update ratio ‖Δw‖/‖w_prev‖."""
    return layer_heatmap(df, ax, "update_ratio", "log10 ‖Δw‖ / ‖w‖", opts.get(
        "title", "Weight update ratio per layer and snapshot (log10)"), cmap="viridis", max_columns=max_columns)


@plot(requires=("step", "layer_id", "layer", "l2"))
def weight_l2_heatmap(df: pd.DataFrame, ax, max_columns: int = MAX_HEATMAP_COLUMNS, **opts):
    """Layer x snapshot heatmap of log10 of each layer's weight L2 norm (all its parameters together)."""
    return layer_heatmap(df, ax, "l2", "log10 ‖w‖₂", opts.get("title", "Weight L2 norm per layer and snapshot (log10)"),
                         cmap="cividis", max_columns=max_columns)


def heatmap_figure(plotfn, df: pd.DataFrame, width: float = 12.0):
    """A figure sized for ``df``'s layers with ``plotfn`` (one of the heatmaps above) drawn on it."""
    from .common import new_figure
    n = int(df["layer_id"].nunique())
    fig, ax = new_figure(width, heatmap_height(n))
    plotfn(df, ax[0, 0])
    return fig


__all__ = ["ROW_INCHES", "common_prefix", "short_names", "block_of", "heatmap_height", "layer_matrix",
           "layer_heatmap", "grad_heatmap", "update_ratio_heatmap", "weight_l2_heatmap", "heatmap_figure"]
