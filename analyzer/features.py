"""Feature evolution: one layer's output for a fixed probe input over training (``RUN/features/``).

Reads the captures written by recorder/features.py (the figures, a grid and an animated GIF, are
:mod:`analyzer.report.plots.features`). Never imports torch.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pandas as pd

from .trace import files
from .trace.captures import list_features, read_feature_info, read_feature_sample
from .trace.format import TraceError


def feature_captures(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Every feature capture of a run: index, path, layer, step, epoch, shape (N first), validated.

    Raises:
        TraceError: a malformed capture file (one line).
    """
    rows = []
    for idx, path in list_features(run_dir):
        files.check_trace_file(path, run_dir, "feature capture")
        rows.append({"index": idx, "path": path, **read_feature_info(path)})
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
        out.append(read_feature_sample(path, sample))
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
                lo, hi = int(a) if a.strip() else 0, int(b) if b.strip() else n_channels
                if not 0 <= lo < n_channels or hi > n_channels:   # checked before a list is built
                    bad = lo if not 0 <= lo < n_channels else hi - 1
                    raise IndexError(bad)
                ch = list(range(lo, hi))
            else:
                ch = [int(s) for s in text.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"channels must be like 0,1,2 or 0:8, not {text!r:.60}") from None
        except IndexError as e:
            raise ValueError(f"channel {e.args[0]} out of range: the layer has {n_channels} channels "
                             f"(0..{n_channels - 1})") from None
    else:
        ch = [int(c) for c in text]
    if not ch:
        raise ValueError("no channels selected")
    bad = [c for c in ch if not 0 <= c < n_channels]
    if bad:
        raise ValueError(f"channel {bad[0]} out of range: the layer has {n_channels} channels (0..{n_channels - 1})")
    return ch


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
