"""Giving freed memory back to the operating system (issue 16: the memory of reading a trace of
100,000 layers). glibc keeps the heap that a pass's large temporaries freed (its mmap threshold
grows with every large block freed, so later blocks come from a heap it does not shrink): the
analyzer's peak memory then counts every pass's garbage. Both functions are no-ops where glibc's
``mallopt``/``malloc_trim`` are not available (macOS, musl, Windows)."""

from __future__ import annotations

import ctypes
import ctypes.util

#: Blocks of at least this many bytes are mapped on their own and unmapped when freed (glibc's
#: M_MMAP_THRESHOLD; fixed, so that it no longer grows to 32 MiB with every large block freed).
MMAP_THRESHOLD = 1 << 20
#: The catalogue sets :data:`MMAP_THRESHOLD` (:func:`return_large_blocks`) for runs of at least this many
#: layers only: there the frames of millions of rows dominate memory; below it the passes' large
#: temporaries (blocks of raw tensors, their float64 pieces) are reused from the heap, and mapping each
#: one anew (page faults on every block) doubled the CPU of the out-of-core gradient pass.
MANY_LAYERS = 10_000
_M_MMAP_THRESHOLD = -3

_state: dict = {}


def _libc():
    if "libc" not in _state:
        lib = None
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.mallopt, lib.malloc_trim   # noqa: B018 - glibc only
        except (OSError, AttributeError, TypeError):
            lib = None
        _state["libc"] = lib
    return _state["libc"]


def return_large_blocks() -> bool:
    """Make blocks of :data:`MMAP_THRESHOLD` bytes or more (numpy arrays of a pass: columns of a
    table, blocks read) go back to the OS as soon as they are freed. Process-wide, set once;
    returns whether it took effect."""
    if "mmap" not in _state:
        lib = _libc()
        _state["mmap"] = bool(lib is not None and lib.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)
    return _state["mmap"]


def trim() -> None:
    """Hand the free heap back to the OS now (glibc ``malloc_trim(0)``): at the end of a pass whose
    temporaries were small blocks (Python objects, short arrays)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
