"""Reading attention captures (``RUN/captures/capture-NNNNNN.h5``) out of core, without torch.

A capture is validated when it is opened (shapes agree, sizes sane; one-line :class:`TraceError`
otherwise) and read in blocks of images, so that thousands of captured images never sit in memory
at once.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import pandas as pd

from .trace import format as fmt
from .trace.format import TraceError

#: Bytes of activations + gradients read per block of images.
BLOCK_BYTES = 32 << 20


class Capture:
    """One capture file: metadata on open, data by blocks of images.

    Attributes:
        index: capture index (from the file name). path: file path. n: number of images.
        K, h, w: channels and spatial size of the target layer. image_size: (H, W) of the inputs.
        targets: list of {name, key, kind, index}. mask_keys / mask_names: stored mask groups.
        group_names: names of the group columns. step, epoch: when it was captured (-1: stand-alone).
    """

    def __init__(self, path: str, index: int = -1):
        import h5py
        self.path = path
        self.index = index
        self.name = os.path.join(fmt.CAPTURES_DIR, os.path.basename(path))
        try:
            with h5py.File(path, "r", locking=False) as f:
                attrs = {k: _py(v) for k, v in f.attrs.items()}
                shapes: dict = {}
                f.visititems(lambda k, o: shapes.__setitem__(k, o.shape) if isinstance(o, h5py.Dataset) else None)
                dtypes = {k: f[k].dtype for k in shapes}
        except TraceError:
            raise
        except Exception as e:  # truncated or random file
            raise TraceError(f"corrupt or unreadable capture {self.name}: {_short(e)}") from None
        d = fmt.validate_capture(attrs, shapes, self.name)
        for k, dt in dtypes.items():
            if dt.kind not in "fiub":
                raise TraceError(f"{self.name}: dataset {k!r} has a non-numeric dtype {dt}")
        self.__dict__.update(d)
        self.n_classes = int(shapes["logits"][1])
        self.label_shape = tuple(shapes["labels"][1:])
        self.has_groups = "groups" in shapes
        self._target = {t["name"]: t for t in self.targets}

    def target(self, name: str) -> dict:
        """The target entry called ``name``; TraceError listing the known ones otherwise."""
        t = self._target.get(name)
        if t is None:
            raise TraceError(f"unknown target {name!r} in {self.name} (captured: "
                             f"{', '.join(self._target)})")
        return t

    def mask_key(self, group: str) -> str:
        """Dataset key of the mask group called ``group`` (by name or key)."""
        for k, nm in self.mask_names.items():
            if group in (k, nm):
                return k
        known = ", ".join(self.mask_names.values()) or "none"
        raise TraceError(f"unknown mask group {group!r} in {self.name} (captured: {known})")

    def block_size(self, n_grads: int = 1) -> int:
        """Images per block so that activations and ``n_grads`` gradients take about BLOCK_BYTES (float64)."""
        per = (1 + n_grads) * self.K * self.h * self.w * 8
        return int(max(1, min(self.n, BLOCK_BYTES // max(per, 1))))

    def read(self, names: list[str], start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Datasets ``names`` (e.g. "activations", "grads/bird", "masks/background") for images [start, stop)."""
        import h5py
        stop = self.n if stop is None else min(stop, self.n)
        out = {}
        try:
            with h5py.File(self.path, "r", locking=False) as f:
                for k in names:
                    out[k] = f[k][start:stop]
        except Exception as e:
            raise TraceError(f"corrupt or truncated capture {self.name}: {_short(e)}") from None
        return out

    def blocks(self, names: list[str], block: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(start, {name: array})`` for consecutive blocks of images, the file kept open."""
        import h5py
        block = block or self.block_size(sum(1 for k in names if k.startswith("grads/")))
        try:
            f = h5py.File(self.path, "r", locking=False)
        except Exception as e:
            raise TraceError(f"corrupt or unreadable capture {self.name}: {_short(e)}") from None
        with f:
            for s in range(0, self.n, block):
                try:
                    d = {k: f[k][s:s + block] for k in names}
                except Exception as e:
                    raise TraceError(f"corrupt or truncated capture {self.name}: {_short(e)}") from None
                yield s, d

    def correct(self, target: str) -> np.ndarray:
        """(N,) bool: is the model's prediction right for ``target``? Single-label targets: argmax of the
        logits equals the label; multi-label: (z_t > 0) equals labels[:, t]. False where undefined."""
        t = self.target(target)
        d = self.read(["logits", "labels"])
        z, y = d["logits"], d["labels"]
        if t["kind"] == "multilabel":
            if y.ndim != 2 or t["index"] >= y.shape[1]:
                raise TraceError(f"{self.name}: multi-label target {target!r} needs (N, L) labels")
            return (z[:, t["index"]] > 0) == (y[:, t["index"]] > 0.5)
        if y.ndim != 1:
            return np.zeros(self.n, bool)
        return z.argmax(1) == y

    def groups(self) -> pd.DataFrame:
        """Group labels, one column per group name (empty frame when none were captured)."""
        if not self.has_groups:
            return pd.DataFrame(index=range(self.n))
        g = self.read(["groups"])["groups"]
        return pd.DataFrame(g, columns=self.group_names)


def open_captures(run_dir: str) -> list[Capture]:
    """Every finished capture of a run, opened and validated, in index order."""
    return [Capture(p, i) for i, p in fmt.list_captures(run_dir)]


def pick(captures: list[Capture], capture: int, run_dir: str) -> Capture:
    """The capture at position ``capture`` (Python indexing: -1 is the latest)."""
    if not captures:
        raise TraceError(f"no attention captures in {run_dir} (record one with recorder.capture_attention "
                         "or Recorder.capture_attention)")
    try:
        return captures[int(capture)]
    except (IndexError, ValueError, TypeError):
        raise TraceError(f"capture {capture!r} out of range: {run_dir} holds {len(captures)} capture(s)") from None


def _py(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]
