"""The recorder's exceptions and warning (torch-free)."""

from __future__ import annotations

__all__ = ["RecorderError", "RecorderClosedError", "RecorderWarning"]


class RecorderError(RuntimeError):
    """The recorder failed (raised only with ``on_error="raise"``)."""


class RecorderClosedError(RecorderError):
    """step() or another recording call after close()."""


class RecorderWarning(UserWarning):
    """The recorder failed and stood aside; training goes on unrecorded."""
