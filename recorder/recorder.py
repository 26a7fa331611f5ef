"""The Recorder: attaches to a model in an ordinary training loop and writes a trace.

Hot path (:meth:`Recorder.step`): per selected parameter one ``reshape`` view, one ``torch.cat``
per device and storage dtype, and on CUDA one ``non_blocking`` copy into pinned memory plus an
event; no ``.item()``, no ``.cpu()``, no loop over elements. Everything else (waiting for the
copy, numpy conversion, HDF5) happens in the background writer thread.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from bbdecoder.analyzer.trace import files
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.hdf5 import HDF5Backend
from bbdecoder.analyzer.trace.series import ShardSeriesWriter, StepRecord
from .gradstats import GradStatsPlan, Scratch, group_items
from .schedules import as_schedule
from .writer import BackgroundWriter, WriterClosedError, WriterError, describe_error

__all__ = ["Recorder", "RecorderError", "RecorderWarning", "RecorderClosedError", "LayerInfo", "unwrap_model"]

VERSION = "2.0.0.dev0"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


class RecorderError(RuntimeError):
    """The recorder failed (raised only with ``on_error="raise"``)."""


class RecorderClosedError(RecorderError):
    """step() or another recording call after close()."""


class RecorderWarning(UserWarning):
    """The recorder failed and stood aside; training goes on unrecorded."""


@dataclass(frozen=True)
class LayerInfo:
    """One row of the layer table: a module that owns parameters directly."""

    id: int
    name: str
    type: str
    n_params: int
    selected: bool


class _Pending:
    """One step on its way to the writer: host tensors (maybe still being copied) and an event."""

    __slots__ = ("step", "epoch", "time", "loss", "groups", "stats", "events", "nbytes", "dropped")

    def __init__(self, step, epoch, t, loss):
        self.step, self.epoch, self.time, self.loss = step, epoch, t, loss
        self.dropped = 0
        self.groups: list = []    # (host flat tensor, layout [(kind, lk, pk, off, n, shape, attrs)])
        self.stats: list = []     # (host partials (rows, 5), GradStatsPlan): gradient statistics
        self.events: list = []
        self.nbytes = 0


def _resolve(p: _Pending) -> StepRecord:
    """Writer thread: wait for the device copies, turn host tensors into numpy views."""
    for ev in p.events:
        ev.synchronize()
    loss = p.loss
    if isinstance(loss, torch.Tensor):
        loss = float(loss.reshape(-1)[0]) if loss.numel() else float("nan")
    payloads = []
    for flat, layout in p.groups:
        arr = flat.numpy()
        for kind, lk, pk, off, n, shape, attrs in layout:
            payloads.append((kind, lk, pk, arr[off:off + n].reshape(shape), attrs))
    for host, plan in p.stats:   # one packed payload: the writer's cost does not grow with the parameters
        payloads.append((fmt.KIND_GRAD_STATS, None, plan.keys, plan.finish(host.numpy()), plan.attrs))
    return StepRecord(step=p.step, epoch=p.epoch, loss=loss, time=p.time, dropped=p.dropped,
                      payloads=payloads)


def _drop_payload(p: _Pending) -> _Pending:
    """The step without its tensors (queue full, ``on_full="drop"``): the gradient statistics, a few
    bytes per parameter, are kept, so that the per-step series has no holes."""
    q = _Pending(p.step, p.epoch, p.time, p.loss)
    q.events = p.events
    q.stats = p.stats
    q.dropped = 1
    return q


class Recorder:
    """Record gradients and weights of a model during training into a run directory.

    Args:
        model: the ``torch.nn.Module`` being trained.
        run_dir: directory of the run; created. An existing non-empty one is refused unless
            ``overwrite=True`` (and then only if it is a bbdecoder run).
        layers: which layers to record: None (all), ids, dotted names, glob patterns, type names,
            module classes or modules, or a list of those.
        grads_every: schedule of raw gradient tensors: every n steps (0 = off) or a callable
            ``step -> bool``. Default every 50 steps; the per-step gradient statistics come from
            ``grad_stats_every``.
        grad_stats_every: schedule of the gradient statistics computed on the device (per parameter:
            finite count, non-finite count, sum, sum of squares, sum |g|, max |g|: mean, variance,
            L1, L2 and max |g| per step, a few floats per parameter). Default every step.
        weights_every: weight-snapshot schedule, likewise (weights as used in that step's forward).
        overwrite: replace an existing run at ``run_dir``.
        on_error: "warn" (default: one warning, the recorder stands aside, training goes on) or
            "raise" (the next call raises :class:`RecorderError`).
        on_full: what ``step()`` does when the writer's queue is full: "block" (default: wait) or
            "drop" (drop that step's raw tensors and activation statistics, keep its gradient
            statistics, and count the drop in the trace).
        queue_items / queue_bytes: bounds of the writer queue (payload-carrying steps / bytes).
        flush_steps / flush_secs: a shard is closed and published at least every ``flush_steps``
            steps and every ``flush_secs`` seconds; a crash loses at most that window plus the queue.
        max_shard_bytes: a shard is also closed when it holds this many payload bytes.
        grad_dtype / weight_dtype: storage dtype of raw tensors ("float32", "float16", "float64").
        record_rank: the rank that records gradients and weights under torch.distributed
            (they are identical on every rank after DDP's all-reduce); None = every rank.
        activation_ranks: the ranks that record activations under torch.distributed: None (default:
            every rank, each from its own data), a rank or a list of ranks. Every rank writes its step
            table and ``rank.json``; ranks other than 0 put their activation sites in ``rank.json``.
        activations: activation sites to record (None: none). True or ``"activations"``: every
            activation module (nn.ReLU, nn.Sigmoid, nn.Tanh, ...) and every functional activation
            call; ``"all"``: every leaf module's output too; or ids, names, globs, types, modules
            and call-site patterns (see :class:`recorder.activations.ActivationTracker`).
            Per-unit statistics are kept every step.
        activations_every: schedule of raw activation samples (default every 50 steps).
        activation_samples: raw samples per site when that schedule fires (the first K inputs).
        activation_unit_axis: ``{site name or glob: axis}`` overrides of the unit axis.
        graph: record the function graph (``RUN/graph.json``, see :mod:`recorder.graph`) once, on the
            first forward pass (an extra forward without gradients; buffers and RNG restored).
        probe: ``(example_input, layer)``: capture ``layer``'s output for this fixed input into
            ``RUN/features/`` (see :mod:`recorder.features`) on the ``probe_every`` schedule.
        probe_every: "epoch" (default: at every ``epoch_end()``), or a step schedule (int every n /
            callable ``step -> bool``), checked in ``step()`` after the step is handed to the writer.
    """

    def __init__(self, model: torch.nn.Module, run_dir: str | os.PathLike, layers: Any = None,
                 grads_every: Any = 50, weights_every: Any = 50, *, grad_stats_every: Any = 1,
                 overwrite: bool = False,
                 on_error: str = "warn", on_full: str = "block", queue_items: int = 64,
                 queue_bytes: int = 512 << 20, flush_steps: int = 100, flush_secs: float = 10.0,
                 max_shard_bytes: int = 1 << 30, grad_dtype: str = "float32",
                 weight_dtype: str = "float32", record_rank: int | None = 0,
                 activations: Any = None, activations_every: Any = 50, activation_samples: int = 8,
                 activation_unit_axis: dict | None = None, graph: bool = False, probe: Any = None,
                 probe_every: Any = "epoch", activation_ranks: Any = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError("model must be a torch.nn.Module")
        model = unwrap_model(model)   # DDP / DataParallel: record the wrapped module, same names
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error must be 'warn' or 'raise', not {on_error!r}")
        if grad_dtype not in _DTYPES or weight_dtype not in _DTYPES:
            raise ValueError(f"dtypes must be one of {sorted(_DTYPES)}")
        if not (isinstance(flush_steps, int) and flush_steps >= 1 and flush_secs > 0):
            raise ValueError("flush_steps must be an int >= 1 and flush_secs > 0")
        self.model = model
        self.run_dir = os.path.abspath(os.fspath(run_dir))
        self.on_error = on_error
        self._grad_sched = as_schedule(grads_every)
        self._gstat_sched = as_schedule(grad_stats_every)
        self._gstat_plans: dict = {}
        self._gstat_scratch = Scratch()   # work buffers shared by the plans (allocated at the first step)
        self._weight_sched = as_schedule(weights_every)
        self._grad_dtype, self._weight_dtype = _DTYPES[grad_dtype], _DTYPES[weight_dtype]
        self.rank, self.world_size = _dist_info()
        records_tensors = record_rank is None or record_rank == self.rank
        self._activation_ranks = _check_ranks(activation_ranks, self.world_size)
        if self._activation_ranks is not None and self.rank not in self._activation_ranks:
            activations = None   # this rank records no activations (its steps and rank.json still)

        # ---- layer table: every module owning parameters directly, ids in named_modules order
        self._modules: list[torch.nn.Module] = []
        table = []
        for name, m in model.named_modules():
            ps = list(m.named_parameters(recurse=False))
            if not ps:
                continue
            pkeys = fmt.assign_keys([n for n, _ in ps])
            table.append({"id": len(table), "name": name, "type": type(m).__name__,
                          "class": f"{type(m).__module__}.{type(m).__qualname__}",
                          "params": [{"name": n, "key": k, "shape": list(p.shape),
                                      "dtype": str(p.dtype).replace("torch.", ""), "numel": p.numel(),
                                      "requires_grad": bool(p.requires_grad)}
                                     for (n, p), k in zip(ps, pkeys)],
                          "n_params": int(sum(p.numel() for _, p in ps))})
            self._modules.append(m)
        for L, key in zip(table, fmt.assign_keys([L["name"] for L in table])):
            L["key"] = key
        self._table = table

        def type_match(item, rec):
            m = self._modules[rec["id"]]
            if isinstance(item, type):
                return isinstance(m, item)
            if isinstance(item, torch.nn.Module):
                return item is m
            return False

        try:
            self._selected = fmt.select_layers(layers, table, type_match)
        except fmt.TraceError as e:
            raise ValueError(str(e)) from None
        sel = set(self._selected)
        for L in table:
            L["selected"] = L["id"] in sel

        # ---- what step() copies: (kind, layer_key, param_key, parameter, attrs)
        self._grad_targets, self._weight_targets = [], []
        if records_tensors:
            for L in table:
                if not L["selected"]:
                    continue
                m = self._modules[L["id"]]
                for pinfo, (pname, p) in zip(L["params"], m.named_parameters(recurse=False)):
                    attrs = {"layer_id": L["id"], "layer": L["name"], "param": pname}
                    self._weight_targets.append((L["key"], pinfo["key"], p, attrs))
                    if p.requires_grad:
                        self._grad_targets.append((L["key"], pinfo["key"], p, attrs))

        # ---- activation sites (module outputs and functional call sites)
        self._act_sched = as_schedule(activations_every)
        if not isinstance(activation_samples, int) or activation_samples < 0:
            raise ValueError("activation_samples must be an int >= 0")
        self._sites_dirty = False
        self._tracker = None
        if activations is not None and activations is not False:
            from .activations import ActivationTracker
            self._tracker = ActivationTracker(
                model, activations, samples=activation_samples, unit_axis=activation_unit_axis,
                on_new_site=self._site_added, layer_ids={L["id"]: self._modules[L["id"]] for L in table})

        try:
            self._setup_run(model, table, overwrite, on_error, on_full, queue_items, queue_bytes,
                            flush_steps, flush_secs, max_shard_bytes, grad_dtype, weight_dtype,
                            record_rank, layers, activations, activation_samples)
        except BaseException:
            if self._tracker is not None:  # a failed constructor leaves the model without our hooks
                self._tracker.remove()
            raise
        self._init_graph_probe(model, graph, probe, probe_every)

    def _init_graph_probe(self, model, graph: bool, probe: Any, probe_every: Any) -> None:
        """Function graph on the first forward and the feature probe (small, self-contained)."""
        self._graph_hook = model.register_forward_pre_hook(self._graph_pre, with_kwargs=True, prepend=True) \
            if graph else None
        self._probe = None
        if probe is not None:
            from .attention import _resolve_layer
            if not (isinstance(probe, tuple) and len(probe) == 2):
                raise ValueError("probe must be a tuple (example_input, layer)")
            self._probe = (probe[0], _resolve_layer(model, probe[1])[0])
            self._probe_sched = "epoch" if probe_every == "epoch" else as_schedule(probe_every)
            self.config.update(probe_layer=self._probe[1], probe_every=repr(probe_every))

    def _setup_run(self, model, table, overwrite, on_error, on_full, queue_items, queue_bytes,
                   flush_steps, flush_secs, max_shard_bytes, grad_dtype, weight_dtype, record_rank,
                   layers, activations, activation_samples) -> None:
        # ---- run directory
        self._prepare_dir(overwrite)
        self.config = {
            "layers": repr(layers), "selected_layers": self._selected, "grads_every": repr(self._grad_sched),
            "grad_stats_every": repr(self._gstat_sched),
            "weights_every": repr(self._weight_sched), "on_error": on_error, "on_full": on_full,
            "queue_items": queue_items, "queue_bytes": queue_bytes, "flush_steps": flush_steps,
            "flush_secs": flush_secs, "max_shard_bytes": max_shard_bytes, "grad_dtype": grad_dtype,
            "weight_dtype": weight_dtype, "record_rank": record_rank,
            "activation_ranks": self._activation_ranks,
            "activations": repr(activations), "activations_every": repr(self._act_sched),
            "activation_samples": activation_samples,
        }
        self._manifest = {
            "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "bbdecoder_version": VERSION,
            "created": time.time(), "status": fmt.STATUS_RECORDING, "world_size": self.world_size,
            "host": socket.gethostname(), "torch_version": torch.__version__,
            "model": {"class": f"{type(model).__module__}.{type(model).__qualname__}",
                      "n_params": int(sum(p.numel() for p in model.parameters()))},
            "config": self.config, "layers": table, "sites": [],
        }
        if self.rank == 0:
            files.write_json_atomic(os.path.join(self.run_dir, fmt.MANIFEST), self._manifest)
        self._series = ShardSeriesWriter(os.path.join(self.run_dir, fmt.rank_dirname(self.rank)), self.rank,
                                         flush_steps=flush_steps, flush_secs=flush_secs,
                                         max_shard_bytes=max_shard_bytes, backend=HDF5Backend())
        self._writer = BackgroundWriter(self._series, resolve=_resolve, max_items=queue_items,
                                        max_bytes=queue_bytes, on_full=on_full)
        self._step = 0
        self._epoch = 0
        self._closed = False
        self._disabled = False
        self._t_start = time.time()
        if self._tracker is not None:
            self._tracker.want_raw(self._act_sched(0))
        ref = weakref.ref(self)
        self._atexit = lambda: (ref() is not None and ref()._close_at_exit())
        atexit.register(self._atexit)

    # ------------------------------------------------------------------ set-up helpers
    def _prepare_dir(self, overwrite: bool) -> None:
        d = self.run_dir
        if self.rank == 0:
            if os.path.exists(d) and not os.path.isdir(d):
                raise FileExistsError(f"{d} exists and is not a directory")
            if os.path.isdir(d) and os.listdir(d):
                if not overwrite:
                    raise FileExistsError(f"{d} already holds a run or other files; pass overwrite=True "
                                          "to replace a run, or choose another directory")
                if not os.path.isfile(os.path.join(d, fmt.MANIFEST)):
                    raise FileExistsError(f"{d} is not a bbdecoder run; refusing to overwrite it")
                for n in os.listdir(d):
                    p = os.path.join(d, n)
                    if (fmt.parse_rank_dirname(n) is not None or n in (fmt.CAPTURES_DIR, fmt.FEATURES_DIR)) \
                            and os.path.isdir(p):
                        shutil.rmtree(p)
                    elif n in (fmt.MANIFEST, fmt.GRAPH_FILE) or n.startswith(".tmp-"):
                        os.unlink(p)
            os.makedirs(d, exist_ok=True)
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        os.makedirs(d, exist_ok=True)

    # ------------------------------------------------------------------ public API
    @property
    def layers(self) -> list[LayerInfo]:
        """The layer table: id, dotted name, type, parameter count, and whether it is recorded."""
        return [LayerInfo(L["id"], L["name"], L["type"], L["n_params"], L["selected"]) for L in self._table]

    @property
    def step_index(self) -> int:
        """Index the next ``step()`` call will record."""
        return self._step

    @property
    def epoch(self) -> int:
        return self._epoch

    def __repr__(self) -> str:
        rows = [("id", "name", "type", "params", "rec")]
        rows += [(str(L["id"]), L["name"] or "(root)", L["type"], f"{L['n_params']:,}", "*" if L["selected"] else "")
                 for L in self._table]
        w = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"Recorder({self.run_dir!r}, rank {self.rank}/{self.world_size}, "
                 f"grad stats {self.config['grad_stats_every']}, grads {self.config['grads_every']}, "
                 f"weights {self.config['weights_every']}, "
                 f"{'closed' if self._closed else 'open'})"]
        for r in rows:
            lines.append("  " + "  ".join([r[0].rjust(w[0]), r[1].ljust(w[1]), r[2].ljust(w[2]),
                                           r[3].rjust(w[3]), r[4]]).rstrip())
        return "\n".join(lines)

    __str__ = __repr__

    def step(self, loss: Any = None) -> None:
        """Record one optimizer step. Call after ``backward()`` and before ``optimizer.step()``.

        Args:
            loss: the step's loss: a tensor (not synchronised; copied asynchronously), a float, or None.

        Raises:
            RecorderClosedError: after close().
            RecorderError: with ``on_error="raise"``, if the recorder failed since the last call.
        """
        if self._closed:
            raise RecorderClosedError("Recorder.step() called after close()")
        self._surface_error()
        s = self._step
        self._step += 1
        if self._disabled:
            return
        try:
            p = _Pending(s, self._epoch, time.time(), _loss_handoff(loss))
            with torch.no_grad():
                if self._grad_targets and self._gstat_sched(s):
                    self._pack_grad_stats(p)
                if self._grad_targets and self._grad_sched(s):
                    self._pack(p, [(fmt.KIND_GRADS, lk, pk, q.grad, a) for lk, pk, q, a in self._grad_targets],
                               self._grad_dtype)
                if self._weight_targets and self._weight_sched(s):
                    self._pack(p, [(fmt.KIND_WEIGHTS, lk, pk, q, a) for lk, pk, q, a in self._weight_targets],
                               self._weight_dtype)
                if self._tracker is not None:
                    self._pack_activations(p, s)
            if isinstance(p.loss, _AsyncScalar):
                p.events.extend(p.loss.events)
                p.loss = p.loss.host
            self._writer.put(p, p.nbytes, _drop_payload)
            if self._probe is not None and self._probe_sched != "epoch" and self._probe_sched(s):
                self.capture_features(*self._probe, step=s)
        except (WriterClosedError, RecorderError):
            raise
        except WriterError as e:
            self._fail(e.__cause__ or e)
        except Exception as e:  # a recorder problem must not kill training unless asked
            self._fail(e)

    def epoch_end(self) -> None:
        """Mark the end of an epoch: later steps carry the next epoch index."""
        if self._closed:
            raise RecorderClosedError("Recorder.epoch_end() called after close()")
        self._surface_error()
        if self._probe is not None and self._probe_sched == "epoch" and not self._disabled:
            try:
                self.capture_features(*self._probe)
            except Exception as e:
                self._fail(e)
        self._epoch += 1

    def record_graph(self, example_input: Any, kwargs: dict | None = None) -> str:
        """Record the function graph of one forward pass on ``example_input`` into ``RUN/graph.json``
        (see :func:`recorder.graph.record_graph`). Not part of the training step.

        Returns:
            Path of graph.json.
        """
        if self._closed:
            raise RecorderClosedError("Recorder.record_graph() called after close()")
        from .graph import record_graph, write_graph
        h, self._graph_hook = self._graph_hook, None  # graph=True is satisfied by this call
        if h is not None:
            h.remove()
        tr = self._tracker
        if tr is not None:  # the extra forward must not count as an activation step
            tr.remove()
        try:
            g = record_graph(self.model, example_input, kwargs)
        finally:
            if tr is not None:
                tr._install()
        if self.rank != 0:
            return os.path.join(self.run_dir, fmt.GRAPH_FILE)
        return write_graph(self.run_dir, g)

    def capture_features(self, x: Any, layer: Any, step: int | None = None) -> str:
        """Store ``layer``'s output for the fixed input ``x`` into ``RUN/features/`` at the current step
        (default: the index of the next step, i.e. the weights after the last optimizer step) and epoch
        (see :func:`recorder.features.capture_features`). Not part of the training step.

        Returns:
            Path of the capture file written; None when writing failed (a full disk) and
            ``on_error="warn"``: then one RecorderWarning and recording stops, as for a failed step.
        """
        if self._closed:
            raise RecorderClosedError("Recorder.capture_features() called after close()")
        if self._disabled:   # recording stopped after an error: captures are not written either
            return None
        from .features import capture_features
        try:
            return capture_features(self.model, x, layer, self.run_dir,
                                    step=self._step if step is None else step, epoch=self._epoch, rank=self.rank)
        except OSError as e:   # a write error (full disk): on_error decides, as for the steps
            self._fail(e)
            return None

    def _graph_pre(self, module, args, kwargs):
        if self._disabled or self._closed:
            h, self._graph_hook = self._graph_hook, None
            if h is not None:
                h.remove()
            return None
        try:
            self.record_graph(args, kwargs)
        except Exception as e:
            self._fail(e)
        return None

    def capture_attention(self, loader, target_layer: Any, targets: dict, **kwargs) -> str:
        """An attention capture pass into this run (``RUN/captures/``) at the current step and epoch.

        Same arguments as :func:`recorder.attention.capture_attention` (without model and run_dir).
        Not part of the training step: call it between steps, e.g. once per epoch on a probe set.

        Returns:
            Path of the capture file written; None when writing failed (a full disk) and
            ``on_error="warn"``: then one RecorderWarning and recording stops, as for a failed step.
        """
        if self._closed:
            raise RecorderClosedError("Recorder.capture_attention() called after close()")
        if self._disabled:   # recording stopped after an error: captures are not written either
            return None
        from .attention import capture_attention
        try:
            return capture_attention(self.model, loader, self.run_dir, target_layer, targets, step=self._step,
                                     epoch=self._epoch, rank=self.rank, **kwargs)
        except OSError as e:   # a write error (full disk): on_error decides, as for the steps
            self._fail(e)
            return None

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every step so far is written and visible to readers (the live shard is closed)."""
        if self._closed:
            return
        self._surface_error()
        if self._disabled:
            return
        try:
            self._writer.flush(timeout)
        except WriterError as e:
            self._fail(e.__cause__ or e, surfaced=True)

    def close(self, status: str | None = None) -> None:
        """Write what is queued, close the last shard and mark the run complete. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            atexit.unregister(self._atexit)
        except Exception:
            pass
        status = status or fmt.STATUS_COMPLETE
        if self._tracker is not None:
            self._tracker.remove()
        if getattr(self, "_graph_hook", None) is not None:
            self._graph_hook.remove()
        self._writer.close(status, raise_error=False)
        err = self._writer.take_error()
        if self._writer.error is not None:
            status = fmt.STATUS_FAILED
        if self.rank == 0:
            self._manifest.update(status=status, ended=time.time(), steps=self._step, epochs=self._epoch,
                                  dropped=self._writer.dropped)
            if self._writer.error is not None:
                self._manifest["error"] = describe_error(self._writer.error)
            try:
                files.write_json_atomic(os.path.join(self.run_dir, fmt.MANIFEST), self._manifest)
            except OSError as e:
                if err is None:
                    err = e
        if err is not None:
            self._fail(err, surfaced=True, closing=True)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close(fmt.STATUS_ABORTED)
            except Exception as e:  # never mask the training code's exception
                warnings.warn(f"bbdecoder: closing the recorder failed: {e}", RecorderWarning, stacklevel=2)
        return False

    # ------------------------------------------------------------------ internals
    def _pack_activations(self, p: _Pending, s: int) -> None:
        tr = self._tracker
        if tr.error is not None:
            err, tr.error = tr.error, None
            raise RuntimeError(f"activation capture failed: {type(err).__name__}: {err}") from err
        stats, raw = [], []
        for key, acc, samples in tr.take():
            for name, t in acc.items():
                stats.append((fmt.KIND_ACT_STATS, key, name, t, None))
            for t in samples[:1]:
                raw.append((fmt.KIND_ACTIVATIONS, key, "samples", t, None))
        tr.want_raw(self._act_sched(s + 1))
        if stats:
            self._pack(p, stats, torch.float64)
        if raw:
            self._pack(p, raw, torch.float32)
        if tr._order_done and "forward_order" not in self._manifest:
            self._manifest["forward_order"] = tr.forward_order
            self._sites_dirty = True
        if self._sites_dirty and self.rank == 0:
            self._sites_dirty = False
            files.write_json_atomic(os.path.join(self.run_dir, fmt.MANIFEST), self._manifest)
        elif self._sites_dirty:   # other ranks: their site table in rank.json (the analyzer adds new sites)
            self._sites_dirty = False
            with self._series._lock:
                self._series.state["sites"] = list(self._manifest["sites"])
            self._series.write_state()

    def _site_added(self, meta: dict) -> None:
        self._manifest["sites"].append(meta)
        self._sites_dirty = True

    def _pack_grad_stats(self, p: _Pending) -> None:
        """Gradient statistics on the device: per device a fixed handful of whole-buffer operations
        (:class:`recorder.gradstats.GradStatsPlan`); the small result goes to the host like a payload."""
        present: dict[Any, list] = {}
        for i, (lk, pk, q, a) in enumerate(self._grad_targets):
            g = q.grad
            if g is None:
                continue
            if g.is_sparse:
                g = g.to_dense()
            present.setdefault(g.device, []).append((i, g))
        tg = self._grad_targets
        for dev, all_items in present.items():
            key = (dev, tuple(i for i, _ in all_items))
            plans = self._gstat_plans.get(key)
            if plans is None:   # groups of bounded size, one after the other through one scratch
                plans = []
                for grp in group_items([g.numel() for _, g in all_items]):
                    items = [(tg[i][0], tg[i][1], g.numel(), tg[i][3]) for i, g in (all_items[j] for j in grp)]
                    plans.append((GradStatsPlan(items), grp))
                self._gstat_plans[key] = plans
            for plan, grp in plans:
                part = plan.partials([all_items[j][1] for j in grp], self._gstat_scratch)
                p.stats.append((_to_host(p, dev, part), plan))

    def _pack(self, p: _Pending, items, dtype) -> None:
        """Copy tensors ``items`` [(kind, layer_key, param_key, tensor, attrs)] into flat host
        buffers per device (one cat and one async copy per group of at most
        :data:`recorder.gradstats.GROUP_ELEMS` elements, so that a large model's snapshot never
        needs a device temporary of the model's size), recorded in ``p``."""
        per_dev: dict[Any, list] = {}
        for kind, lk, pk, t, attrs in items:
            if t is None:
                continue
            if t.is_sparse:
                t = t.to_dense()
            per_dev.setdefault(t.device, []).append((kind, lk, pk, t, attrs))
        for dev, dev_items in per_dev.items():
            for grp in group_items([t.numel() for *_, t, _ in dev_items], chunk=1):
                self._pack_group(p, dev, [dev_items[j] for j in grp], dtype)

    def _pack_group(self, p: _Pending, dev: torch.device, items: list, dtype) -> None:
        """One group of tensors on ``dev``: one cat, one copy to the host, its layout, into ``p``."""
        flat = torch.cat([t.reshape(-1) for *_, t, _ in items]) if len(items) > 1 \
            else items[0][3].reshape(-1).clone()
        if flat.dtype != dtype:
            flat = flat.to(dtype)
        layout, off = [], 0
        for kind, lk, pk, t, attrs in items:
            n = t.numel()
            layout.append((kind, lk, pk, off, n, tuple(t.shape), attrs))
            off += n
        p.groups.append((_to_host(p, dev, flat), layout))

    def _surface_error(self) -> None:
        err = self._writer.take_error()
        if err is not None:
            self._fail(err, surfaced=True)

    def _fail(self, err: BaseException, surfaced: bool = False, closing: bool = False) -> None:
        first = not self._disabled
        self._disabled = True
        if not closing and not self._writer.closed:
            try:
                self._series_note(err)
            except Exception:
                pass
        msg = f"bbdecoder recorder failed ({describe_error(err)}); " + \
              ("recording stopped, training goes on" if self.on_error == "warn" else "")
        if self.on_error == "raise":
            raise RecorderError(f"bbdecoder recorder failed: {describe_error(err)}") from err
        if first:
            warnings.warn(msg.rstrip("; "), RecorderWarning, stacklevel=3)

    def _series_note(self, err: BaseException) -> None:
        if self._writer.error is None:  # an error on the training side: tell the writer to stop
            self._writer._set_error(err)
            self._writer.take_error()

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _to_host(p: _Pending, dev: torch.device, t: torch.Tensor) -> torch.Tensor:
    """``t`` (a tensor of ours, on ``dev``) on the host: itself on the CPU; on CUDA a non_blocking
    copy into pinned memory with an event in ``p`` for the writer to wait on (no synchronisation);
    elsewhere a plain copy (which may synchronise on that backend). Counts its bytes in ``p``."""
    if dev.type == "cpu":
        host = t
    elif dev.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        p.events.append(ev)
    else:
        host = t.to("cpu")
    p.nbytes += host.numel() * host.element_size()
    return host


class _AsyncScalar:
    __slots__ = ("host", "events")

    def __init__(self, host, events):
        self.host, self.events = host, events


def _loss_handoff(loss: Any) -> Any:
    """A float, or a host tensor being filled asynchronously from the device."""
    if loss is None:
        return float("nan")
    if isinstance(loss, torch.Tensor):
        t = loss.detach().reshape(-1)[:1]
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=torch.float64, pin_memory=True)
            host.copy_(t.to(torch.float64), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            return _AsyncScalar(host, [ev])
        if t.device.type == "cpu":
            return t.to(torch.float64).clone()
        return t.to("cpu", torch.float64)
    try:
        return float(loss)
    except (TypeError, ValueError):
        return float("nan")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers (else ``model``), so
    that layer names are the same with and without DDP (no ``module.`` prefix). Hooks on the inner
    module fire when the wrapper runs it.

    Returns:
        The innermost wrapped ``torch.nn.Module``.
    """
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _check_ranks(ranks: Any, world_size: int) -> list[int] | None:
    """``activation_ranks`` as a sorted list of ranks (None: every rank). ValueError if malformed."""
    if ranks is None:
        return None
    try:
        items = [ranks] if isinstance(ranks, int) and not isinstance(ranks, bool) else list(ranks)
        out = sorted({int(r) for r in items if isinstance(r, int) and not isinstance(r, bool)})
        ok = len(out) == len(set(items)) and all(0 <= r < world_size for r in out)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"activation_ranks must be None, a rank or a list of ranks in [0, {world_size}), "
                         f"not {ranks!r}")
    return out


def _dist_info() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1
