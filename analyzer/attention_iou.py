"""Attention-IoU (Serianni et al., CVPR 2025) and companion scores, from attention captures, without torch.

Per image, with attention map A and mask (or second map) M, both >= 0, a = A / sum A, m = M / sum M:

    iou       S = sum(a m) / sum(((a + m) / 2)^2)          in [0, 1]; 1 iff a == m; empty mask -> 0
    l1        1 - 0.5 sum |a - m|
    pointing  M'[argmax A], M' = M / max M (the pointing game; 1 for a hit on a binary mask)
    topk      IoU of the k most attended pixels with {M' > 0.5}, k = #(M' > 0.5)

Means skip NaN (a map or mask that is zero everywhere where the score is undefined). The bootstrap
resamples images with replacement (resample b uses row b of ``rng.integers(0, n, (B, n))`` of a
seeded ``numpy.random.Generator``) and reports the mean and std of the resample means.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd

from .cam import get_cam, resize_bilinear
from .cam_notes import empty_mask_notes, scored_notes, warn, zero_map_notes, zero_maps
from .trace.captures import Capture, pick
from .trace.format import TraceError

SCORES = ("iou", "l1", "pointing", "topk")
RESOLUTIONS = ("image", "map")
RESULT_COLUMNS = ["capture", "step", "epoch", "target", "reference", "kind", "method", "resolution", "score",
                  "split", "n", "mean", "boot_mean", "boot_std", "ci_low", "ci_high"]
#: Most resampled indices drawn at once by the bootstrap (bounds its memory to ~32 MiB).
BOOT_CHUNK = 1 << 22


def capture_table(caps: list) -> pd.DataFrame:
    """One row per capture (``Run.captures``): position, index, step, epoch, n_images, target_layer,
    targets, masks, groups (names joined by commas)."""
    return pd.DataFrame({"position": range(len(caps)), "index": [c.index for c in caps],
                         "step": [c.step for c in caps], "epoch": [c.epoch for c in caps],
                         "n_images": [c.n for c in caps], "target_layer": [c.target_layer for c in caps],
                         "targets": [",".join(t["name"] for t in c.targets) for c in caps],
                         "masks": [",".join(c.mask_names.values()) for c in caps],
                         "groups": [",".join(c.group_names) for c in caps]})


def chosen_captures(caps: list, capture: Any, run_dir: str) -> list:
    """The captures that ``capture`` names: "all" (every one) or a position (-1: the latest).

    Raises:
        TraceError: no capture, or a position out of range."""
    chosen = caps if capture == "all" else [pick(caps, capture, run_dir)]
    if not chosen:
        pick(chosen, -1, run_dir)
    return list(chosen)


def _flat(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"maps must be (H, W) or (N, H, W), not {x.shape}")
    return x.reshape(x.shape[0], -1)


def _normalise(x: np.ndarray) -> np.ndarray:
    s = x.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, x / np.where(s > 0, s, 1.0), np.nan)


def _pair(A, M):
    a, m = _flat(A), _flat(M)
    if a.shape != m.shape:
        raise ValueError(f"map {np.shape(A)} and mask {np.shape(M)} differ in shape")
    if (a < 0).any() or (m < 0).any():
        raise ValueError("maps and masks must be >= 0")
    return a, m


def iou_score(A: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Attention-IoU S per image.

    Args:
        A: attention maps (N, H, W) or (H, W), >= 0.
        M: masks or second maps of the same shape, >= 0.

    Returns:
        (N,) float64 in [0, 1]: 0 where M is empty, NaN where A is zero everywhere.
    """
    a, m = _pair(A, M)
    msum = m.sum(1)
    an, mn = _normalise(a), _normalise(m)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = (an * mn).sum(1) / (((an + mn) / 2) ** 2).sum(1)
    return np.where((msum == 0) & (a.sum(1) > 0), 0.0, s)


def l1_score(A: np.ndarray, M: np.ndarray) -> np.ndarray:
    """1 - 0.5 sum|a - m| per image, (N,) in [0, 1]; NaN where A or M is zero everywhere."""
    a, m = _pair(A, M)
    return 1.0 - 0.5 * np.abs(_normalise(a) - _normalise(m)).sum(1)


def pointing_score(A: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Pointing game: M / max(M) at the argmax of A, (N,) in [0, 1]; NaN where M is empty."""
    a, m = _pair(A, M)
    mx = m.max(1)
    v = m[np.arange(len(m)), a.argmax(1)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mx > 0, v / np.where(mx > 0, mx, 1.0), np.nan)


def topk_score(A: np.ndarray, M: np.ndarray) -> np.ndarray:
    """Top-k IoU: the k most attended pixels against {M/max M > 0.5}, k = its size. (N,); NaN if k == 0.
    Ties in A are broken by pixel order (a stable sort)."""
    a, m = _pair(A, M)
    mx = m.max(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        binm = np.where(mx > 0, m / np.where(mx > 0, mx, 1.0), 0.0) > 0.5
    k = binm.sum(1)
    rank = np.empty_like(a, dtype=np.int64)
    order = np.argsort(-a, axis=1, kind="stable")
    rank[np.arange(len(a))[:, None], order] = np.arange(a.shape[1])[None, :]
    top = rank < k[:, None]
    inter = (top & binm).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k > 0, inter / (2 * k - inter), np.nan)


SCORE_FUNCS = {"iou": iou_score, "l1": l1_score, "pointing": pointing_score, "topk": topk_score}


def bootstrap(values: np.ndarray, n_boot: int = 10000, seed: int = 0) -> dict:
    """Mean of ``values`` (NaN skipped) with a seeded, vectorised bootstrap of the mean.

    Args:
        values: (n,) per-image scores.
        n_boot: number of resamples (0: no bootstrap; boot_* are NaN).
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        dict n, mean, boot_mean, boot_std (ddof 0), ci_low, ci_high (2.5 / 97.5 percentiles).
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    x = x[np.isfinite(x)]
    n = len(x)
    out = {"n": n, "mean": float(x.mean()) if n else np.nan, "boot_mean": np.nan, "boot_std": np.nan,
           "ci_low": np.nan, "ci_high": np.nan}
    if not n or n_boot <= 0:
        return out
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_boot))
    step = max(1, BOOT_CHUNK // n)
    for s in range(0, int(n_boot), step):
        c = min(step, int(n_boot) - s)
        means[s:s + c] = x[rng.integers(0, n, size=(c, n))].mean(1)
    out.update(boot_mean=float(means.mean()), boot_std=float(means.std()),
               ci_low=float(np.percentile(means, 2.5)), ci_high=float(np.percentile(means, 97.5)))
    return out


def downsample_mask(M: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Masks (N, Hm, Wm) bilinearly resized to the map size (h, w) and max-normalised (empty stays 0)."""
    r = np.maximum(resize_bilinear(np.asarray(M, dtype=np.float32), size), 0.0)
    mx = r.max(axis=(-2, -1), keepdims=True)
    return np.where(mx > 0, r / np.where(mx > 0, mx, 1.0), 0.0).astype(np.float32)


def _size(cap: Capture, size: Any) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, str):
        if size != "image":
            raise ValueError(f"size must be None, 'image' or (H, W), not {size!r}")
        return cap.image_size
    try:
        H, W = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be None, 'image' or (H, W), not {size!r}") from None
    if not (1 <= H <= 1 << 14 and 1 <= W <= 1 << 14):
        raise ValueError(f"size {size!r} is out of range")
    return H, W


def capture_maps(cap: Capture, target: str, method: str = "gradcam", size: Any = None):
    """Yield ``(start, maps)`` blocks of attention maps (B, H, W) float32 in [0, 1] for one capture."""
    cam = get_cam(method)
    t = cap.target(target)
    out_size = _size(cap, size)
    names = ["activations"] + ([f"grads/{t['key']}"] if cam.needs_grads else [])
    for s, d in cap.blocks(names):
        yield s, cam(d["activations"], d.get(f"grads/{t['key']}"), size=out_size)


def attention_maps(cap: Capture, target: str, method: str = "gradcam", size: Any = None) -> np.ndarray:
    """All maps of one capture, (N, H, W) float32 in [0, 1] (H, W = the layer's, the image's or ``size``).
    Maps that are 0 everywhere are reported with an :class:`~analyzer.cam_notes.AttentionWarning`
    (their likely cause and what to capture instead)."""
    parts = [m for _, m in capture_maps(cap, target, method, size)]
    maps = np.concatenate(parts) if parts else np.zeros((0, cap.h, cap.w), np.float32)
    if zero_maps(maps).any():
        warn(zero_map_notes(cap, target, method))
    return maps


def per_image_scores(cap: Capture, target: str, mask_group: str | None = None, protected: str | None = None,
                     method: str = "gradcam", resolution: str = "image", scores: Iterable[str] = ("iou",)
                     ) -> dict[str, np.ndarray]:
    """Per-image scores of ``target``'s maps against a mask group or the ``protected`` target's maps.

    Streams the capture in blocks of images. ``resolution="image"``: maps upsampled to the masks
    (heatmap score: both maps at the image size); ``"map"``: masks downsampled to the map and
    max-normalised (heatmap score: both maps at the layer's resolution).

    Returns:
        {score name: (N,) float64}.
    """
    if (mask_group is None) == (protected is None):
        raise ValueError("give exactly one of mask_group and protected")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {', '.join(RESOLUTIONS)}, not {resolution!r}")
    scores = list(scores)
    bad = [s for s in scores if s not in SCORE_FUNCS]
    if bad or not scores:
        raise ValueError(f"unknown score(s) {', '.join(bad) or '(none)'} (choose from {', '.join(SCORES)})")
    cam = get_cam(method)
    t = cap.target(target)
    tp = cap.target(protected) if protected is not None else None
    mk = cap.mask_key(mask_group) if mask_group is not None else None
    names = ["activations"]
    if cam.needs_grads:
        names += [f"grads/{t['key']}"] + ([f"grads/{tp['key']}"] if tp is not None and tp is not t else [])
    if mk is not None:
        names.append(f"masks/{mk}")
    out = {s: [] for s in scores}
    for _, d in cap.blocks(names):
        A = d["activations"]
        if mk is not None:
            M = d[f"masks/{mk}"].astype(np.float32)
            if resolution == "image":
                a = cam(A, d.get(f"grads/{t['key']}"), size=M.shape[-2:])
            else:
                a = cam(A, d.get(f"grads/{t['key']}"))
                M = downsample_mask(M, a.shape[-2:])
        else:
            size = cap.image_size if resolution == "image" else None
            a = cam(A, d.get(f"grads/{t['key']}"), size=size)
            M = cam(A, d.get(f"grads/{tp['key']}"), size=size)
        for s in scores:
            out[s].append(SCORE_FUNCS[s](a, M))
    return {s: np.concatenate(v) for s, v in out.items()}


def _group_frame(cap: Capture) -> pd.DataFrame:
    """Group labels, one column per group name (empty frame when none were captured)."""
    g = cap.group_labels()
    if g is None:
        return pd.DataFrame(index=range(cap.n))
    return pd.DataFrame(g, columns=cap.group_names)


def splits(cap: Capture, target: str, by: Any = "all") -> list[tuple[str, np.ndarray]]:
    """``(split name, (N,) bool)``: all, correct, incorrect, then one per joint value of the group
    columns in ``by`` ("all": every captured group column; None or []: no group splits)."""
    ok = cap.correct(target)
    out = [("all", np.ones(cap.n, bool)), ("correct", ok), ("incorrect", ~ok)]
    g = _group_frame(cap)
    cols = list(g.columns) if by == "all" else ([by] if isinstance(by, str) else list(by or []))
    missing = [c for c in cols if c not in g.columns]
    if missing:
        raise TraceError(f"unknown group label(s) {', '.join(map(repr, missing))} in {cap.name} "
                         f"(captured: {', '.join(g.columns) or 'none'})")
    if cols:
        keys = g[cols].to_numpy()
        for row in np.unique(keys, axis=0):
            sel = (keys == row[None, :]).all(1)
            out.append((",".join(f"{c}={int(v)}" for c, v in zip(cols, row)), sel))
    return out


def attention_iou(cap: Capture, target: str, mask_group: str | None = None, protected: str | None = None,
                  method: str = "gradcam", resolution: str = "image", scores: Iterable[str] = ("iou",),
                  n_boot: int = 10000, seed: int = 0, by: Any = "all") -> pd.DataFrame:
    """Mask score (``mask_group``) or heatmap score (``protected``) of one capture, per split, with bootstrap.

    Returns:
        DataFrame with :data:`RESULT_COLUMNS`: one row per (score, split); ``mean`` is the plain mean
        over the split's images (NaN skipped), ``boot_mean``/``boot_std`` the mean and std of the
        ``n_boot`` resample means, ``ci_low``/``ci_high`` their 2.5/97.5 percentiles. Scores are unitless.
        ``df.attrs["notes"]``: why images went unscored (maps 0 everywhere: cause and suggestion; or
        nothing scored), also issued as :class:`~analyzer.cam_notes.AttentionWarning`; [] when all scored.
    """
    if int(n_boot) < 0:
        raise ValueError("the number of bootstrap resamples must be >= 0")
    per = per_image_scores(cap, target, mask_group, protected, method, resolution, scores)
    sp = splits(cap, target, by)
    rows = []
    for s, v in per.items():
        for name, sel in sp:
            b = bootstrap(v[sel], n_boot, seed)
            rows.append({"capture": cap.index, "step": cap.step, "epoch": cap.epoch, "target": target,
                         "reference": mask_group if mask_group is not None else protected,
                         "kind": "mask" if mask_group is not None else "heatmap", "method": method,
                         "resolution": resolution, "score": s, "split": name, **b})
    df = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    notes = []
    if any((~(v > 0)).any() for v in per.values()):   # scores 0 or undefined: zero maps or empty masks?
        for t in [target] + ([protected] if protected is not None and protected != target else []):
            notes += zero_map_notes(cap, t, method)
        notes += empty_mask_notes(cap, mask_group) if mask_group is not None else []
    df.attrs["notes"] = scored_notes(df, notes)
    warn(df.attrs["notes"])
    return df


def attention_iou_captures(caps: list, target: str, mask_group: str | None = None, protected: str | None = None,
                           method: str = "gradcam", resolution: str = "image", scores: Iterable[str] = ("iou",),
                           n_boot: int = 10000, seed: int = 0, by: Any = "all") -> pd.DataFrame:
    """:func:`attention_iou` of several captures, one table (``attrs["notes"]``: every capture's notes)."""
    dfs = [attention_iou(c, target, mask_group, protected, method, resolution, scores, n_boot, seed, by)
           for c in caps]
    notes = [n for d in dfs for n in d.attrs.get("notes", [])]
    df = pd.concat(dfs, ignore_index=True) if dfs else pd.DataFrame(columns=RESULT_COLUMNS)
    df.attrs = {"notes": notes}
    return df


__all__ = ["SCORES", "SCORE_FUNCS", "iou_score", "l1_score", "pointing_score", "topk_score", "bootstrap",
           "downsample_mask", "attention_maps", "capture_maps", "per_image_scores", "splits", "attention_iou",
           "attention_iou_captures"]
