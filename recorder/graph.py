"""Function graph of one forward pass: the operations that actually ran, their edges and their cost.

:func:`record_graph` runs the model once on an example input under three instruments:

- a ``TorchFunctionMode`` that sees every call at the functional level (``conv2d``, ``linear``, ``relu``,
  ``add``, ``matmul``, ``softmax``, ...; only the outermost call: ``F.softmax`` is one node, not the
  ``Tensor.softmax`` it calls) and notes its inputs, outputs, parameters and the op that produced each
  input tensor (edges);
- ``torch.utils.flop_counter.FlopCounterMode`` underneath: the FLOPs of each node are the counter's
  increase during that call;
- module forward pre/post hooks for the enclosing module path and, in a second plain forward, the
  forward time per module (``time.perf_counter``, the device synchronised at each module boundary:
  this runs once, never in the training step).

Data-dependent control flow is recorded as it ran. Buffers (BatchNorm running statistics) and the
RNG state are restored afterwards, so recording the graph does not change training.
The result is a JSON-able dict (see docs/trace-format.md, "graph.json").
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from bbdecoder.analyzer.trace import files
from bbdecoder.analyzer.trace import format as fmt

from .activation_kinds import FUNCS, module_kind

__all__ = ["record_graph", "write_graph"]

_SKIP = {"__get__", "__set__", "__setitem__", "__len__", "__bool__", "__format__", "__repr__", "__hash__",
         "__iter__", "__contains__", "__index__", "__int__", "__float__", "__reduce_ex__", "__deepcopy__",
         "size", "dim", "numel", "item", "tolist", "is_floating_point", "is_complex", "data_ptr", "stride",
         "storage_offset", "element_size", "__torch_function__"}
_RENAME = {"__getitem__": "getitem", "__matmul__": "matmul", "__rmatmul__": "matmul", "__truediv__": "div",
           "__rtruediv__": "div", "__floordiv__": "floor_divide", "__radd__": "add", "__rsub__": "rsub",
           "__rmul__": "mul", "__neg__": "neg", "__pow__": "pow", "__rpow__": "pow", "__and__": "bitwise_and",
           "__or__": "bitwise_or", "__invert__": "bitwise_not"}


def _op_name(func) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name == "__get__":  # a tensor property such as .T
        name = getattr(getattr(func, "__self__", None), "__name__", "getattr")
    if name in _RENAME:
        return _RENAME[name]
    if name.startswith("__i") and name.endswith("__") and len(name) > 5:  # __iadd__ -> add_
        return name[3:-2] + "_"
    if name.startswith("__") and name.endswith("__"):
        return name[2:-2]
    return name


def _qualname(func) -> str:
    mod = getattr(func, "__module__", None) or ""
    q = getattr(func, "__qualname__", None) or getattr(func, "__name__", "") or type(func).__name__
    if mod in ("torch._C._nn", "torch.nn.functional"):
        return f"torch.nn.functional.{getattr(func, '__name__', q)}"
    for pre, repl in (("_VariableFunctionsClass.", "torch."), ("TensorBase.", "torch.Tensor."),
                      ("Tensor.", "torch.Tensor."), ("_TensorBase.", "torch.Tensor.")):
        if q.startswith(pre):
            return repl + q[len(pre):]
    if mod.startswith("torch") or not mod:
        return f"{mod + '.' if mod else 'torch.'}{q}" if not q.startswith("Tensor.") else f"torch.{q}"
    return f"{mod}.{q}"


def _tensors(tree) -> list:
    flat, _ = tree_flatten(tree)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


class _Trace(TorchFunctionMode):
    """The tracing mode: one node per outermost functional call with a tensor output."""

    def __init__(self, graph: "_Builder"):
        super().__init__()
        self.g = graph

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        g = self.g
        name = getattr(func, "__name__", "")
        if name in _SKIP and name != "__get__":
            return func(*args, **kwargs)
        before = g.flops()
        out = func(*args, **kwargs)
        outs = _tensors(out)
        if outs:
            g.add_node(func, args, kwargs, outs, g.flops() - before)
        return out


class _Builder:
    def __init__(self, model: torch.nn.Module, counter: FlopCounterMode):
        self.counter = counter
        self.params = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.buffers = {id(b): n for n, b in model.named_buffers(remove_duplicate=False)}
        self.names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
        self.stack: list[torch.nn.Module] = []
        self.nodes: list[dict] = []
        self.edges: list[dict] = []
        self.producer: dict[int, int] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique while the trace runs; cleared afterwards
        self.modules: dict[str, dict] = {}

    def flops(self) -> int:
        return int(sum(self.counter.flop_counts["Global"].values()))

    def add_input(self, t: torch.Tensor, index: int) -> None:
        nid = len(self.nodes)
        self.nodes.append({"id": nid, "op": "input", "func": "input", "module": "", "module_type": "",
                           "kind": None, "inputs": [], "input_dtypes": [], "outputs": [list(t.shape)],
                           "output_dtypes": [_dtype(t)], "params": [], "flops": 0, "arg": index})
        self.producer[id(t)] = nid
        self.alive.append(t)

    def add_node(self, func, args, kwargs, outs: list, flops: int) -> None:
        nid = len(self.nodes)
        mod = self.stack[-1] if self.stack else None
        mname = self.names.get(id(mod), "") if mod is not None else ""
        ins = _tensors((args, kwargs))
        params, inputs, dtypes = [], [], []
        for pos, t in enumerate(ins):
            inputs.append(list(t.shape))
            dtypes.append(_dtype(t))
            if id(t) in self.params:
                params.append(self.params[id(t)])
            elif id(t) in self.producer:
                self.edges.append({"src": self.producer[id(t)], "dst": nid, "arg": pos, "shape": list(t.shape)})
            elif id(t) in self.buffers:
                params.append(self.buffers[id(t)])
        kind = FUNCS.get(func)
        self.nodes.append({"id": nid, "op": _op_name(func), "func": _qualname(func), "module": mname,
                           "module_type": type(mod).__name__ if mod is not None else "", "kind": kind,
                           "inputs": inputs, "input_dtypes": dtypes, "outputs": [list(t.shape) for t in outs],
                           "output_dtypes": [_dtype(t) for t in outs], "params": params, "flops": int(flops)})
        for t in outs:
            self.producer[id(t)] = nid
            self.alive.append(t)

    def pre(self, mod, args):
        self.stack.append(mod)
        name = self.names.get(id(mod), "")
        rec = self.modules.get(name)
        if rec is None:
            rec = self.modules[name] = {"name": name, "type": type(mod).__name__, "calls": 0, "order": len(self.modules),
                                        "depth": 0 if not name else name.count(".") + 1, "kind": module_kind(mod),
                                        "n_params": int(sum(p.numel() for p in mod.parameters(recurse=False)))}
        rec["calls"] += 1

    def post(self, mod, args, out):
        if self.stack and self.stack[-1] is mod:
            self.stack.pop()


def _as_args(example_input: Any) -> tuple:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def record_graph(model: torch.nn.Module, example_input: Any, kwargs: dict | None = None,
                 time_repeats: int = 3) -> dict:
    """Record the operations one forward pass of ``model`` performs on ``example_input``.

    Args:
        model: the module (its training/eval mode is used as it is).
        example_input: a tensor or a tuple of positional arguments of ``model``.
        kwargs: keyword arguments of ``model`` (optional).
        time_repeats: plain forwards timed per module (the median is kept); 0 skips timing.

    Returns:
        JSON-able dict: ``nodes`` (one per op that ran, in call order: id, op, func, module path,
        module_type, activation kind or None, input/output shapes and dtypes, params used (dotted
        names), flops), ``edges`` ({src, dst, arg, shape}: node src produced input number ``arg`` of
        dst), ``modules`` (per module that ran: name, type, calls, depth, n_params, flops = FLOPs of
        the ops inside it (inclusive), time_s = median inclusive forward time in seconds, or None),
        ``outputs`` (node ids producing the model's outputs), ``total_flops``, ``device``.
        FLOPs count a multiply-add as 2 (torch.utils.flop_counter's convention).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError("model must be a torch.nn.Module")
    kwargs = dict(kwargs or {})
    args = _as_args(example_input)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    bufs = dict(model.named_buffers())
    devices = [device.index or 0] if device.type == "cuda" else []
    counter = FlopCounterMode(display=False)
    g = _Builder(model, counter)
    handles = []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for m in model.modules():
                handles.append(m.register_forward_pre_hook(g.pre))
                handles.append(m.register_forward_hook(g.post))
            for i, t in enumerate(_tensors((args, kwargs))):
                g.add_input(t, i)
            with counter, _Trace(g):
                out = model(*args, **kwargs)
            outputs = sorted({g.producer[id(t)] for t in _tensors(out) if id(t) in g.producer})
            for h in handles:
                h.remove()
            handles = []
            times = _time_modules(model, args, kwargs, device, g.names, time_repeats, saved, bufs)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, v in saved.items():
                bufs[n].copy_(v)
        g.alive.clear()
        g.producer.clear()
    for rec in g.modules.values():
        pre = rec["name"] + "." if rec["name"] else ""
        rec["flops"] = int(sum(n["flops"] for n in g.nodes if n["op"] != "input"
                               and (n["module"] == rec["name"] or n["module"].startswith(pre))))
        rec["time_s"] = times.get(rec["name"])
    return {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "kind": fmt.GRAPH_KIND,
            "model": f"{type(model).__module__}.{type(model).__qualname__}", "device": str(device),
            "training": bool(model.training), "nodes": g.nodes, "edges": g.edges,
            "modules": sorted(g.modules.values(), key=lambda r: r["order"]), "outputs": outputs,
            "total_flops": int(counter.get_total_flops()), "created": time.time()}


def _time_modules(model, args, kwargs, device, names, repeats, saved, bufs) -> dict[str, float]:
    """Median inclusive forward time per module over ``repeats`` plain forwards (seconds)."""
    if repeats <= 0:
        return {}
    samples: dict[str, list[float]] = {}
    starts: dict[int, list[float]] = {}

    def pre(mod, a):
        _sync(device)
        starts.setdefault(id(mod), []).append(time.perf_counter())

    def post(mod, a, o):
        _sync(device)
        t1 = time.perf_counter()
        t0 = starts[id(mod)].pop()
        name = names.get(id(mod), "")
        acc = samples.setdefault(name, [0.0] * repeats)
        acc[rep[0]] += t1 - t0

    rep = [0]
    hs = [h for m in model.modules() for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    try:
        for r in range(repeats):
            rep[0] = r
            model(*args, **kwargs)
            for n, v in saved.items():
                bufs[n].copy_(v)
    finally:
        for h in hs:
            h.remove()
    out = {}
    for name, v in samples.items():
        v = sorted(v)
        out[name] = float(v[len(v) // 2])
    return out


def write_graph(run_dir: str | os.PathLike, graph: dict) -> str:
    """Write ``graph`` (from :func:`record_graph`) atomically to ``RUN/graph.json``; returns the path."""
    fmt.validate_graph(graph, "graph")
    path = os.path.join(os.fspath(run_dir), fmt.GRAPH_FILE)
    files.write_json_atomic(path, graph)
    return path
