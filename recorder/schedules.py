"""Schedules: callables ``step -> bool`` deciding when a raw tensor is recorded (torch-free)."""

from __future__ import annotations

import math
from typing import Callable, Iterable, Union

Schedule = Callable[[int], bool]


class every:
    """Fires at steps ``start, start + n, start + 2n, ...``; ``every(0)`` never fires."""

    def __init__(self, n: int, start: int = 0):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"every(n) needs an int n >= 0, not {n!r}")
        self.n, self.start = n, start

    def __call__(self, step: int) -> bool:
        return self.n > 0 and step >= self.start and (step - self.start) % self.n == 0

    def __repr__(self) -> str:
        return f"every({self.n})" if not self.start else f"every({self.n}, start={self.start})"


class at:
    """Fires exactly at the given steps."""

    def __init__(self, steps: Iterable[int]):
        self.steps = frozenset(int(s) for s in steps)

    def __call__(self, step: int) -> bool:
        return step in self.steps

    def __repr__(self) -> str:
        return f"at({sorted(self.steps)[:20]})"


class log_spaced:
    """Fires at 0 and at about ``per_decade`` log-spaced steps per decade: dense early, sparse late."""

    def __init__(self, per_decade: int = 10):
        if per_decade < 1:
            raise ValueError("per_decade must be >= 1")
        self.per_decade = per_decade

    def __call__(self, step: int) -> bool:
        if step < self.per_decade:
            return True
        a = math.floor(self.per_decade * math.log10(step))
        b = math.floor(self.per_decade * math.log10(step + 1))
        return b > a

    def __repr__(self) -> str:
        return f"log_spaced({self.per_decade})"


def as_schedule(x: Union[int, Schedule, None]) -> Schedule:
    """An int n means every n steps (0 or None: off); a callable is used as it is."""
    if x is None:
        return every(0)
    if isinstance(x, bool):
        raise ValueError(f"a schedule is an int or a callable step -> bool, not {x!r}")
    if isinstance(x, int):
        return every(x)
    if callable(x):
        return x
    raise ValueError(f"a schedule is an int or a callable step -> bool, not {x!r}")
