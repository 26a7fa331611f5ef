"""Drawing the report's figures: a figure is queued as a :class:`FigureSpec` (its name, title, caption
and a ``draw()`` closure over its data) while the sections run, and drawn by forked processes that
take the queued figures from one shared counter (:class:`Drawing`): one process starts drawing while
the later sections still compute, the others join at the end. Nothing here imports torch;
matplotlib is imported on the first figure."""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, NamedTuple

from .. import heap
from ..engine import available_cpus
from . import plots

FIG_DIR = "figures"
DPI = 100

class FigureSpec(NamedTuple):
    """One queued figure of the report.

    Attributes:
        name: file stem: the figure is saved as ``figures/<name>.png``.
        title: the figure's title (plain text; escaped in the HTML).
        caption_html: the caption, HTML built from escaped parts by the section.
        draw: ``draw()`` -> the matplotlib figure (drawn in a worker process or in this one).
        section: the HTML group the figure goes to ("loss", "gradients", ..., "layers").
        layer: the layer record (a row of the layer table) of a per-layer figure, else None.
        areas: tooltip areas over the picture (see :func:`analyzer.report.tooltips.areas_html`), or ().
    """

    name: str
    title: str
    caption_html: str
    draw: Callable[[], Any]
    section: str
    layer: Any = None
    areas: tuple = ()


def default_jobs() -> int:
    """Processes that draw the report's figures: the CPUs this process may use, at most 4 (each
    drawing process adds memory of its own: about 20 MB in the out-of-core benchmark)."""
    return max(1, min(4, available_cpus()))


def fork_is_safe() -> bool:
    """fork() copies only the calling thread: safe here only without other threads (a dask client's,
    a progress bar's) that might hold a lock the child needs, and only where fork exists."""
    import multiprocessing as mp
    import threading
    return "fork" in mp.get_all_start_methods() and threading.active_count() == 1


def release_free_memory() -> None:
    """Hand the heap that the data passes freed back to the OS (glibc keeps it otherwise), before
    forking the figure workers; a no-op where glibc's malloc_trim is not available."""
    import gc
    gc.collect()
    heap.trim()


def draw_and_save(spec: FigureSpec, out: str) -> str | None:
    """Draw one queued figure and save it under ``out``/figures; None, or the error as one line."""
    plt, _ = plots.mpl()
    before = set(plt.get_fignums())
    try:
        plots.save(spec.draw(), os.path.join(out, FIG_DIR, f"{spec.name}.png"), dpi=DPI)
        return None
    except Exception as e:  # noqa: BLE001 - one figure that cannot be drawn must not lose the report
        for n in set(plt.get_fignums()) - before:
            plt.close(n)
        return f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"


#: the end of the shared queue before :meth:`Drawing.finish` knows the last figure (no figure's index reaches it)
OPEN_END = 2 ** 62


def _claim(queue, known: int, back: bool = False) -> int | None:
    """Take the next figure index from the shared ``queue`` (``[front, end]``: the figures from ``front`` to
    ``end`` - 1 are not taken yet): from the front, below ``known`` (the figures the caller knows), or with
    ``back`` from the end; None when nothing is left for the caller."""
    with queue.get_lock():
        front, end = queue[0], queue[1]
        if back:
            if end - 1 < front:
                return None
            queue[1] = end - 1
            return end - 1
        if front >= min(known, end):
            return None
        queue[0] = front + 1
        return front


def _draw_claimed(specs: list[FigureSpec], n: int, queue, out: str, done: Callable[[int, Any], None],
                  back: bool = False) -> None:
    """Draw the figures of ``specs[:n]`` taken from ``queue`` (from its end with ``back``) until none is
    left (those drawn elsewhere already, ``draw`` None, are skipped); ``done(index, error or None)`` after each."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while (i := _claim(queue, n, back)) is not None:
            if specs[i].draw is not None:
                done(i, draw_and_save(specs[i], out))


def _claim_and_draw(specs: list[FigureSpec], n: int, queue, out: str, conn, back: bool = False) -> None:
    """In a forked process: :func:`_draw_claimed`, each answer sent at once (a crash loses one figure only)."""
    _draw_claimed(specs, n, queue, out, lambda i, err: conn.send((i, err)), back)
    conn.close()


class Drawing:
    """The queued figures of one report and the processes that draw them.

    Where forking is safe and ``jobs`` > 1, the figures are drawn by processes forked from this one
    (the drawing closures and their data are inherited, nothing is pickled but an index and an error
    line), each taking the next undrawn figure from one shared queue: :meth:`meanwhile` (called
    between sections) keeps one process drawing the figures queued so far, from the front, while this
    process computes the next sections; :meth:`finish` adds processes for the rest and waits for all.
    The first of those takes figures from the back of the queue: the figures queued last, which only
    it knows, are drawn while the earlier processes still draw theirs (not by one process after the
    others ended).
    Otherwise :meth:`finish` draws every figure here, one after the other.

    Attributes:
        specs: the queued figures, in queue order. processes: the most processes that drew at once (one
        forked earlier that finishes its last figure may make it ``jobs`` + 1).
    """

    def __init__(self, out: str, jobs: int):
        self.out = out
        self.jobs = max(1, int(jobs))
        self.specs: list[FigureSpec] = []
        self.processes = 1
        self._queue = None          # the shared [front, end] of the figures not taken, once a process was forked
        self._known = 0             # figures queued when the last process was forked
        self._running: list = []    # [(process, connection, figures it knows)]
        self._errors: dict[int, str | None] = {}
        self._held = False          # meanwhile() forks nothing (see hold())

    def add(self, spec: FigureSpec) -> None:
        """Queue a figure."""
        self.specs.append(spec)

    def add_drawn(self, spec: FigureSpec, error: str | None) -> None:
        """Queue a figure another process has drawn already (``spec.draw`` None), with its error or None."""
        self._errors[len(self.specs)] = error
        self.specs.append(spec._replace(draw=None))

    def _parallel(self) -> bool:
        return self.jobs > 1 and available_cpus() > 1 and fork_is_safe()

    def _front(self) -> int:
        return self._queue[0] if self._queue is not None else 0

    def _unclaimed(self) -> int:
        if self._queue is None:
            return len(self.specs)
        return max(0, min(len(self.specs), self._queue[1]) - self._queue[0])

    def _reap(self, block: bool = False) -> None:
        """Collect the answers of the drawing processes (all of them, waiting, when ``block``)."""
        still = []
        for proc, conn, n in self._running:
            while block or conn.poll():
                try:
                    i, err = conn.recv()
                except (EOFError, OSError):   # ended: every answer read
                    conn.close()
                    proc.join()
                    break
                self._errors[i] = err
            else:
                still.append((proc, conn, n))
        self._running = still

    def _fork(self, n: int, last: bool = False) -> None:
        """Fork ``n`` drawing processes over the figures queued so far; ``last`` (:meth:`finish`: nothing
        is queued after them): the queue's end is fixed and the first of them takes from the back."""
        if n <= 0:
            return
        import multiprocessing as mp
        ctx = mp.get_context("fork")
        if self._queue is None:
            plots.warm_up()     # matplotlib and its fonts loaded once, here, not in every process
            self._queue = ctx.Array("q", [0, OPEN_END])
        if last:
            self._queue[1] = min(self._queue[1], len(self.specs))   # no process has taken a figure from the back yet
        import gc
        gc.freeze()   # no collector touches the objects alive now: their pages stay shared
        for k in range(n):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_claim_and_draw, daemon=True,
                               args=(self.specs, len(self.specs), self._queue, self.out, send, last and k == 0))
            proc.start()
            send.close()
            self._running.append((proc, recv, len(self.specs)))
        self._known = len(self.specs)
        self.processes = max(self.processes, len(self._running))

    def hold(self) -> None:
        """Fork no drawing process before :meth:`finish`: for a report whose sections touch so much
        memory that a process forked beside them would hold its own copy of it (100,000 layers)."""
        self._held = True

    def meanwhile(self) -> None:
        """Between sections: when figures wait that no drawing process knows of (queued after it was
        forked) and every process is drawing its last figure or none is left, fork one over the figures
        queued so far (at most ``jobs`` at once), so that they are drawn on another CPU while this
        process computes."""
        if self._held or not self._parallel():
            return
        self._reap()
        idle = not self._running or self._front() >= self._known   # nothing left for them to take
        if self._unclaimed() > 0 and idle and len(self._running) < self.jobs:
            self._fork(1)

    def finish(self, before_fork: Callable[[], None] | None = None) -> list[str | None]:
        """Draw every figure not drawn yet and wait for all; returns each figure's error or None, in
        queue order. Processes still drawing figures they know go on; processes forked now (``jobs``
        drawing in all, at most one per 4 figures left) know every queued figure (one forked by
        :meth:`meanwhile` knows only the figures queued before it, and ends when those are taken).
        This process draws only what no process took (they died): a figure that kills its process
        (a crash in a plotting library) loses that figure, never the report.

        Args:
            before_fork: called once before forking (closes open files the workers must not inherit).
        """
        if self._queue is None:
            new = min(self.jobs, len(self.specs) // 4 or 1)
            if new <= 1 or not self._parallel():   # one process: every figure here
                return [self._errors.get(i) if sp.draw is None else draw_and_save(sp, self.out)
                        for i, sp in enumerate(self.specs)]
        else:
            self._reap()
            left = self._unclaimed()
            busy = sum(n > self._front() for *_, n in self._running)   # figures they know wait
            new = min(self.jobs - busy, left // 4 or 1) if left else 0
            if left and self._known < len(self.specs):   # figures no running process knows: one at least
                new = max(new, 1)
        if new > 0 and self._parallel():
            if before_fork is not None:
                before_fork()
            release_free_memory()   # the workers inherit this process's pages: fewer of them
            self._fork(new, last=True)
        self._reap(block=True)
        self._draw_here()   # what no process took (the processes that knew them died, or none could be forked)
        import gc
        gc.unfreeze()
        return [self._errors.get(i, "its drawing process ended without drawing it") for i in range(len(self.specs))]

    def _draw_here(self) -> None:
        if self._queue is None:   # no process was forked
            for i, sp in enumerate(self.specs):
                if sp.draw is not None and i not in self._errors:
                    self._errors[i] = draw_and_save(sp, self.out)
            return
        _draw_claimed(self.specs, len(self.specs), self._queue, self.out, self._errors.__setitem__)
