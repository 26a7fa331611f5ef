"""Finding modules and tensors in a model, shared by the recorder and the capture passes."""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["resolve_layer", "first_tensor", "ForwardWatch", "prefix_graph", "redirected"]


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


def redirected(module: torch.nn.Module) -> bool:
    """Whether this call of ``module`` runs another method through its ``forward``: PyTorch Lightning's
    DDP strategy runs ``training_step`` by patching the LightningModule's ``forward`` for one call of
    the DDP wrapper (``_ForwardRedirection``). Such a call is not the model's forward pass."""
    fwd = vars(module).get("forward")
    return fwd is not None and "_ForwardRedirection" in getattr(fwd, "__qualname__", "")


class ForwardWatch:
    """Which modules of ``root`` start the forward passes before the first step.

    A forward pass usually enters at the root; a LightningModule whose ``training_step`` calls
    ``self.model(...)`` enters at ``model`` and the root's own forward never runs. One forward pre-hook
    and one forward hook per module (removed by :meth:`remove`, which the recorder calls at its first
    ``step()``) keep the depth of the running modules; a module that starts at depth 0 is an *entry*.

    Args:
        root: the recorded model.
        on_entry: ``callback(name, module, args, kwargs)`` at the first entry that is not the root,
            before that module's forward runs (the recorder records the function graph there).
    """

    def __init__(self, root: torch.nn.Module,
                 on_entry: Callable[[str, torch.nn.Module, tuple, dict], None] | None = None):
        self.root = root
        self.on_entry = on_entry
        self.names = {m: n for n, m in root.named_modules()}
        #: dotted names of the entries other than the root, in the order first seen
        self.entries: list[str] = []
        #: whether the root's own forward ran
        self.root_ran = False
        self._depth = 0
        self._handles = []
        # torch.compile: the hooks run outside the compiled graph, as the activation hooks do
        pre, post = torch.compiler.disable(self._pre, recursive=True), torch.compiler.disable(self._post, recursive=True)
        for m in self.names:
            self._handles.append(m.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
            self._handles.append(m.register_forward_hook(post, always_call=True))
        # ``model.compile(fullgraph=True)`` later: no graph breaks allowed, so the hooks go first
        self._prev_compile = root.__dict__.get("compile")   # the activation tracker's own guard, if any
        plain = root.compile

        def compile(*args, **kwargs):
            if kwargs.get("fullgraph"):
                self.remove()
            return plain(*args, **kwargs)

        self._compile = compile
        root.__dict__["compile"] = compile

    def _pre(self, module, args, kwargs):
        name = self.names.get(module)
        if name is None or (module is self.root and redirected(module)):   # a copy (deepcopy carries hooks)
            return None
        self._depth += 1
        if self._depth > 1:
            return None
        if module is self.root:
            self.root_ran = True
        elif name not in self.entries:
            self.entries.append(name)
            if self.on_entry is not None and len(self.entries) == 1:
                self.on_entry(name, module, args, kwargs)
        return None

    def _post(self, module, args, out):
        if module in self.names and self._depth > 0:
            self._depth -= 1

    def missed(self) -> list[str]:
        """The entries other than the root when the root's own forward never ran (else [])."""
        return [] if self.root_ran else list(self.entries)

    def warning(self) -> str | None:
        """The warning when the root's own forward never ran but its submodules did (else None)."""
        ran = self.missed()
        if not ran:
            return None
        shown = ", ".join(repr(n) for n in ran[:5]) + (", ..." if len(ran) > 5 else "")
        first = ran[0]
        return (f"bbdecoder: the forward of the recorded model ({type(self.root).__name__}) did not run before the "
                f"first step; its submodule(s) {shown} ran instead (e.g. a training_step that calls "
                f"self.{first}(...)). Activations and the graph are recorded from them, under the model's names "
                f"({first}.*); to record that module alone pass it to the Recorder (Recorder(model.{first}, ...)), "
                "or use bbdecoder.recorder.integrations, which accept this")

    def finish(self) -> str | None:
        """At the first step: remove the hooks; :meth:`warning`'s text, if any."""
        self.remove()
        return self.warning()

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.root.__dict__.get("compile") is self._compile:   # else someone replaced it since
            if self._prev_compile is not None:
                self.root.__dict__["compile"] = self._prev_compile
            else:
                del self.root.__dict__["compile"]


def prefix_graph(graph: dict, name: str) -> dict:
    """A function graph recorded on the submodule ``name`` (see :func:`recorder.graph.record_graph`)
    renamed to the root's names: module paths and parameter names gain the prefix ``name.``."""
    if not name:
        return graph
    pre = name + "."

    def full(n: str) -> str:
        return pre + n if n else name

    for node in graph["nodes"]:
        if node.get("op") != "input":
            node["module"] = full(node["module"])
        node["params"] = [pre + p for p in node["params"]]
    depth = name.count(".") + 1
    for rec in graph["modules"]:
        rec["name"] = full(rec["name"])
        rec["depth"] = rec["depth"] + depth
    return graph
