"""Ending a recording and failing safely: flush, close, the context manager and the error policy.

:class:`Lifecycle` is a part of :class:`recorder.recorder.Recorder` (a base class of it); it uses the
recorder's writer, manifest, counters, tracker and ``on_error``. A recorder error never kills
training unless ``on_error="raise"``: it becomes one :class:`RecorderWarning` and recording stops.
"""

from __future__ import annotations

import atexit
import time
import warnings
from typing import TYPE_CHECKING

from bbdecoder.analyzer.trace import format as fmt
from .errors import RecorderError, RecorderWarning
from .rundir import write_manifest
from .writer import WriterError, describe_error

if TYPE_CHECKING:
    from .recorder import Recorder

__all__ = ["Lifecycle"]


class Lifecycle:
    """flush / close / ``with`` and the error policy of a :class:`~recorder.recorder.Recorder`."""

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every step so far is written and visible to readers (the live shard is closed).
        An open window of activation statistics (``activation_window`` > 1) ends here."""
        if self._closed:
            return
        self._surface_error()
        if self._disabled:
            return
        try:
            self._release(end=True)   # an open activation window ends here
            self._writer.flush(timeout)
            self._casts.warn_once()   # values lost to float16 storage, seen by the writer (once)
        except WriterError as e:
            self._fail(e.__cause__ or e, surfaced=True)
        except Exception as e:
            self._fail(e)

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
        held_err = None
        if not self._disabled:
            try:
                self._release(end=True)   # the last (partial) activation window
            except Exception as e:
                held_err = e
        if self._tracker is not None:
            self._tracker.remove()
        if getattr(self, "_watch", None) is not None:
            self._watch.remove()
        if getattr(self, "_graph_hook", None) is not None:
            self._graph_hook.remove()
        self._writer.close(status, raise_error=False)
        err = self._writer.take_error() or held_err
        self._casts.warn_once()
        if self._writer.error is not None:
            status = fmt.STATUS_FAILED
        if self.rank == 0:
            self._manifest.update(status=status, ended=time.time(), steps=self._step, epochs=self._epoch,
                                  dropped=self._writer.dropped)
            if self._writer.error is not None:
                self._manifest["error"] = describe_error(self._writer.error)
            try:
                write_manifest(self.run_dir, self._manifest)
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
            self._writer.set_error(err)
            self._writer.take_error()

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception:
            pass
