"""No silent zeros in attention maps: why the Grad-CAM-family maps of a capture are zero, and what to do.

A map is *zero* when it is 0 at every position after the CAM pipeline (ReLU, min-max): the raw map was
<= 0 everywhere or constant. Attention-IoU, L1 and top-k are undefined for such a map (NaN), so a capture
whose maps are all zero scores nothing (n = 0). The usual causes, told apart from the capture itself:

* the gradient of the target with respect to the layer's output is exactly 0 at every map position:
  the output reaches the target only through positions the map does not hold. In a ViT's last block
  only the CLS token feeds the classifier, and the map holds the patch tokens (pytorch-grad-cam's ViT
  tutorial captures the last block's ``layernorm_before`` for this reason);
* the layer's activations are 0 everywhere (a dead layer, or a ``reshape`` that keeps the wrong part);
* otherwise the weighted sum is <= 0 everywhere: the layer's evidence points away from the target.

Never imports torch.
"""

from __future__ import annotations

import warnings

import numpy as np

from .cam import get_cam


class AttentionWarning(UserWarning):
    """Attention maps that are zero everywhere, or scores with nothing scored."""


def zero_maps(maps: np.ndarray) -> np.ndarray:
    """(N,) bool: which of the maps (N, H, W) are 0 at every position."""
    m = np.asarray(maps)
    return ~(m.reshape(len(m), -1) > 0).any(1) if len(m) else np.zeros(0, bool)


def _all_zero(x: np.ndarray) -> np.ndarray:
    """(N,) bool: which of the N arrays stacked in ``x`` are 0 everywhere (NaN counts as 0)."""
    return ~(np.nan_to_num(np.asarray(x, np.float64)).reshape(len(x), -1) != 0).any(1)


def _block_counts(cam, A, G) -> tuple[int, int, int, int]:
    """(images, zero maps, zero maps with a zero gradient, zero maps with zero activations) of a block."""
    z = zero_maps(cam(A, G))
    gz = int((_all_zero(G) & z).sum()) if G is not None else 0
    return len(z), int(z.sum()), gz, int((_all_zero(A) & z).sum())


def zero_map_notes(cap, target: str, method: str = "gradcam") -> list[str]:
    """One note (cause and suggestion) when some of ``target``'s maps in capture ``cap`` are zero
    everywhere; [] when none is. Streams the capture once."""
    cam = get_cam(method)
    t = cap.target(target)
    names = ["activations"] + ([f"grads/{t['key']}"] if cam.needs_grads else [])
    n = z = gz = az = 0
    for _, d in cap.blocks(names):
        a, b, c, e = _block_counts(cam, d["activations"], d.get(f"grads/{t['key']}"))
        n, z, gz, az = n + a, z + b, gz + c, az + e
    if not z:
        return []
    where = f"{method} maps of target {target!r} at layer {cap.target_layer!r} ({cap.name})"
    what = (f"{where} are 0 everywhere for all {n} images, so nothing can be scored" if z == n else
            f"{where} are 0 everywhere for {z} of {n} images, which are not scored")
    if gz == z:
        return [f"{what}: the target's gradient with respect to the layer's output is exactly 0 at every map "
                "position (the output reaches the target only through positions the map does not hold: in a "
                "ViT's last block only the CLS token feeds the classifier). Capture a layer before the last "
                "mixing of tokens instead, such as the last block's layernorm_before or an earlier block (as "
                "pytorch-grad-cam does for ViTs), or use a method without gradients (eigencam)"]
    if az == z:
        return [f"{what}: the layer's activations are 0 everywhere (a dead layer, or a reshape that keeps the "
                "wrong part of the output). Capture another layer or check the reshape"]
    return [f"{what}: the gradient-weighted activations are <= 0 (or constant) everywhere, so the ReLU of the "
            "CAM removes them (the layer's evidence points away from the target). Try layercam, another "
            "target or an earlier layer"]


def empty_mask_notes(cap, mask_group: str) -> list[str]:
    """One note when the mask group is 0 everywhere in some images of ``cap`` (their Attention-IoU is 0
    and their pointing and top-k scores undefined); [] when no mask is empty."""
    key = f"masks/{cap.mask_key(mask_group)}"
    n = e = 0
    for _, d in cap.blocks([key]):
        z = _all_zero(d[key])
        n, e = n + len(z), e + int(z.sum())
    if not e:
        return []
    return [f"mask group {mask_group!r} is empty in {e} of {n} images of {cap.name}: their Attention-IoU is 0 "
            "and their pointing and top-k scores are undefined. Check the masks the loader gave"]


def scored_notes(df, notes: list[str]) -> list[str]:
    """``notes`` plus one line per score of an Attention-IoU result that scored no image at all (its
    "all" split has n = 0) when no note explains it yet."""
    out = list(notes)
    if df is None or not len(df):
        return out
    empty = sorted(set(df.loc[(df["split"] == "all") & (df["n"] == 0), "score"]))
    if empty and not out:
        out.append(f"no image was scored for {', '.join(empty)}: every per-image value is undefined (a map or "
                   "a mask that is 0 everywhere)")
    return out


def warn(notes: list[str]) -> None:
    """Issue each note as an :class:`AttentionWarning`."""
    for n in notes:
        warnings.warn(n, AttentionWarning, stacklevel=3)


__all__ = ["AttentionWarning", "zero_maps", "zero_map_notes", "empty_mask_notes", "scored_notes", "warn"]
