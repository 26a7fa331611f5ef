"""The Recorder: attaches to a model in an ordinary training loop and writes a trace.

Hot path (:meth:`Recorder.step`): per selected parameter one ``reshape`` view, one ``torch.cat``
per device and storage dtype, and on CUDA one ``non_blocking`` copy into pinned memory plus an
event; no ``.item()``, no ``.cpu()``, no loop over elements (:mod:`recorder.packing`). Everything
else (waiting for the copy, numpy conversion, HDF5) happens in the background writer thread.
"""

from __future__ import annotations

import atexit
import os
import time
import warnings
import weakref
from typing import Any

import torch

from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.hdf5 import HDF5Backend
from bbdecoder.analyzer.trace.series import ShardSeriesWriter
from .distributed import check_ranks, dist_info, local, unwrap_model, uses_fsdp1
from .errors import RecorderClosedError, RecorderError, RecorderWarning
from .gradstats import Scratch
from .lifecycle import Lifecycle
from .modules import ForwardWatch
from .layers import LayerInfo, layer_table, param_targets, select, table_lines
from .act_window import ActivationWindow
from .packing import AsyncScalar, CastWatch, GradPlans, Pending, drop_payload, loss_handoff, pack, pack_grad_stats, resolve
from .rundir import new_manifest, prepare_run_dir, write_manifest
from .sample_budget import DEFAULT_SAMPLE_BYTES, SampleBudget
from .schedules import as_schedule
from .side_captures import SideCaptures
from .writer import BackgroundWriter, WriterClosedError, WriterError

__all__ = ["Recorder", "RecorderError", "RecorderWarning", "RecorderClosedError", "LayerInfo", "unwrap_model"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


class Recorder(Lifecycle, SideCaptures):
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
            (they are identical on every rank after DDP's all-reduce); None = every rank. Parameters
            sharded by FSDP2 (``fully_shard``: DTensors sharded along dim 0) are recorded by every
            rank whatever ``record_rank`` says, each rank its own slice (statistics and raw rows); the
            analyzer merges the slices into the statistics and tensors of the whole parameter. FSDP1
            (``FullyShardedDataParallel``) is not supported: one RecorderWarning, and gradients and
            weights are not recorded (steps, losses and activations are).
        activation_ranks: the ranks that record activations under torch.distributed: None (default:
            every rank, each from its own data), a rank or a list of ranks. Every rank writes its step
            table and ``rank.json``; ranks other than 0 put their activation sites in ``rank.json``.
        activations: activation sites to record (None: none). True or ``"activations"``: every
            activation module (nn.ReLU, nn.Sigmoid, nn.Tanh, ...) and every functional activation
            call; ``"all"``: every leaf module's output too; or ids, names, globs, types, modules
            and call-site patterns (see :class:`recorder.activations.ActivationTracker`).
            Per-unit statistics are accumulated on the device and stored once per window of
            ``activation_window`` steps.
        activation_window: steps per row of activation statistics: an int N >= 1 (1: every step) or
            "auto" (default): 1 while one row of every site stays under ``activation_budget`` bytes,
            else the smallest N that keeps them under it per step (chosen once, when the first sites
            are known). Counts, sums and histograms add over the window, minima and maxima are
            extrema, so dead units, saturation and pruning plans stay exact; a window also ends at
            ``epoch_end()``, ``flush()`` and ``close()`` (see :mod:`recorder.act_window`).
        activation_budget: bytes per step and rank of activation statistics for ``"auto"`` (default 1 MiB).
        activations_every: schedule of raw activation samples (default every 50 steps).
        activation_samples: raw samples per site when that schedule fires (the first K inputs).
        activation_sample_bytes: bytes of raw samples per capture step and rank (default 32 MiB; None: no
            limit): sites over their share keep fewer inputs, then one input strided along the non-unit axes,
            recorded in the manifest (:mod:`recorder.sample_budget`); small models keep every sample.
        activation_unit_axis: ``{site name or glob: axis}`` overrides of the unit axis.
        graph: record the function graph (``RUN/graph.json``, see :mod:`recorder.graph`) once, on the
            first forward pass (an extra forward without gradients; buffers and RNG restored).
            When the model's own forward never runs (a LightningModule whose ``training_step`` calls
            ``self.model(...)``), activations and the graph come from the submodules whose forwards
            do run, under the model's names, with one RecorderWarning at the first ``step()``.
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
                 probe_every: Any = "epoch", activation_ranks: Any = None, activation_window: Any = "auto",
                 activation_budget: int = 1 << 20, activation_sample_bytes: int | None = DEFAULT_SAMPLE_BYTES):
        if not isinstance(model, torch.nn.Module):
            raise TypeError("model must be a torch.nn.Module")
        fsdp1 = uses_fsdp1(model)
        original, model = model, unwrap_model(model)   # DDP, DataParallel, torch.compile: same names
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
        self._gstat_plans = GradPlans()   # plans and static lists, kept between steps
        self._gstat_scratch = Scratch()   # work buffers shared by the plans (allocated at the first step)
        self._casts = CastWatch()         # values lost to float16 storage: counted, warned about once
        self._weight_sched = as_schedule(weights_every)
        self._grad_dtype, self._weight_dtype = _DTYPES[grad_dtype], _DTYPES[weight_dtype]
        self.rank, self.world_size = dist_info()
        records_tensors = record_rank is None or record_rank == self.rank
        self._activation_ranks = check_ranks(activation_ranks, self.world_size)
        if self._activation_ranks is not None and self.rank not in self._activation_ranks:
            activations = None   # this rank records no activations (its steps and rank.json still)

        # ---- layer table: every module owning parameters directly, ids in named_modules order
        self._modules, table = layer_table(model)
        self._table = table
        self._selected = select(layers, table, self._modules)
        # ---- what step() copies: (layer_key, param_key, parameter, attrs)
        self._grad_targets, self._weight_targets, refused = param_targets(table, self._modules, records_tensors)
        if fsdp1:
            self._grad_targets, self._weight_targets = [], []
            warnings.warn("bbdecoder: FullyShardedDataParallel (FSDP1) is not supported: gradients and weights "
                          "are not recorded (steps, losses and activations are); shard with FSDP2 "
                          "(torch.distributed.fsdp.fully_shard) to record them", RecorderWarning, stacklevel=2)
        elif refused:
            warnings.warn(f"bbdecoder: {len(refused)} DTensor parameter(s) ({', '.join(refused[:3])}"
                          f"{', ...' if len(refused) > 3 else ''}) are not sharded along dim 0 on a 1-D mesh: "
                          "their gradients and weights are not recorded", RecorderWarning, stacklevel=2)

        # ---- activation sites (module outputs and functional call sites)
        self._act_sched = as_schedule(activations_every)
        self._samples = SampleBudget(activation_samples, activation_sample_bytes)   # ValueError if invalid
        self._sites_dirty = False
        self._tracker = None
        self._window = ActivationWindow(activation_window, activation_budget)
        self._held: Pending | None = None   # a step whose activation window may end there
        if activations is not None and activations is not False:
            from .activations import ActivationTracker, compile_refusal
            why = compile_refusal(original)
            if why is not None:   # gradients and weights are still recorded
                warnings.warn(f"bbdecoder: activations are not recorded: {why}", RecorderWarning, stacklevel=2)
                activations = None
        if activations is not None and activations is not False:
            self._tracker = ActivationTracker(
                model, activations, samples=activation_samples, unit_axis=activation_unit_axis,
                on_new_site=self._site_added, layer_ids={L["id"]: self._modules[L["id"]] for L in table})
            self._tracker.budget = self._samples

        try:
            self._setup_run(model, table, overwrite, on_error, on_full, queue_items, queue_bytes,
                            flush_steps, flush_secs, max_shard_bytes, grad_dtype, weight_dtype,
                            record_rank, layers, activations, activation_samples)
        except BaseException:
            if self._tracker is not None:  # a failed constructor leaves the model without our hooks
                self._tracker.remove()
            raise
        self._init_graph_probe(model, graph, probe, probe_every)
        # ---- which module starts the forward passes (until the first step; see modules.ForwardWatch)
        self._watch = ForwardWatch(model, self._graph_entry if graph else None) \
            if (self._tracker is not None or graph) else None

    def _setup_run(self, model, table, overwrite, on_error, on_full, queue_items, queue_bytes,
                   flush_steps, flush_secs, max_shard_bytes, grad_dtype, weight_dtype, record_rank,
                   layers, activations, activation_samples) -> None:
        # ---- run directory
        prepare_run_dir(self.run_dir, self.rank, self.world_size, overwrite)
        self.config = {
            "layers": repr(layers), "selected_layers": self._selected, "grads_every": repr(self._grad_sched),
            "grad_stats_every": repr(self._gstat_sched),
            "weights_every": repr(self._weight_sched), "on_error": on_error, "on_full": on_full,
            "queue_items": queue_items, "queue_bytes": queue_bytes, "flush_steps": flush_steps,
            "flush_secs": flush_secs, "max_shard_bytes": max_shard_bytes, "grad_dtype": grad_dtype,
            "weight_dtype": weight_dtype, "record_rank": record_rank,
            "activation_ranks": self._activation_ranks,
            "activations": repr(activations), "activations_every": repr(self._act_sched),
            "activation_samples": activation_samples, "activation_window": self._window.setting,
            "activation_budget": self._window.budget, "activation_sample_bytes": self._samples.budget,
        }
        self._manifest = new_manifest(model, self.config, table, self.world_size)
        if self.rank == 0:
            write_manifest(self.run_dir, self._manifest)
        self._series = ShardSeriesWriter(os.path.join(self.run_dir, fmt.rank_dirname(self.rank)), self.rank,
                                         flush_steps=flush_steps, flush_secs=flush_secs,
                                         max_shard_bytes=max_shard_bytes, backend=HDF5Backend())
        self._writer = BackgroundWriter(self._series, resolve=resolve, max_items=queue_items,
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
        lines = [f"Recorder({self.run_dir!r}, rank {self.rank}/{self.world_size}, "
                 f"grad stats {self.config['grad_stats_every']}, grads {self.config['grads_every']}, "
                 f"weights {self.config['weights_every']}, "
                 f"{'closed' if self._closed else 'open'})"]
        return "\n".join(lines + table_lines(self._table))

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
            if self._watch is not None:   # the first step: did the model's own forward run?
                self._watch, msg = None, self._watch.finish()
                if msg is not None:
                    warnings.warn(msg, RecorderWarning, stacklevel=2)
            self._release(end=False)
            self._casts.warn_once()
            p = Pending(s, self._epoch, time.time(), loss_handoff(loss))
            with torch.no_grad():
                if self._grad_targets and self._gstat_sched(s):
                    pack_grad_stats(p, self._grad_targets, self._gstat_plans, self._gstat_scratch)
                if self._grad_targets and self._grad_sched(s):
                    pack(p, [(fmt.KIND_GRADS, lk, pk, local(q.grad), a) for lk, pk, q, a in self._grad_targets],
                         self._grad_dtype, self._casts)
                if self._weight_targets and self._weight_sched(s):
                    pack(p, [(fmt.KIND_WEIGHTS, lk, pk, local(q), a) for lk, pk, q, a in self._weight_targets],
                         self._weight_dtype, self._casts)
                hold = self._tracker is not None and self._pack_activations(p, s)
            if isinstance(p.loss, AsyncScalar):
                p.events.extend(p.loss.events)
                p.loss = p.loss.host
            if hold:   # its activation window goes on: handed over at the next call (_release)
                self._held = p
            else:
                self._writer.put(p, p.nbytes, drop_payload)
            if self._probe is not None and self._probe_sched != "epoch" and self._probe_sched(s):
                self.capture_features(*self._probe, step=s)
        except (WriterClosedError, RecorderError):
            raise
        except WriterError as e:
            self._fail(e.__cause__ or e)
        except Exception as e:  # a recorder problem must not kill training unless asked
            self._fail(e)

    def epoch_end(self) -> None:
        """Mark the end of an epoch: later steps carry the next epoch index. An open window of
        activation statistics (``activation_window`` > 1) ends here: no window spans two epochs."""
        if self._closed:
            raise RecorderClosedError("Recorder.epoch_end() called after close()")
        self._surface_error()
        if not self._disabled:
            try:
                self._release(end=True)   # a window never spans two epochs
            except Exception as e:
                self._fail(e)
        if self._probe is not None and self._probe_sched == "epoch" and not self._disabled:
            try:
                self.capture_features(*self._probe)
            except Exception as e:
                self._fail(e)
        self._epoch += 1

    # ------------------------------------------------------------------ internals
    def _release(self, end: bool) -> None:
        """Hand the held step to the writer; ``end``: with its open activation window's statistics."""
        p, self._held = self._held, None
        if p is None:
            return
        if end:
            with torch.no_grad():
                self._window.end(p, self._tracker, self._act_sched)
        self._writer.put(p, p.nbytes, drop_payload)

    def _pack_activations(self, p: Pending, s: int) -> bool:
        tr = self._tracker
        self._sites_dirty = self._samples.resolve(tr) or self._sites_dirty   # the samples' plans, once
        hold = self._window.pack(p, tr, self._act_sched, s)
        if self._window.changed:
            self._window.changed = False
            self._manifest["activation_window"] = self._window.n
            self._sites_dirty = True
        if tr.order_done and "forward_order" not in self._manifest:
            self._manifest["forward_order"] = tr.forward_order
            if tr.attention_unobserved:   # fused attention in the first training forward (trace-format.md)
                self._manifest["attention_unobserved"] = list(tr.attention_unobserved)
            self._sites_dirty = True
        if self._sites_dirty and self.rank == 0:
            self._sites_dirty = False
            write_manifest(self.run_dir, self._manifest)
        elif self._sites_dirty:   # other ranks: their site table in rank.json (the analyzer adds new sites)
            self._sites_dirty = False
            self._series.update_state(sites=list(self._manifest["sites"]))
        return hold

    def _site_added(self, meta: dict) -> None:
        self._manifest["sites"].append(meta)
        self._sites_dirty = True
