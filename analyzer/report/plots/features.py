"""Feature evolution figures: one layer's output for a fixed probe input over training, as a grid
(captures x channels) and an animated GIF (matplotlib.animation with PillowWriter). The data
(:func:`analyzer.features.feature_maps`) is :mod:`analyzer.features`."""

from __future__ import annotations

import numpy as np

from ...trace.files import atomic_write
from .common import mpl, save, text


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
    plt, _ = mpl()
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
    fig.suptitle(text(f"Feature evolution of {layer}" if layer else "Feature evolution"))
    return save(fig, path)


def render_gif(maps: np.ndarray, steps: np.ndarray, channels: list[int], path: str, fps: float = 2.0,
               layer: str = "") -> str:
    """Animated GIF (PillowWriter), one frame per capture, one panel per channel, colour limits per
    channel shared over time. Written to a temporary name, then renamed. Returns ``path``."""
    plt, _ = mpl()
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
        title.set_text(text(f"{layer}  step {int(steps[t])}"))
        return ims

    anim = FuncAnimation(fig, frame, frames=maps.shape[0], blit=False)
    try:
        atomic_write(path, lambda tmp: anim.save(tmp, writer=PillowWriter(fps=fps)))
    finally:
        plt.close(fig)
    return path
