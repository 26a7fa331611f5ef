"""Attention captures: an evaluation pass that stores target-layer activations and the gradients of
chosen target scalars, so that Grad-CAM-family maps and Attention-IoU scores can be computed offline.

    from bbdecoder.recorder import capture_attention
    capture_attention(model, loader, "runs/probe", target_layer="layer4.1", targets={"bird": 1})

One HDF5 file per pass, ``RUN/captures/capture-NNNNNN.h5`` (layout in docs/trace-format.md §12 and
:mod:`analyzer.trace.captures`, which writes it). The pass is not on the training hot path: tensors are copied
to the host once per batch.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import numpy as np
import torch

from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.captures import CaptureWriter
from .errors import RecorderWarning
from .modules import first_tensor, resolve_layer
from .rundir import ensure_run
from .writer import raise_as_os_error

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


def _parse_targets(targets: Any, multilabel: bool) -> list[dict]:
    if not isinstance(targets, dict) or not targets:
        raise ValueError("targets must be a non-empty dict {name: class index | None | callable}")
    out = []
    keys = fmt.assign_keys(list(map(str, targets)))
    for (name, v), key in zip(targets.items(), keys):
        if callable(v):
            out.append({"name": str(name), "key": key, "kind": "callable", "index": None, "fn": v})
        elif v is None:
            if multilabel:
                raise ValueError(f"target {name!r}: multilabel targets need a logit index")
            out.append({"name": str(name), "key": key, "kind": "predicted", "index": None, "fn": None})
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0:
            out.append({"name": str(name), "key": key, "kind": "multilabel" if multilabel else "class",
                        "index": int(v), "fn": None})
        else:
            raise ValueError(f"target {name!r}: expected a class index >= 0, None (predicted class) or a "
                             f"callable(logits) -> (B,), not {v!r:.40}")
    return out


def _target_scalar(t: dict, logits: torch.Tensor) -> torch.Tensor:
    """(B,) target values y_t whose gradient is taken."""
    if t["kind"] == "callable":
        y = t["fn"](logits)
        if not isinstance(y, torch.Tensor) or y.shape != logits.shape[:1]:
            raise ValueError(f"target {t['name']!r}: the callable must return a (B,) tensor")
        return y
    if t["kind"] == "predicted":
        return logits.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)
    if t["index"] >= logits.shape[1]:
        raise ValueError(f"target {t['name']!r}: class {t['index']} but the model has {logits.shape[1]} logits")
    z = logits[:, t["index"]]
    return z.abs() if t["kind"] == "multilabel" else z


def _split_batch(batch: Any) -> tuple[torch.Tensor, Any, Any, Any]:
    if isinstance(batch, dict):
        if "images" not in batch or "labels" not in batch:
            raise ValueError("a dict batch needs the keys 'images' and 'labels'")
        return batch["images"], batch["labels"], batch.get("masks"), batch.get("groups")
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1], None, None
    raise ValueError("the loader must yield (images, labels) tuples or dicts with images, labels[, masks, groups]")


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _masks(m: Any, names: list[str] | None, B: int) -> dict[str, np.ndarray]:
    """Loader masks -> {name: (B, H, W) array}: a dict of (B,H,W), a (B,G,H,W) stack, or a (B,H,W)
    integer label map (label i is group names[i])."""
    if isinstance(m, dict):
        out = {str(k): _np(v) for k, v in m.items()}
    else:
        a = _np(m)
        if a.ndim == 4:
            nm = names or [f"mask{i}" for i in range(a.shape[1])]
            if len(nm) != a.shape[1]:
                raise ValueError(f"{a.shape[1]} masks per image but {len(nm)} mask_names")
            out = {nm[i]: a[:, i] for i in range(a.shape[1])}
        elif a.ndim == 3 and np.issubdtype(a.dtype, np.integer):
            if not names:
                raise ValueError("a (B, H, W) label-map mask needs mask_names (label i -> mask_names[i])")
            out = {nm: (a == i) for i, nm in enumerate(names)}
        else:
            raise ValueError(f"masks must be a dict of (B,H,W), a (B,G,H,W) stack or a (B,H,W) label map, "
                             f"not shape {a.shape}")
    for k, v in out.items():
        if v.ndim != 3 or v.shape[0] != B:
            raise ValueError(f"mask {k!r} must be (B, H, W) with B={B}, not {v.shape}")
    return out


def _groups(g: Any, names: list[str] | None, B: int) -> tuple[np.ndarray, list[str]]:
    if isinstance(g, dict):
        nm = [str(k) for k in g]
        a = np.stack([_np(v).reshape(B) for v in g.values()], 1)
    else:
        a = _np(g)
        a = a.reshape(B, 1) if a.ndim == 1 else a
        nm = names or [f"group{i}" for i in range(a.shape[1])]
    if a.ndim != 2 or a.shape[0] != B or len(nm) != a.shape[1]:
        raise ValueError(f"groups must be (B,) or (B, G) with G group_names, not {a.shape}")
    return a.astype(np.int64), nm


def _warn_zero_grads(seen: dict, lname: str, reshaped: bool) -> None:
    """Warn (RecorderWarning) for each target whose stored gradients are 0 everywhere: its Grad-CAM maps
    will be 0 and score nothing. Says whether ``reshape`` dropped the positions that had a gradient."""
    for name, (raw, kept) in seen.items():
        if kept:
            continue
        why = ("is non-zero only at positions that reshape drops (in a ViT's last block only the CLS token "
               "feeds the classifier)" if raw and reshaped else "is 0 everywhere (the target does not depend "
               "on this layer's output)")
        warnings.warn(f"bbdecoder: capture_attention: the gradient of target {name!r} with respect to "
                      f"{lname!r}'s output {why}: its Grad-CAM maps will be 0 everywhere. Capture an earlier "
                      "layer (for a ViT, the last block's layernorm_before or an earlier block)",
                      RecorderWarning, stacklevel=3)


def capture_attention(model: torch.nn.Module, loader, run_dir: str | os.PathLike, target_layer: Any,
                      targets: dict, *, multilabel: bool = False, reshape: Callable | None = None,
                      batch_limit: int | None = None, dtype: str = "float32", mask_names: list[str] | None = None,
                      group_names: list[str] | None = None, eval_mode: bool = True, step: int = -1,
                      epoch: int = -1, rank: int = 0) -> str:
    """Run ``model`` over ``loader`` and store what attention maps need into ``RUN/captures/``.

    Args:
        model: a ``torch.nn.Module`` on any device (inputs are moved to the device of its first parameter).
        loader: iterable of ``(images, labels)`` or dicts with ``images``, ``labels`` and optionally
            ``masks`` (dict of (B,H,W), a (B,G,H,W) stack, or an integer (B,H,W) label map) and
            ``groups`` ((B,), (B,G) or a dict of (B,)).
        run_dir: a run directory (written by a Recorder) or a new/empty directory, which becomes a
            minimal run. A non-empty directory that is not a run is refused.
        target_layer: dotted module name or the module; its output A is captured.
        targets: ``{name: class index}`` (y = z_c), ``{name: None}`` (the predicted class's logit) or
            ``{name: callable(logits) -> (B,)}``. With ``multilabel=True`` an index means y = |z_c|.
        reshape: for transformer layers, ``(B, T, C) -> (B, C, h, w)``, applied to A and dy/dA.
        batch_limit: stop after this many batches.
        dtype: storage dtype of activations and gradients, "float32" or "float16".
        mask_names / group_names: names of stacked masks / group columns (or label-map labels).
        eval_mode: put the model in eval() for the pass (BatchNorm/Dropout frozen); the training
            flags of every module are restored afterwards.
        step / epoch / rank: recorded as attributes (a Recorder passes its current ones).

    Returns:
        Path of the finished capture file ``RUN/captures/capture-NNNNNN.h5``. A target whose stored
        gradients are 0 everywhere (its gradient-based maps would be 0) is reported with a RecorderWarning.
    """
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_NP_DTYPES)}")
    tlist = _parse_targets(targets, multilabel)
    lname, layer = resolve_layer(model, target_layer)
    run_dir = os.path.abspath(os.fspath(run_dir))
    ensure_run(model, run_dir)
    writer = CaptureWriter(run_dir)   # reserves RUN/captures/capture-NNNNNN.h5.part
    npdt = _NP_DTYPES[dtype]
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    box: dict = {}
    seen = {t["name"]: [False, False] for t in tlist}   # target -> [any gradient != 0, any after reshape]

    def hook(mod, inp, out):
        a = first_tensor(out)
        if not a.requires_grad:  # frozen model: make the output a leaf that requires grad
            a = a.detach().requires_grad_(True)
            box["a"] = a
            return a if isinstance(out, torch.Tensor) else (a, *out[1:])
        box["a"] = a
        return None

    handle = layer.register_forward_hook(hook)
    try:
        if eval_mode:
            model.eval()
        writer.open()
        mnames: dict[str, str] = {}
        gnames: list[str] | None = None
        image_size = None
        with torch.enable_grad():
            for b, batch in enumerate(loader):
                if batch_limit is not None and b >= batch_limit:
                    break
                x, labels, masks, groups = _split_batch(batch)
                x = x.to(device)
                B = x.shape[0]
                n = writer.n
                box.clear()
                logits = first_tensor(model(x))
                if "a" not in box:
                    raise RuntimeError(f"target layer {lname!r} was not called in the forward pass")
                a = box.pop("a")
                if logits.ndim != 2 or logits.shape[0] != B:
                    raise ValueError(f"the model must return (B, C) logits, not {tuple(logits.shape)}")
                grads = []
                for i, t in enumerate(tlist):
                    y = _target_scalar(t, logits)
                    (g,) = torch.autograd.grad(y.sum(), a, retain_graph=i < len(tlist) - 1)
                    grads.append(g)
                with torch.no_grad():
                    A = reshape(a.detach()) if reshape is not None else a.detach()
                    raw = [bool((g != 0).any()) for g in grads]   # off the hot path: one sync per batch
                    grads = [reshape(g) if reshape is not None else g for g in grads]
                    for t, r, g in zip(tlist, raw, grads):
                        seen[t["name"]] = [seen[t["name"]][0] or r, seen[t["name"]][1] or bool((g != 0).any())]
                if A.ndim != 4:
                    raise ValueError(f"target layer output must be (B, K, h, w) (pass reshape= for transformers), "
                                     f"not {tuple(A.shape)}")
                rows = {"activations": _np(A).astype(npdt), "logits": _np(logits).astype(np.float32),
                        "labels": _np(labels), "index": np.arange(n, n + B, dtype=np.int64)}
                for t, g in zip(tlist, grads):
                    rows[f"grads/{t['key']}"] = _np(g).astype(npdt)
                if rows["labels"].shape[:1] != (B,):
                    raise ValueError(f"labels must have B={B} rows")
                if masks is not None:
                    md = _masks(masks, mask_names, B)
                    if not mnames:
                        mnames = dict(zip(fmt.assign_keys(list(md)), md))
                    if list(mnames.values()) != list(md):
                        raise ValueError("every batch must carry the same masks")
                    for k, nm in mnames.items():
                        v = md[nm]
                        rows[f"masks/{k}"] = v.astype(np.uint8) if v.dtype == bool or np.issubdtype(
                            v.dtype, np.integer) else v.astype(np.float32)
                if groups is not None:
                    ga, gn = _groups(groups, group_names, B)
                    if gnames is not None and gn != gnames:
                        raise ValueError("every batch must carry the same groups")
                    gnames = gn
                    rows["groups"] = ga
                if image_size is None:
                    image_size = [int(x.shape[-2]), int(x.shape[-1])]
                writer.append(rows, B, b)
        if not writer.n:
            raise ValueError("the loader yielded no images")
        _warn_zero_grads(seen, lname, reshape is not None)
        return writer.finish(step=step, epoch=epoch, rank=rank, target_layer=lname, image_size=image_size,
                          dtype=dtype, targets=[{k: t[k] for k in ("name", "key", "kind", "index")} for t in tlist],
                          mask_names=mnames, group_names=gnames or [])
    except Exception as e:   # an HDF5 write failure raised as RuntimeError: the OSError it is
        raise_as_os_error(e)
    finally:
        handle.remove()
        for m, tr in modes.items():
            m.training = tr
        writer.abort()   # an error while writing (a full disk): closed without a crash at exit, deleted
