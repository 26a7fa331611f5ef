"""Finding modules and tensors in a model, shared by the recorder and the capture passes."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["resolve_layer", "first_tensor"]


def resolve_layer(model: torch.nn.Module, target_layer: Any) -> tuple[str, torch.nn.Module]:
    """A module of ``model`` given by its dotted name or as the module itself.

    Returns:
        (dotted name, module).

    Raises:
        ValueError: an unknown name (the last few module names are listed) or a foreign module.
        TypeError: ``target_layer`` is neither a string nor a module.
    """
    if isinstance(target_layer, torch.nn.Module):
        for name, m in model.named_modules():
            if m is target_layer:
                return name, m
        raise ValueError("target_layer is a module that is not part of the model")
    if not isinstance(target_layer, str):
        raise TypeError("target_layer must be a dotted module name or a module")
    mods = dict(model.named_modules())
    if target_layer not in mods:
        known = [n for n in mods if n][-6:]
        raise ValueError(f"unknown target_layer {target_layer!r} (last modules: {', '.join(known)})")
    return target_layer, mods[target_layer]


def first_tensor(x: Any) -> torch.Tensor:
    """The tensor in a module's output: the tensor itself, the first item of a tuple or list, or the
    ``"logits"`` entry of a dict. TypeError if there is none."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    if isinstance(x, dict) and isinstance(x.get("logits"), torch.Tensor):
        return x["logits"]
    raise TypeError(f"cannot find a tensor in a {type(x).__name__}")
