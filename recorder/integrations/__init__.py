"""Callbacks that record a run from inside a training framework, with no training loop to write.

- :mod:`bbdecoder.recorder.integrations.lightning`: ``Callback(run_dir, **recorder_options)`` for
  PyTorch Lightning (``pytorch_lightning`` or ``lightning.pytorch``).
- :mod:`bbdecoder.recorder.integrations.hf`: ``Callback(run_dir, **recorder_options)``, a
  ``transformers.TrainerCallback`` for the Hugging Face ``Trainer``.

Each module imports its framework when it is imported itself; this package imports neither (and
``import bbdecoder.recorder`` does not import this package). Both record one step per optimizer step
(gradient accumulation: the accumulated gradient, once), the step's loss, epoch ends; evaluation
passes record nothing; the rank comes from ``torch.distributed`` when it is initialised. The default
is the gradient the optimizer's step would see without clipping: unscaled (mixed precision), before
clipping; ``clipped=True`` records it after the framework's clipping.
"""

__all__ = ["lightning", "hf"]
