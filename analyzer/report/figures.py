"""Drawing the report's figures: a figure is queued as a :class:`FigureSpec` (its name, title, caption
and a ``draw()`` closure over its data) while the sections run, and all are drawn at the end, in
forked processes where that is safe (:func:`render`). Nothing here imports torch; matplotlib is
imported on the first figure."""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, NamedTuple

from ..engine import available_cpus
from . import plots

FIG_DIR = "figures"
DPI = 100

_RENDER: tuple | None = None   # (pending figures, out dir) while a fork pool draws them


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
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


def _render_one(i: int) -> str | None:
    """In a forked worker: figure ``i`` of the inherited queue."""
    pending, out = _RENDER
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return draw_and_save(pending[i], out)


def render(pending: list[FigureSpec], out: str, jobs: int, before_fork: Callable[[], None] | None = None
           ) -> tuple[list[str | None], int]:
    """Draw and save the queued figures, in ``jobs`` forked processes where that is safe (a platform
    with fork, no other thread in this process: the drawing closures and their data are inherited,
    nothing is pickled but an index and an error line), else one after the other.

    Args:
        pending: the figures, in queue order.
        out: the report directory (figures go to ``out``/figures).
        jobs: the most drawing processes; at most one per 4 figures are used.
        before_fork: called once before forking (closes open files the workers must not inherit).

    Returns:
        (errors, processes): per figure None or its error as one line, in queue order whatever the
        order they finished in; and the number of drawing processes used.
    """
    jobs = min(jobs, len(pending) // 4 or 1)
    if jobs > 1 and not fork_is_safe():
        jobs = 1
    if jobs <= 1:
        return [draw_and_save(p, out) for p in pending], jobs
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    global _RENDER
    _RENDER = (pending, out)
    if before_fork is not None:
        before_fork()
    release_free_memory()   # the workers inherit this process's pages: fewer of them
    import gc
    gc.freeze()   # the workers' collector leaves the inherited objects alone: their pages stay shared
    errors: list[str | None] = [None] * len(pending)
    try:   # the workers are forked at the first submit, before the executor starts its threads
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as ex:
            futures = {i: ex.submit(_render_one, i) for i in longest_first(pending)}
            for i, fut in futures.items():
                try:
                    errors[i] = fut.result()
                except Exception as e:  # noqa: BLE001 - a drawing process died (killed, crashed)
                    errors[i] = f"its drawing process failed: {type(e).__name__}"
    finally:
        _RENDER = None
        gc.unfreeze()
    return errors, jobs


def longest_first(pending: list[FigureSpec]) -> list[int]:
    """The order the workers take the figures in: the whole-model figures (heatmaps of every layer,
    many lines: 0.3-1 s each) before the per-layer ones (about 0.1 s each, alike), queue order within
    each, so that the small ones fill the workers' last gaps instead of a large one ending alone."""
    return sorted(range(len(pending)), key=lambda i: pending[i].layer is not None)
