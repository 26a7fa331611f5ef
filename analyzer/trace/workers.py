"""Running parts of one job in forked worker processes, where that is safe (stdlib only).

:func:`run_split` calls ``fn(part)`` for every part: the first in this process, the others each in
a process forked from it (the function, the run's index and the verdicts of :mod:`.h5read` are
inherited, nothing is pickled but the results), and returns the results in the order of the
parts. Errors are raised in the same order (the first part's first), so a job split this way
fails as the same job done in one process does. Where forking is not safe (no ``fork`` on the
platform, other threads running, one CPU) every part runs here, one after the other.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from typing import Any, Callable

#: Most worker processes (besides this one) a split job uses. Each worker adds about 50 MB (its
#: read blocks and temporaries; the data it accumulates is its share of the whole) to the job's
#: memory: one keeps the out-of-core report of the 2.2 GB bench trace under 600 MB in all.
MAX_WORKERS = 1


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def fork_is_safe() -> bool:
    """fork() copies only the calling thread: safe only where fork exists and no other thread runs
    (a dask client's or a progress bar's might hold a lock the child needs)."""
    import multiprocessing as mp
    return "fork" in mp.get_all_start_methods() and threading.active_count() == 1


def parts_wanted(limit: int | None = None) -> int:
    """How many parts to split a job into: the CPUs available (at most ``MAX_WORKERS`` + 1 and
    ``limit``), 1 where forking is not safe."""
    n = min(available_cpus(), MAX_WORKERS + 1, limit or MAX_WORKERS + 1)
    return n if n > 1 and fork_is_safe() else 1


_MEANWHILE: list[Callable[[], None]] = []


@contextmanager
def meanwhile(work: Callable[[], None]):
    """Within the block, the next :func:`run_split` that forks workers calls ``work()`` in this process
    once they are started, before its own part: CPU work (loading a plotting library) done while the
    workers read the disk, instead of after the job. Work done ahead, never the job's own: not called
    when no job in the block forks, and an error it raises is not the job's; the caller does the work
    itself when it needs it (``work`` must allow being called again) and meets such an error there."""
    _MEANWHILE[:] = [work]
    try:
        yield
    finally:
        _MEANWHILE.clear()


def _ahead(work: Callable[[], None]) -> None:
    """Call the work of :func:`meanwhile`; its error is left to the caller's own call of it."""
    try:
        work()
    except Exception:   # noqa: BLE001 - work done ahead: the caller does it again where it needs it
        pass


def _child(fn: Callable, part: Any, conn) -> None:
    """In a forked worker (multiprocessing ends it without running the parent's exit handlers or
    closing the files it inherited)."""
    try:
        out = ("ok", fn(part))
    except BaseException as e:   # noqa: BLE001 - handed to the parent, raised there
        out = ("err", e)
    try:
        conn.send(out)
    except Exception as e:   # an unpicklable result or error: say what it was
        conn.send(("err", RuntimeError(f"a worker's result could not be sent: {type(e).__name__}: {e}")))
    conn.close()


def run_split(fn: Callable[[Any], Any], parts: list, before_fork: Callable[[], None] | None = None) -> list:
    """``[fn(p) for p in parts]``, the parts after the first each in a forked process.

    Args:
        fn: the work on one part (called in this process for ``parts[0]``); its result is pickled
            back from the workers. parts: the parts (at least one).
        before_fork: called once before forking (close files a child must not share).

    Raises:
        whatever ``fn`` raised, for the first part (in order) that failed; RuntimeError when a
        worker died without an answer.
    """
    if len(parts) <= 1 or not fork_is_safe():
        return [fn(p) for p in parts]
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    if before_fork is not None:
        before_fork()
    procs = []
    try:
        for p in parts[1:]:
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(fn, p, send), daemon=True)
            proc.start()
            send.close()
            procs.append((proc, recv))
        results: list = []
        first_error = None
        try:
            if _MEANWHILE:
                _ahead(_MEANWHILE.pop())
            results.append(fn(parts[0]))
        except BaseException as e:   # noqa: BLE001 - raised after the workers are reaped
            first_error = e
        for proc, recv in procs:
            try:
                status, val = recv.recv()
            except (EOFError, OSError):
                status, val = "err", RuntimeError(f"a worker process died (exit code {proc.exitcode})")
            if status == "err" and first_error is None:
                first_error = val
            results.append(val)
        if first_error is not None:
            raise first_error
        return results
    finally:
        for proc, recv in procs:
            recv.close()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
