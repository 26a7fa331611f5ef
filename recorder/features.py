"""Feature evolution: one layer's output for a fixed probe input, captured at chosen steps.

Each capture is one small HDF5 file ``RUN/features/features-NNNNNN.h5`` (written as ``.part``, then
renamed; see analyzer/trace/captures.py and docs/trace-format.md). A capture runs an extra forward pass of
the probe in eval mode without gradients (BatchNorm running statistics and the training flags are
left as they were); it copies the layer output to the host, so call it between steps, not in the
training step (a Recorder does it on its ``probe_every`` schedule, after the step is handed off).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from bbdecoder.analyzer.trace.captures import write_feature_capture
from .modules import first_tensor, resolve_layer
from .rundir import ensure_run
from .writer import raise_as_os_error

__all__ = ["capture_features"]


@torch.no_grad()
def layer_output(model: torch.nn.Module, x: Any, layer: Any, eval_mode: bool = True) -> tuple[str, torch.Tensor]:
    """The output of ``layer`` (dotted name or module) when ``model`` runs on ``x`` (a tensor or a tuple
    of arguments), without gradients; in eval mode unless ``eval_mode=False`` (flags restored after).

    Returns:
        (dotted layer name, detached output tensor of the first call of the layer, on its device).
    """
    name, mod = resolve_layer(model, layer)
    box: dict = {}

    def hook(m, a, out):
        if "out" not in box:
            box["out"] = first_tensor(out).detach().clone()

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
    name, out = layer_output(model, x, layer, eval_mode)
    if out.ndim < 2:
        raise ValueError(f"layer {name!r} output has shape {tuple(out.shape)}; expected (N, C, ...)")
    arr = out.float().cpu().numpy()
    run_dir = os.path.abspath(os.fspath(run_dir))
    ensure_run(model, run_dir)
    try:
        return write_feature_capture(run_dir, arr, layer=name, step=step, epoch=epoch, rank=rank)
    except BaseException as e:   # an HDF5 write failure raised as RuntimeError: the OSError it is
        raise_as_os_error(e)
