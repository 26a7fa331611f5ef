"""Hugging Face ``Trainer``: ``Callback(run_dir, **recorder_options)``, a ``transformers.TrainerCallback``.

Where it records (the Trainer's inner loop, transformers 4.4x to 5.x): for each micro-batch
``training_step`` runs the forward and ``backward`` (the Trainer divides the loss by the number of
micro-batches unless the model normalised it with ``num_items_in_batch``); after the last
micro-batch of an accumulation window the Trainer unscales and clips
(``accelerator.clip_grad_norm_``) *before* ``on_pre_optimizer_step``, then steps the optimizer. No
callback runs between the last backward and the clipping, so:

- **steps**: one per optimizer step (``gradient_accumulation_steps=2`` over 40 batches: 20 steps),
  with the accumulated gradient;
- **gradients**, default: at the end of the last micro-batch's backward pass (an autograd
  end-of-backward callback, queued by gradient hooks on the parameters while accelerate's
  ``GradientState.sync_gradients`` says this micro-batch ends the window, and run after DDP's own
  end-of-backward reduction): before clipping, what the optimizer's step would see without it.
  Under fp16 with a ``GradScaler`` the gradients are still scaled there, so this falls back to
  ``clipped=True`` with one warning (``fp16=True`` on the CPU has no scaler: accelerate trains in
  float32 there, and the default holds). ``clipped=True``: in ``on_pre_optimizer_step``, after
  unscaling and clipping, what the update uses (the Trainer's logged ``grad_norm`` is the norm
  before clipping);
- **loss**: from the model's output (``outputs.loss``, a forward hook; no Trainer subclass): the
  sum over the window's micro-batches of that loss divided by their number, or of the loss itself
  when the Trainer passed ``num_items_in_batch`` to the model (then the model normalised it). That
  is the Trainer's own per-step ``tr_loss`` (what it logs as ``loss`` with ``logging_steps=1``)
  whenever the loss is the model's (labels in the batch, no ``compute_loss_func``, no label
  smoothing); otherwise the step's loss is not recorded (NaN). Under several processes it is this
  rank's loss (the Trainer logs the mean over ranks);
- **epochs**: ``on_epoch_end``; evaluation and prediction record nothing (eval mode, no steps);
- **model**: the model the Trainer trains (``model`` in the callback arguments, inside any DDP
  wrapper); activation sites and the graph come from whichever module's forward runs;
- **ranks**: the Recorder is created in ``on_train_begin``, after ``TrainingArguments`` initialised
  ``torch.distributed`` (torchrun, ``accelerate launch``; ``ddp_backend="gloo"`` on CPUs): each
  process records as its rank into the same run directory (gradients and weights on
  ``record_rank`` only, the all-reduced ones; steps, its own loss and activations on every rank).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from ..errors import RecorderWarning
from .common import Recording

__all__ = ["Callback", "RecorderCallback"]


def _sync_state():
    """accelerate's shared ``GradientState`` (whether this micro-batch ends an accumulation window),
    or None without accelerate (then every backward ends a window)."""
    try:
        from accelerate.state import GradientState
    except ImportError:
        return None
    return GradientState()


def _scales_loss(args, model) -> bool:
    """Whether the Trainer back-propagates a loss scaled by a ``GradScaler``: ``fp16=True`` where
    accelerate runs fp16 natively. On the CPU accelerate creates no scaler (and no autocast: the model
    trains in float32) unless native AMP was set up, which marks the model: accelerate keeps the
    plain forward as ``model._original_forward`` when it wraps the forward in autocast."""
    if not getattr(args, "fp16", False):
        return False
    device = getattr(getattr(args, "device", None), "type", "cpu")
    return device != "cpu" or "_original_forward" in vars(model)


def _queue_after_backward(fn) -> None:
    """Run ``fn`` when the running backward pass ends, after every end-of-backward callback queued
    so far (DDP queues its gradient reduction's finish when its last bucket is ready)."""
    engine = torch.autograd.Variable._execution_engine
    engine.queue_callback(lambda: engine.queue_callback(fn))


class RecorderCallback(TrainerCallback):
    """Record gradients, weights, losses and (optionally) activations under the Hugging Face Trainer.

    Args:
        run_dir: the run directory.
        clipped: record the gradients after the Trainer's clipping (``max_grad_norm``) instead of before.
        **recorder_options: any keyword of :class:`bbdecoder.recorder.Recorder` (``layers``,
            ``grads_every``, ``activations``, ``graph``, ``overwrite``, ...).
    """

    def __init__(self, run_dir: str | os.PathLike, *, clipped: bool = False, **recorder_options: Any):
        self.clipped = bool(clipped)
        self._run = Recording(run_dir, recorder_options)
        self._handles: list = []
        self._losses: list[torch.Tensor] = []   # the window's micro-batch losses (device tensors)
        self._normalised = False                # the model got num_items_in_batch: its loss is normalised
        self._queued = False
        self._state = None
        self._at_clip = self.clipped

    @property
    def recorder(self):
        """The :class:`~bbdecoder.recorder.Recorder` (None before training starts)."""
        return self._run.recorder

    # ------------------------------------------------------------------ the Trainer's events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or self._run.recorder is not None:
            return
        self._run.start(model)
        self._handles.append(model.register_forward_pre_hook(self._forward_pre, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._forward_out))
        if not self.clipped and _scales_loss(args, model):
            warnings.warn("bbdecoder: fp16 with a GradScaler: gradients are recorded after the Trainer's "
                          "unscaling and clipping (before clipping they are still scaled)", RecorderWarning,
                          stacklevel=2)
            self._at_clip = True
        if not self._at_clip:
            self._state = _sync_state()
            for p in model.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._grad_ready))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._at_clip:
            self._record()

    def on_epoch_end(self, args, state, control, **kwargs):
        self._run.epoch_end()

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._run.close()

    # ------------------------------------------------------------------ hooks
    def _forward_pre(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            self._normalised = kwargs.get("num_items_in_batch") is not None
        return None

    def _forward_out(self, module, args, out):
        if not module.training or not torch.is_grad_enabled():   # evaluation, or the graph's extra forward
            return
        loss = out.get("loss") if isinstance(out, Mapping) else None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()))
        else:
            self._losses.append(None)

    def _grad_ready(self, param) -> None:
        if self._queued or (self._state is not None and not self._state.sync_gradients):
            return
        self._queued = True
        _queue_after_backward(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._queued = False
        self._record()

    def _record(self) -> None:
        losses, self._losses = self._losses, []
        loss = None
        if losses and all(x is not None for x in losses):
            n = len(losses)
            for x in losses:   # the Trainer's order of additions: tr_loss += loss / n, per micro-batch
                x = x if self._normalised else x / n
                loss = x if loss is None else loss + x
        self._run.step(loss)


Callback = RecorderCallback
