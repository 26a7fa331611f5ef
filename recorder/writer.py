"""Background writer: a bounded queue between the training thread and the one thread that owns HDF5.

Semantics (ported from TensorBoard's EventFileWriter tests):
- ``put`` never touches h5py; when the queue is full it blocks (``on_full="block"``) or drops the
  item's payload and counts the drop in the trace (``on_full="drop"``);
- ``flush`` waits until everything queued so far is written and the live shard is closed;
- an exception in the writer thread is kept and re-raised in the caller by the next ``put``,
  ``flush`` or ``close`` (see :attr:`error`); after it the writer discards what it receives;
- ``close`` is idempotent; ``put`` after ``close`` raises :class:`WriterClosedError`.
"""

from __future__ import annotations

import collections
import os
import re
import threading
import traceback
from typing import Any, Callable, NoReturn

from bbdecoder.analyzer.trace import format as fmt


_HDF5_ERRNO = re.compile(r"errno = (\d+), error message = '([^']*)'")


def _os_error_in(msg: str) -> tuple[int, str] | None:
    """(errno, OS message) of an HDF5 I/O error message (one line), or None."""
    m = _HDF5_ERRNO.search(msg)
    if not m:
        return None
    n = int(m.group(1))
    return n, m.group(2) or os.strerror(n)


def describe_error(e: BaseException, limit: int = 1000) -> str:
    """``"ExceptionType: message"`` on one line, at most ``limit`` characters. An HDF5 I/O error
    (h5py raises it with the OS error buried in a multi-line message) is led by the OS error, e.g.
    ``"RuntimeError: [Errno 28] No space left on device (HDF5: Can't ... )"``."""
    msg = " ".join(str(e).split())
    os_err = None if msg.startswith("[Errno") else _os_error_in(msg)
    if os_err:
        msg = f"[Errno {os_err[0]}] {os_err[1]} (HDF5: {msg})"
    out = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return out if len(out) <= limit else out[:limit - 3] + "..."


def as_os_error(e: BaseException) -> BaseException:
    """An HDF5 I/O failure that h5py raised as another type (RuntimeError from ``flush``, with the
    OS error buried in a multi-line message) as the ``OSError`` it is, with its errno and a one-line
    message; any other exception unchanged."""
    if isinstance(e, OSError):
        return e
    msg = " ".join(str(e).split())
    os_err = _os_error_in(msg)
    return e if os_err is None else OSError(os_err[0], f"{os_err[1]} (HDF5: {msg[:500]})")


def raise_as_os_error(e: BaseException) -> NoReturn:
    """Raise ``e`` (being handled), or the ``OSError`` it is when h5py raised an I/O failure as
    another type (see :func:`as_os_error`), chained to it."""
    err = as_os_error(e)
    if err is e:
        raise e
    raise err from e


class WriterClosedError(RuntimeError):
    """Raised when something is written after close()."""


class WriterError(RuntimeError):
    """The background writer failed; ``__cause__`` holds the original exception."""


_FLUSH = object()


class BackgroundWriter:
    """Runs ``sink.write(records)`` in a daemon thread.

    Args:
        sink: object with ``write(list)``, ``tick()``, ``time_to_deadline() -> float | None``,
            ``rotate()``, ``close(status)``, ``abandon_live()`` and ``record_error(message)``
            (a :class:`analyzer.storage.ShardSeriesWriter` in production).
        resolve: turns a queued item into what ``sink.write`` takes (waits for device copies).
        max_items: most payload-carrying items in the queue.
        max_bytes: most payload bytes in the queue.
        on_full: "block" or "drop".
    """

    def __init__(self, sink, resolve: Callable[[Any], Any] = lambda x: x, max_items: int = 64,
                 max_bytes: int = 512 << 20, on_full: str = "block", name: str = "bbdecoder-writer",
                 batch_items: int = 16, batch_wait: float = 0.5):
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full must be 'block' or 'drop', not {on_full!r}")
        if max_items < 1 or max_bytes < 1:
            raise ValueError("queue bounds must be positive")
        self.sink, self.resolve = sink, resolve
        # The writer wakes for batch_items queued items (or after batch_wait seconds, a flush, a
        # blocked producer or close), not for every put: fewer wake-ups and GIL hand-overs. While the
        # live shard holds steps, queued items that fit in it wait for its deadline instead of
        # batch_wait (:meth:`_hold`): a slow training loop writes a batch at a time, not step by step.
        self.batch_items, self.batch_wait = max(1, int(batch_items)), float(batch_wait)
        self._urgent = 0
        self.max_items, self.max_bytes, self.on_full = max_items, max_bytes, on_full
        self._wake_at, self._wake_bytes = self._batch_bounds()
        self._q: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._items = self._bytes = 0
        self._busy = False
        self._closing = self._closed = False
        self._rotate_requested = False
        self.error: BaseException | None = None
        self.error_trace: str | None = None
        self.dropped = 0
        self.written = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller side
    def put(self, item, nbytes: int = 0, drop_payload: Callable[[Any], Any] | None = None) -> bool:
        """Queue ``item`` whose payload holds ``nbytes``. Returns False if its payload was dropped.

        Raises:
            WriterClosedError: after close().
            WriterError: the writer thread failed (raised once; later calls pass).
        """
        with self._cv:
            if self._closing or self._closed:
                raise WriterClosedError("the writer is closed")
            self._raise_pending()
            kept = True
            if nbytes > 0 and self._full(nbytes):
                if self.on_full == "drop" and drop_payload is not None:
                    item = drop_payload(item)
                    nbytes, kept = 0, False
                    self.dropped += 1
                else:
                    self._urgent += 1
                    self._cv.notify_all()
                    try:
                        while self._full(nbytes) and self.error is None and not self._closing:
                            self._cv.wait()
                    finally:
                        self._urgent -= 1
                    self._raise_pending()
            self._q.append((item, nbytes))
            if nbytes:
                self._items += 1
                self._bytes += nbytes
            if len(self._q) == 1 or len(self._q) >= self._wake_at or (nbytes and self._bytes >= self._wake_bytes):
                self._cv.notify_all()  # first item: start the batch_wait clock; full batch: write now
            return kept

    def _batch_bounds(self, room: tuple[int, int] | None = None) -> tuple[int, float]:
        """(items, payload bytes) at which a batch is written at once: ``batch_items`` (no bytes bound);
        items held for the live shard's deadline (``room``: the steps and bytes it still takes, from
        ``sink.room()``) also when they fill that room or half the queue (a producer never waits for
        a held batch)."""
        if room is None:
            return self.batch_items, float("inf")
        items = max(1, min(self.batch_items, self.max_items // 2, room[0]))
        return items, float(max(1, min(self.max_bytes // 2, room[1])))

    def _hold(self, deadline: float | None) -> bool:
        """Whether the queued items may wait for the live shard's deadline rather than ``batch_wait``
        (writer thread, under the lock): the shard holds steps (``deadline`` is not None), and they
        fit in it. They then reach a closed shard no later than they would have after ``batch_wait``
        (the shard closes at its deadline whatever is written into it). The wake-up bounds are set
        so that a producer filling the shard's room wakes the writer (queued items that already fill
        it are written at once)."""
        room_of = getattr(self.sink, "room", None)
        room = self._safe(room_of) if room_of is not None and deadline is not None else None
        self._wake_at, self._wake_bytes = self._batch_bounds(room)
        if room is None:
            return False
        return len(self._q) < self._wake_at and self._bytes < self._wake_bytes

    def _full(self, nbytes: int) -> bool:
        if self._items == 0:
            return False  # one item always fits, however large
        return self._items + 1 > self.max_items or self._bytes + nbytes > self.max_bytes

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is written and the live shard is published.

        Returns False on timeout. Raises WriterError if the writer failed.
        """
        return self._wait_written(timeout, publish=True)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is written into the live shard (no shard is closed, nothing
        is synced to the disk: what a running job's writer does between shard closes).

        Returns False on timeout. Raises WriterError if the writer failed.
        """
        return self._wait_written(timeout, publish=False)

    def _wait_written(self, timeout: float | None, publish: bool) -> bool:
        with self._cv:
            if self._closed:
                return True
            self._raise_pending()
            if publish:
                self._q.append((_FLUSH, 0))
            self._urgent += 1          # write now: no waiting for a full batch
            self._cv.notify_all()
            try:
                ok = self._cv.wait_for(lambda: (not self._q and not self._busy) or self.error is not None,
                                       timeout=timeout)
            finally:
                self._urgent -= 1
            self._raise_pending()
            return ok

    def close(self, status: str = fmt.STATUS_COMPLETE, raise_error: bool = True) -> None:
        """Write what is queued, close the live shard, mark the rank's status. Idempotent."""
        with self._cv:
            if self._closed or self._closing:
                return
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        with self._cv:
            self._closed = True
        if self.error is None:
            try:
                self.sink.close(status)
            except BaseException as e:  # noqa: BLE001 - surfaced below
                self.set_error(e)
        else:
            try:
                self.sink.close(fmt.STATUS_FAILED)
            except BaseException:
                pass
        if raise_error:
            with self._cv:
                self._raise_pending()

    @property
    def closed(self) -> bool:
        return self._closed

    def _raise_pending(self) -> None:
        if self.error is not None and not getattr(self, "_raised", False):
            self._raised = True
            raise WriterError(f"bbdecoder writer failed: {describe_error(self.error)}") \
                from self.error

    def take_error(self) -> BaseException | None:
        """The writer's error if not yet surfaced (marks it surfaced), else None."""
        with self._cv:
            if self.error is not None and not getattr(self, "_raised", False):
                self._raised = True
                return self.error
            return None

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closing:
                    if self._q and (len(self._q) >= self._wake_at or self._bytes >= self._wake_bytes
                                    or self._urgent or self.error is not None):
                        break
                    deadline = self._safe(self.sink.time_to_deadline) if self.error is None else None
                    if self._q and self._hold(deadline):
                        timeout = deadline   # written with the next ones, before the shard closes
                    else:
                        timeout = self.batch_wait if self._q else deadline
                        if self._q and deadline is not None:
                            timeout = min(timeout, deadline)
                    if self._q and (len(self._q) >= self._wake_at or self._bytes >= self._wake_bytes):
                        break
                    if timeout is not None and timeout <= 0:
                        break
                    if not self._cv.wait(timeout=timeout) and timeout is not None:
                        break  # timed out: write what is queued, or close a shard whose time is up
                if not self._q and self._closing:
                    return
                batch = []
                while self._q:
                    batch.append(self._q.popleft())
                    if len(batch) >= 256:
                        break
                self._busy = True
            try:
                if self.error is None:
                    self._process(batch)
            except BaseException as e:  # noqa: BLE001 - kept and re-raised in the caller
                try:  # first: publish or delete the live shard (frees space on a full disk) ...
                    self.sink.abandon_live()
                except BaseException:
                    pass
                self.set_error(e)  # ... then rank.json says "failed" with the final counts
            finally:
                with self._cv:
                    for _, nb in batch:
                        if nb:
                            self._items -= 1
                            self._bytes -= nb
                    self._busy = False
                    self._cv.notify_all()

    def _process(self, batch) -> None:
        records = []
        for item, _ in batch:
            if item is _FLUSH:
                if records:
                    self.sink.write(records)
                    self.written += len(records)
                    records = []
                self.sink.rotate()
                wait = getattr(self.sink, "wait_synced", None)
                if wait is not None:  # flush: durable, not only visible
                    wait()
            else:
                records.append(self.resolve(item))
        if records:
            self.sink.write(records)
            self.written += len(records)
        self.sink.tick()

    def _safe(self, fn):
        try:
            return fn()
        except BaseException:
            return None

    def set_error(self, e: BaseException) -> None:
        """Fail the writer with ``e`` (kept for the caller, noted in rank.json): the writer thread's
        own errors, or one from the training side that tells the writer to stop."""
        # rank.json first, then the error becomes visible: a caller woken by it (flush) finds the
        # failure note written and no temporary file of that write still on disk.
        try:
            self.sink.record_error(describe_error(e))
        except BaseException:
            pass
        with self._cv:
            if self.error is None:
                self.error = e
                self.error_trace = "".join(traceback.format_exception(type(e), e, e.__traceback__))
            self._cv.notify_all()
