"""Feature evolution: one layer's output for a fixed probe input over training (``RUN/features/``).

Reads the captures written by recorder/features.py, renders a grid (captures x channels) and an
animated GIF (matplotlib.animation with PillowWriter). Never imports torch.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd

from .trace import format as fmt
from . import plots
from .trace.format import TraceError


def feature_captures(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every feature capture of a run: index, path, layer, step, epoch, shape (N first), validated.

    Raises:
        TraceError: a malformed capture file (one line).
    """
    import h5py
    rows = []
    for idx, path in fmt.list_features(run_dir):
        try:
            with h5py.File(path, "r") as f:
                attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
                attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
                ds = f.get("values")
                shape = ds.shape if isinstance(ds, h5py.Dataset) else None
        except OSError as e:
            raise TraceError(f"cannot read feature capture {path}: {e}") from None
        d = fmt.validate_feature_capture(attrs, shape, os.path.basename(path))
        rows.append({"index": idx, "path": path, **d})
    return pd.DataFrame(rows, columns=["index", "path", "layer", "step", "epoch", "shape"])


def feature_maps(run_dir: str | os.PathLike, layer: str, sample: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's output for one probe sample at every capture, in capture order.

    Args:
        run_dir: the run. layer: dotted module name as captured. sample: which probe input (row of N).

    Returns:
        (maps, steps, epochs): maps float32 (T, C, H, W) -- a (N, C) output becomes (T, C, 1, 1), a
        (N, C, L) output (T, C, 1, L) --; steps and epochs int64 (T,).

    Raises:
        TraceError: no capture of ``layer`` (the captured layers are named), or inconsistent shapes.
        ValueError: ``sample`` out of range.
    """
    import h5py
    caps = feature_captures(run_dir)
    sel = caps[caps["layer"] == layer]
    if not len(sel):
        have = sorted(set(caps["layer"]))
        raise TraceError(f"no feature captures of layer {layer!r} in {os.fspath(run_dir)}"
                         + (f" (captured: {', '.join(have)})" if have else
                            "; record them with Recorder(..., probe=(x, layer)) or rec.capture_features(x, layer)"))
    shapes = set(sel["shape"])
    if len(shapes) != 1:
        raise TraceError(f"feature captures of {layer!r} have different shapes {sorted(shapes)}")
    shape = shapes.pop()
    if isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or not 0 <= sample < shape[0]:
        raise ValueError(f"sample must be an int in [0, {shape[0]}), not {sample!r}")
    out = []
    for path in sel["path"]:
        with h5py.File(path, "r") as f:
            out.append(np.asarray(f["values"][int(sample)], dtype=np.float32))
    maps = np.stack(out)
    if maps.ndim == 2:
        maps = maps[:, :, None, None]
    elif maps.ndim == 3:
        maps = maps[:, :, None, :]
    elif maps.ndim > 4:
        maps = maps.reshape(maps.shape[0], maps.shape[1], -1, maps.shape[-1])
    return maps, sel["step"].to_numpy(np.int64), sel["epoch"].to_numpy(np.int64)


def parse_channels(text: str | Sequence[int] | None, n_channels: int, default: int = 8) -> list[int]:
    """Channels to show: None (the first ``default``), "0,1,2", "0:8" (half-open) or a list of ints.

    Raises:
        ValueError: a malformed or out-of-range channel (one line).
    """
    if text is None:
        return list(range(min(default, n_channels)))
    if isinstance(text, str):
        try:
            if ":" in text:
                a, b = text.split(":", 1)
                ch = list(range(int(a) if a.strip() else 0, int(b) if b.strip() else n_channels))
            else:
                ch = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"channels must be like 0,1,2 or 0:8, not {text!r}") from None
    else:
        ch = [int(c) for c in text]
    if not ch:
        raise ValueError("no channels selected")
    bad = [c for c in ch if not 0 <= c < n_channels]
    if bad:
        raise ValueError(f"channel {bad[0]} out of range: the layer has {n_channels} channels (0..{n_channels - 1})")
    return ch


def _limits(maps: np.ndarray, channels: list[int]) -> list[tuple[float, float]]:
    """Colour limits per channel, shared across captures (so the evolution is comparable)."""
    out = []
    for c in channels:
        v = maps[:, c]
        fin = v[np.isfinite(v)]
        lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
        out.append((lo, hi if hi > lo else lo + 1e-12))
    return out


def render_grid(maps: np.ndarray, steps: np.ndarray, channels: list[int], path: str, layer: str = "",
                max_rows: int = 24) -> str:
    """PNG grid: one row per capture (at most ``max_rows``, evenly spaced), one column per channel,
    colour limits per channel shared over time. Returns ``path``."""
    plt, _ = plots._mpl()
    T = maps.shape[0]
    rows = np.unique(np.linspace(0, T - 1, min(T, max_rows)).round().astype(int))
    lims = _limits(maps, channels)
    fig, axes = plt.subplots(len(rows), len(channels), figsize=(1.6 * len(channels) + 1, 1.6 * len(rows) + 0.6),
                             squeeze=False, layout="constrained")
    for i, t in enumerate(rows):
        for j, c in enumerate(channels):
            ax = axes[i, j]
            ax.imshow(maps[t, c], cmap="viridis", vmin=lims[j][0], vmax=lims[j][1], aspect="auto",
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"ch {c}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"step {int(steps[t])}", fontsize=8)
    fig.suptitle(plots.text(f"Feature evolution of {layer}" if layer else "Feature evolution"))
    return plots.save(fig, path)


def render_gif(maps: np.ndarray, steps: np.ndarray, channels: list[int], path: str, fps: float = 2.0,
               layer: str = "") -> str:
    """Animated GIF (PillowWriter), one frame per capture, one panel per channel, colour limits per
    channel shared over time. Written to a temporary name, then renamed. Returns ``path``."""
    plt, _ = plots._mpl()
    from matplotlib.animation import FuncAnimation, PillowWriter
    if not (fps > 0):
        raise ValueError(f"fps must be > 0, not {fps}")
    lims = _limits(maps, channels)
    fig, axes = plt.subplots(1, len(channels), figsize=(1.8 * len(channels) + 0.4, 2.4), squeeze=False)
    ims = []
    for j, c in enumerate(channels):
        ax = axes[0, j]
        ims.append(ax.imshow(maps[0, c], cmap="viridis", vmin=lims[j][0], vmax=lims[j][1], aspect="auto",
                             interpolation="nearest"))
        ax.set_title(f"ch {c}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    title = fig.suptitle("")

    def frame(t):
        for j, c in enumerate(channels):
            ims[j].set_data(maps[t, c])
        title.set_text(plots.text(f"{layer}  step {int(steps[t])}"))
        return ims

    anim = FuncAnimation(fig, frame, frames=maps.shape[0], blit=False)
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        anim.save(tmp, writer=PillowWriter(fps=fps))
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def slice_similarity(x: np.ndarray, dim: int = 1, method: str = "cosine") -> float:
    """Mean pairwise similarity between the slices of ``x`` along ``dim`` (axis 0 is the batch), with
    the conventions of :func:`analyzer.activations.similarity`: slice i = every value with index i
    along ``dim`` (all samples), flattened; "cosine": mean over ordered pairs i != j of cos(s_i, s_j)
    (an all-zero slice gives 0); "kl" (or "kl_divergence"): p_i = softmax(s_i), mean over ordered pairs
    i != j of KL(p_i || p_j) in nats.

    Returns:
        float (NaN when there are fewer than 2 slices).
    """
    if method == "kl_divergence":
        method = "kl"
    if method not in ("cosine", "kl"):
        raise ValueError(f"method must be 'cosine' or 'kl_divergence', not {method!r}")
    x = np.asarray(x, dtype=np.float64)
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not -x.ndim <= dim < x.ndim \
            or int(dim) % x.ndim == 0:
        raise ValueError(f"dim must be a feature axis in [1, {x.ndim}) for an output of shape {x.shape}, not {dim!r}")
    m = np.moveaxis(x, int(dim) % x.ndim, 0).reshape(x.shape[int(dim)], -1)
    n = m.shape[0]
    if n < 2:
        return float("nan")
    if method == "cosine":
        norm = np.linalg.norm(m, axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            u = np.where(norm > 0, m / np.where(norm > 0, norm, 1.0), 0.0)
        c = u @ u.T
        return float((c.sum() - np.trace(c)) / (n * (n - 1)))
    z = m - m.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    p = np.exp(logp)
    kl = (p * logp).sum(1)[:, None] - p @ logp.T
    return float((kl.sum() - np.trace(kl)) / (n * (n - 1)))
