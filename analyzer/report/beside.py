"""The report's sections that need neither the gradient nor the weight frames (activations, attention,
modules), run in a process forked before the data passes (:func:`start`), so that they compute and
draw on one CPU while the gradient pass reads the disk on the others; their tables, skipped items,
figures and summary parts are taken into the report at the place the sections have in
:data:`analyzer.report.sections.SECTIONS` (:meth:`Beside.join`), so that the report reads the same
whether they ran beside or in line. Where forking is not safe, or the process fails, the sections run
in the report's own process as before."""

from __future__ import annotations

import warnings
from typing import Any

from .. import heap
from ..progress import null_progress
from ..trace.workers import available_cpus, fork_is_safe
from .figures import Drawing, FigureSpec
from .sections import activations, attention, modules

#: the sections that may run beside the data passes (they read no ``rep.data``)
SECTIONS = (activations, attention, modules)
#: CPUs needed to run them beside: the gradient pass already keeps two busy (this process and one
#: worker); on 2 CPUs a third process gained 0.2 s of a 16 s report (2.3 GB bench trace) and cost
#: about 150 MB, which took the report past its 600 MB budget
MIN_CPUS = 3


class Beside:
    """A forked process running :data:`SECTIONS` for a report (see :func:`start`)."""

    def __init__(self, proc, conn):
        self.proc, self.conn = proc, conn

    def join(self, rep) -> bool:
        """Wait for the process and take its results into ``rep``: tables, skipped items, items not
        recorded and summary parts appended, its figures (drawn, or with their errors) queued at this
        point of ``rep``'s queue, its warnings raised again here. False (nothing taken) when the process
        ended without an answer."""
        try:
            res = self.conn.recv()
        except (EOFError, OSError):
            res = None
        self.conn.close()
        self.proc.join()
        if res is None:
            return False
        rep.tables += res["tables"]
        rep.skipped += res["skipped"]
        rep.not_recorded += res["not_recorded"]
        for k, v in res["extra"].items():
            rep.extra.setdefault(k, v)
        for spec, err in res["figures"]:
            rep.drawing.add_drawn(FigureSpec(*spec), err)
        for msg in res["warnings"]:
            warnings.warn(msg, stacklevel=3)
        return True


def start(rep) -> Beside | None:
    """Fork a process that runs :data:`SECTIONS` for ``rep`` (before ``rep.data`` exists) and draws
    their figures; None where that is not possible or would not pay (fewer than :data:`MIN_CPUS` CPUs
    or ``jobs``, another thread running). The run's open files are closed first (both processes reopen what they read)."""
    if rep.jobs <= 2 or available_cpus() < MIN_CPUS or not fork_is_safe():
        return None
    import gc
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    from . import plots
    plots.warm_up()   # matplotlib loaded once, here: this process and every drawing process inherit it
    rep.run.close()
    gc.freeze()   # neither collector touches the objects alive now: their pages stay shared (the report
    #               unfreezes them once every process it forked has ended)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(rep, send), daemon=True)
    proc.start()
    send.close()
    return Beside(proc, recv)


def _child(rep, conn) -> None:
    """In the forked process: run the sections into empty lists, draw their figures here, send it all."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep.tables, rep.skipped, rep.not_recorded, rep.extra = [], [], [], {}
        rep.progress = null_progress
        rep.drawing = Drawing(rep.out, 1)
        for section in SECTIONS:
            rep.add_section(section, draw_meanwhile=False)
            heap.trim()   # the section's temporaries go back to the OS: this process runs beside two others
        errors = rep.drawing.finish()
    figures: list[tuple[Any, str | None]] = [
        ((s.name, s.title, s.caption_html, None, s.section, s.layer, s.areas), e)
        for s, e in zip(rep.drawing.specs, errors)]
    conn.send({"tables": rep.tables, "skipped": rep.skipped, "not_recorded": rep.not_recorded,
               "extra": rep.extra, "figures": figures, "warnings": [str(w.message) for w in caught]})
    conn.close()
