"""PyTorch Lightning: ``Callback(run_dir, **recorder_options)`` records a run from ``Trainer.fit``.

Where it records (Lightning 2.x, automatic optimization; see ``Precision._after_closure``): the
optimizer step's closure runs ``training_step`` and ``backward`` for the last micro-batch, then
AMP's ``GradScaler`` unscales, then ``on_before_optimizer_step`` runs, then
``configure_gradient_clipping`` clips, then the optimizer updates. So:

- **steps**: one per optimizer step, in ``on_before_optimizer_step`` (``accumulate_grad_batches=2``
  over 40 batches: 20 steps), with the gradient accumulated over the micro-batches; one step per
  optimizer and ``optimizer.step()`` with several optimizers;
- **gradients**: by default unscaled and before clipping (what the optimizer would see without
  clipping); ``clipped=True``: right after ``configure_gradient_clipping`` (the callback wraps that
  hook on the module while training), i.e. what the optimizer's update uses. Weights are the ones
  the step's forward used in both cases;
- **loss**: the sum of the losses back-propagated in the step (``on_before_backward``: each
  micro-batch's loss divided by ``accumulate_grad_batches`` by Lightning; divided back by the
  GradScaler's scale under fp16 AMP), i.e. the mean micro-batch loss of a full accumulation window,
  and the sum of the values ``on_train_batch_end`` gets as ``outputs["loss"]``; kept on the device;
- **epochs**: ``on_train_epoch_end``; validation, test and predict passes record nothing (the
  modules are in eval mode, and no optimizer step happens);
- **model**: the LightningModule itself, so every parameter it trains is recorded under its own
  name (``model.encoder.0.weight``); activation sites and the graph come from the submodule whose
  forward actually runs when ``training_step`` calls ``self.model(...)`` rather than ``self(...)``;
- **ranks**: the Recorder is created in ``on_train_start``, after the strategy has initialised
  ``torch.distributed`` (``strategy="ddp"``, FSDP2 through ``ModelParallelStrategy``), whether
  Lightning launched the processes or torchrun did: each process records as its rank into the same
  run directory (gradients and weights on ``record_rank`` only, every rank its slice under FSDP2;
  steps, its own loss and activations on every rank). Under DDP Lightning runs ``training_step``
  through the LightningModule's patched ``forward``; the Recorder does not take that call for the
  model's forward (see ``recorder.modules.redirected``), so activations and the graph come from the
  submodule that runs, as in one process. FSDP1 (``FSDPStrategy``, which wraps the LightningModule
  itself) is the Recorder's own limitation: the callback hands the Recorder Lightning's wrapper, so
  it refuses it with one warning and records no gradients or weights (Lightning runs FSDPStrategy
  on GPUs only).

The run is closed at ``on_train_end`` (or marked aborted by ``on_exception``); the Recorder is
``callback.recorder`` (``None`` before training starts).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from ..distributed import uses_fsdp1
from .common import Recording

if "lightning.pytorch" in sys.modules and "pytorch_lightning" not in sys.modules:
    import lightning.pytorch as pl   # the unified package, already in use
else:
    try:
        import pytorch_lightning as pl
    except ImportError:   # only the unified ``lightning`` package is installed
        import lightning.pytorch as pl

__all__ = ["Callback", "RecorderCallback"]


class RecorderCallback(pl.Callback):
    """Record gradients, weights, losses and (optionally) activations of a LightningModule.

    Args:
        run_dir: the run directory.
        clipped: record the gradients after Lightning's gradient clipping instead of before it.
        **recorder_options: any keyword of :class:`bbdecoder.recorder.Recorder` (``layers``,
            ``grads_every``, ``activations``, ``graph``, ``overwrite``, ...).
    """

    def __init__(self, run_dir: str | os.PathLike, *, clipped: bool = False, **recorder_options: Any):
        super().__init__()
        self.clipped = bool(clipped)
        self._run = Recording(run_dir, recorder_options)
        self._loss = None        # the step's loss so far (a device tensor)
        self._module = None      # the module whose configure_gradient_clipping is wrapped

    @property
    def recorder(self):
        """The :class:`~bbdecoder.recorder.Recorder` (None before training starts)."""
        return self._run.recorder

    def on_train_start(self, trainer, pl_module) -> None:
        model = pl_module
        wrapped = getattr(trainer.strategy, "model", None)
        if isinstance(wrapped, torch.nn.Module) and wrapped is not pl_module and uses_fsdp1(wrapped) \
                and not uses_fsdp1(pl_module):
            model = wrapped   # FSDPStrategy wraps the LightningModule itself: the Recorder must see it (and refuse it)
        self._run.start(model)
        if self.clipped and pl_module.automatic_optimization and self._module is None:
            plain = pl_module.configure_gradient_clipping

            def clip_then_record(*args, **kwargs):
                out = plain(*args, **kwargs)
                self._record()
                return out

            pl_module.configure_gradient_clipping = clip_then_record   # an instance attribute, removed at the end
            self._module = pl_module

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if not pl_module.training:
            return
        loss = loss.detach()
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        scale = getattr(scaler, "_scale", None)   # fp16 AMP: Lightning hands the scaled loss to this hook
        if scale is not None:
            loss = loss / scale.to(loss.device)
        self._loss = loss if self._loss is None else self._loss + loss

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._module is None:
            self._record()

    def _record(self) -> None:
        loss, self._loss = self._loss, None
        self._run.step(loss)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._run.epoch_end()

    def _restore(self) -> None:
        if self._module is not None:
            self._module.__dict__.pop("configure_gradient_clipping", None)
            self._module = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()
        self._run.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()
        self._run.close(aborted=True)


Callback = RecorderCallback
