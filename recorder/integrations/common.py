"""What the framework callbacks share: a Recorder created when training starts and its step calls."""

from __future__ import annotations

import os
import warnings
from typing import Any

from bbdecoder.analyzer.trace import format as fmt
from ..recorder import Recorder
from ..errors import RecorderWarning

__all__ = ["Recording"]

#: the Recorder's warning that the model's own forward did not run: expected under a framework
_ENTRY_WARNING = r"bbdecoder: the forward of the recorded model"


class Recording:
    """One run recorded from a framework's callback hooks.

    Args:
        run_dir: the run directory (see :class:`recorder.recorder.Recorder`).
        options: the Recorder's keyword options (``layers``, ``grads_every``, ``activations``, ...).
    """

    def __init__(self, run_dir: str | os.PathLike, options: dict[str, Any]):
        if "model" in options or "run_dir" in options:
            raise TypeError("the callback finds the model itself: pass run_dir and the Recorder's options only")
        self.run_dir = run_dir
        self.options = dict(options)
        self.recorder: Recorder | None = None
        self.closed = False

    def start(self, model) -> None:
        """Create the Recorder on ``model`` at the first training start (a closed run stays closed)."""
        if self.recorder is None:
            self.closed = False
            self.recorder = Recorder(model, self.run_dir, **self.options)

    def step(self, loss: Any) -> None:
        """One optimizer step. The first step's warning that the framework's module (not the model's
        root forward) ran is expected here: the model's entry point is found and recorded."""
        rec = self.recorder
        if rec is None or self.closed:
            return
        if rec.step_index == 0:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_ENTRY_WARNING, category=RecorderWarning)
                rec.step(loss)
        else:
            rec.step(loss)

    def epoch_end(self) -> None:
        if self.recorder is not None and not self.closed:
            self.recorder.epoch_end()

    def close(self, aborted: bool = False) -> None:
        self.closed = True
        if self.recorder is not None:
            self.recorder.close(fmt.STATUS_ABORTED if aborted else None)
