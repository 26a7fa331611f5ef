"""BBDecoder recorder: attach to a PyTorch model in an ordinary training loop and write a trace.

Needs torch. The trace format it writes is defined torch-free in :mod:`analyzer.trace`.
"""

from .recorder import (LayerInfo, Recorder, RecorderClosedError, RecorderError,  # noqa: F401
                       RecorderWarning)
from .prune import apply_plan  # noqa: F401
from .attention import capture_attention  # noqa: F401
from .schedules import as_schedule, at, every, log_spaced  # noqa: F401

__all__ = ["Recorder", "RecorderError", "RecorderClosedError", "RecorderWarning", "LayerInfo",
           "every", "at", "log_spaced", "as_schedule", "apply_plan", "capture_attention"]
