"""Feature evolution: one layer's output for a fixed probe input, captured at chosen steps.

Each capture is one small HDF5 file ``RUN/features/features-NNNNNN.h5`` (written as ``.part``, then
renamed; see analyzer/format.py and docs/trace-format.md). A capture runs an extra forward pass of
the probe in eval mode without gradients (BatchNorm running statistics and the training flags are
left as they were); it copies the layer output to the host, so call it between steps, not in the
training step (a Recorder does it on its ``probe_every`` schedule, after the step is handed off).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from bbdecoder.analyzer.trace import files
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.hdf5 import abort_h5
from .attention import _ensure_run, _first_tensor, _resolve_layer
from .writer import raise_as_os_error

__all__ = ["capture_features"]


def _next_index(run_dir: str) -> str:
    d = os.path.join(run_dir, fmt.FEATURES_DIR)
    os.makedirs(d, exist_ok=True)
    i = max([k for k, _ in fmt.list_features(run_dir)], default=-1) + 1
    while True:
        part = os.path.join(d, fmt.feature_filename(i, live=True))
        if not os.path.exists(os.path.join(d, fmt.feature_filename(i))):
            try:
                os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return part
            except FileExistsError:
                pass
        i += 1


@torch.no_grad()
def layer_output(model: torch.nn.Module, x: Any, layer: Any, eval_mode: bool = True) -> tuple[str, torch.Tensor]:
    """The output of ``layer`` (dotted name or module) when ``model`` runs on ``x`` (a tensor or a tuple
    of arguments), without gradients; in eval mode unless ``eval_mode=False`` (flags restored after).

    Returns:
        (dotted layer name, detached output tensor of the first call of the layer, on its device).
    """
    name, mod = _resolve_layer(model, layer)
    box: dict = {}

    def hook(m, a, out):
        if "out" not in box:
            box["out"] = _first_tensor(out).detach().clone()

    modes = {m: m.training for m in model.modules()}
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    h = mod.register_forward_hook(hook)
    try:
        if eval_mode:
            model.eval()
        args = x if isinstance(x, tuple) else (x,)
        model(*args)
    finally:
        h.remove()
        for m, tr in modes.items():
            m.training = tr
        bufs = dict(model.named_buffers())
        for n, v in saved.items():
            bufs[n].copy_(v)
    if "out" not in box:
        raise RuntimeError(f"layer {name!r} was not called in the forward pass of the probe")
    return name, box["out"]


def capture_features(model: torch.nn.Module, x: Any, layer: Any, run_dir: str | os.PathLike, *, step: int = -1,
                     epoch: int = -1, rank: int = 0, eval_mode: bool = True) -> str:
    """Store ``layer``'s output for the probe input ``x`` into ``RUN/features/``.

    Args:
        model: the model (inputs are used as given: put ``x`` on the model's device).
        x: probe input, a tensor (N, ...) or a tuple of positional arguments.
        layer: dotted module name or the module itself.
        run_dir: a run directory, or a new/empty one (it becomes a minimal run).
        step / epoch / rank: recorded as attributes (a Recorder passes its current ones).
        eval_mode: run the probe with the model in eval() (flags restored afterwards).

    Returns:
        Path of the finished file ``RUN/features/features-NNNNNN.h5`` holding ``values`` (N, C, ...) float32.
    """
    import h5py
    name, out = layer_output(model, x, layer, eval_mode)
    if out.ndim < 2:
        raise ValueError(f"layer {name!r} output has shape {tuple(out.shape)}; expected (N, C, ...)")
    arr = out.float().cpu().numpy()
    run_dir = os.path.abspath(os.fspath(run_dir))
    _ensure_run(model, run_dir)
    part = _next_index(run_dir)
    final = part[: -len(fmt.LIVE_SUFFIX)]
    ok = False
    try:
        f = h5py.File(part, "w")
        try:
            f.create_dataset("values", data=np.ascontiguousarray(arr, dtype=np.float32))
            f.attrs.update({"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION,
                            "kind": fmt.FEATURE_KIND, "layer": name, "step": int(step), "epoch": int(epoch),
                            "rank": int(rank), "created": time.time()})
            f.flush()   # a write error (ENOSPC, EFBIG) shows here, while the file can still be aborted
            f.close()
        except BaseException as e:   # an error while writing (a full disk): close without a crash at exit
            abort_h5(f)
            raise_as_os_error(e)      # an HDF5 write failure raised as RuntimeError: the OSError it is
        files.fsync_file(part)
        os.replace(part, final)
        files.fsync_dir(os.path.dirname(final))
        ok = True
        return final
    finally:
        if not ok:
            try:
                os.unlink(part)
            except OSError:
                pass
