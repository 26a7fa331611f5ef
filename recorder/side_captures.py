"""The Recorder's calls between steps: the function graph, the feature probe and attention captures.

:class:`SideCaptures` is a part of :class:`recorder.recorder.Recorder` (a base class of it); it uses
the recorder's ``model``, ``run_dir``, ``rank``, ``config``, step and epoch counters, activation
tracker and error policy (``_fail``). None of this runs inside ``step()``'s hot path.
"""

from __future__ import annotations

import os
from typing import Any

from bbdecoder.analyzer.trace import format as fmt
from .errors import RecorderClosedError
from .modules import prefix_graph, redirected, resolve_layer
from .schedules import as_schedule

__all__ = ["SideCaptures"]


class SideCaptures:
    """Function graph (``RUN/graph.json``), feature captures (``RUN/features/``) and attention
    captures (``RUN/captures/``) of a :class:`~recorder.recorder.Recorder`."""

    def _init_graph_probe(self, model, graph: bool, probe: Any, probe_every: Any) -> None:
        """Function graph on the first forward and the feature probe (small, self-contained)."""
        self._graph_hook = model.register_forward_pre_hook(self._graph_pre, with_kwargs=True, prepend=True) \
            if graph else None
        self._probe = None
        if probe is not None:
            if not (isinstance(probe, tuple) and len(probe) == 2):
                raise ValueError("probe must be a tuple (example_input, layer)")
            self._probe = (probe[0], resolve_layer(model, probe[1])[0])
            self._probe_sched = "epoch" if probe_every == "epoch" else as_schedule(probe_every)
            self.config.update(probe_layer=self._probe[1], probe_every=repr(probe_every))

    def record_graph(self, example_input: Any, kwargs: dict | None = None) -> str:
        """Record the function graph of one forward pass on ``example_input`` into ``RUN/graph.json``
        (see :func:`recorder.graph.record_graph`). Not part of the training step.

        Returns:
            Path of graph.json.
        """
        if self._closed:
            raise RecorderClosedError("Recorder.record_graph() called after close()")
        return self._graph_of(self.model, "", example_input, kwargs)

    def _graph_of(self, module, name: str, example_input: Any, kwargs: dict | None) -> str:
        """The graph of ``module`` (the model, or its submodule ``name`` that starts the forward pass
        when the model's own forward does not run: names are the model's, see ``modules.prefix_graph``)."""
        from .graph import record_graph, write_graph
        h, self._graph_hook = self._graph_hook, None  # graph=True is satisfied by this call
        if h is not None:
            h.remove()
        tr = self._tracker
        if tr is not None:  # the extra forward must not count as an activation step
            tr.remove()
        try:
            g = prefix_graph(record_graph(module, example_input, kwargs), name)
        finally:
            if tr is not None:
                tr.install()
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

    def _graph_entry(self, name: str, module, args, kwargs) -> None:
        """``modules.ForwardWatch``'s first entry below the model: its graph, if still wanted."""
        if self._graph_hook is None or self._disabled or self._closed:
            return
        try:
            self._graph_of(module, name, args, kwargs)
        except Exception as e:
            self._fail(e)

    def _graph_pre(self, module, args, kwargs):
        if self._disabled or self._closed:
            h, self._graph_hook = self._graph_hook, None
            if h is not None:
                h.remove()
            return None
        if redirected(module):   # not the model's forward: the graph comes from the module that runs
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
