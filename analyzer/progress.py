"""The one progress protocol of the analyzer (library side; the CLI supplies a terminal bar).

A *progress factory* is a callable ``factory(label: str, total: int)`` that returns a context
manager with ``update(n: int)``: ``click.progressbar`` fits, and so does :func:`null_progress`.
Analyses take a factory and call it around long loops; they never draw anything themselves.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Protocol


class Bar(Protocol):
    """What a progress factory's context manager yields."""

    def update(self, n: int) -> None: ...


#: the type of a progress factory
Factory = Callable[[str, int], ContextManager[Bar]]


class _Null:
    def __enter__(self) -> "_Null":
        return self

    def __exit__(self, *a) -> bool:
        return False

    def update(self, n: int) -> None:
        pass


NULL = _Null()


def null_progress(label: str, total: int) -> _Null:
    """The factory that shows nothing (the default everywhere)."""
    return NULL


class silenced:
    """Context: ``obj.progress`` set to :func:`null_progress` inside the block, restored after
    (a caller with its own bars keeps an object's bars from nesting inside them)."""

    def __init__(self, obj):
        self.obj = obj

    def __enter__(self):
        self.saved = self.obj.progress
        self.obj.progress = null_progress
        return self.obj

    def __exit__(self, *a) -> bool:
        self.obj.progress = self.saved
        return False
