"""Windows of activation statistics: one row per window of N steps instead of one per step.

Per-unit activation statistics cost about 50 bytes per unit and step (60 for bounded kinds, with their
near-bound counts), so a large model's per-step rows would dominate the trace (a 7B model has some
500,000 units). With a window of N steps the tracker keeps accumulating on the device (counts, sums,
sums of |h| and h^2, count(h > 0) and near-bound counts add in place; min of the minima, max of the
maxima) and one row per
window reaches the writer, at the window's last step, with the window's first step in the scalar
``first_step`` (:data:`analyzer.trace.format.SITE_WINDOW_STAT`). Every threshold the analyzer
applies to pooled statistics (strict, APoZ and dormant dead units, saturation) stays exact.

Boundaries: a window holds ``N`` steps counted from the first recorded step, and also ends at
``epoch_end()``, ``flush()`` and ``close()`` (a partial window), so a window never spans two epochs.
To end a window at its last step after the fact, the step that may be a window's last is handed to
the writer at the next ``step()``, ``epoch_end()``, ``flush()`` or ``close()`` (one step later than
with N = 1). A window is not ended by ``flush()``/``epoch_end()`` when a training forward already ran
after the last ``step()`` (its values belong to the next step): it goes on.

``"auto"``: N is chosen once, when the first sites are known (at the first ``step()`` after a
training forward), as the smallest N whose rows stay under ``budget`` bytes per step
(:func:`row_bytes`); N = 1 (no ``first_step``) for models under the budget. Sites first seen later do
not change N.
"""

from __future__ import annotations

import math
from typing import Any

from bbdecoder.analyzer.trace import format as fmt
from .packing import pack_activations

__all__ = ["ActivationWindow", "row_bytes", "site_row_bytes", "check_window", "STAT_ITEMSIZE", "STAT_ITEMSIZES",
           "STEP_ITEMSIZE"]

#: bytes of one stored value of an activation statistic (float64) and of its row's step (int64)
STAT_ITEMSIZE = 8
STEP_ITEMSIZE = 8
#: statistics stored in another dtype: the near-bound counts of bounded kinds (int32)
STAT_ITEMSIZES = {"near": 4}


def site_row_bytes(stats: dict) -> int:
    """Bytes of values one row of one site adds to a shard: every statistic ``{name: shape}`` (as in the
    manifest's ``sites[].stats``) stores its values (float64; int32 near-bound counts) in the step's flat
    rows (``/flat/act_stats``); the row's step is counted once per row by :func:`row_bytes`."""
    return sum(math.prod(shp) * STAT_ITEMSIZES.get(k, STAT_ITEMSIZE) for k, shp in stats.items())


def row_bytes(sites: list[dict], window: bool = False) -> int:
    """Bytes of one row of every site (manifest site entries); ``window``: with ``first_step``. The
    statistics of a step are stored flat, one row per dtype (float64, and int32 when a site has
    near-bound counts), each row with one int64 step."""
    if not sites:
        return 0
    values = sum(site_row_bytes(S["stats"]) + (STAT_ITEMSIZE if window and fmt.SITE_WINDOW_STAT not in S["stats"]
                                               else 0) for S in sites)
    dtypes = 1 + any(k in STAT_ITEMSIZES for S in sites for k in S["stats"])
    return values + dtypes * STEP_ITEMSIZE


def check_window(window: Any, budget: Any) -> None:
    """ValueError unless ``window`` is "auto" or an int >= 1 and ``budget`` an int >= 1."""
    if not (window == "auto" or (isinstance(window, int) and not isinstance(window, bool) and window >= 1)):
        raise ValueError(f"activation_window must be 'auto' or an int >= 1, not {window!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"activation_budget must be an int >= 1 (bytes per step), not {budget!r}")


class ActivationWindow:
    """The window state of one recorder's activation statistics.

    Args:
        window: "auto" or N >= 1.
        budget: bytes per step that "auto" keeps the activation statistics under.
    """

    def __init__(self, window: Any = "auto", budget: int = 1 << 20):
        check_window(window, budget)
        self.setting, self.budget = window, budget
        #: steps per window once known (None: "auto" before the first sites)
        self.n: int | None = window if isinstance(window, int) else None
        self.first: int | None = None   # first step of the open window
        self.len = 0                    # steps in the open window
        self.forwards = -1              # the tracker's forward count at the last step
        #: True when the sites' declared statistics changed (the manifest must be rewritten)
        self.changed = False

    def choose(self, sites: list[dict]) -> int:
        """N for ``sites`` under the budget: 1 when one row fits, else ceil(row bytes / budget)."""
        if self.n is not None:
            return self.n
        if row_bytes(sites) <= self.budget:
            return 1
        return max(2, math.ceil(row_bytes(sites, window=True) / self.budget))

    def _resolve(self, tracker) -> None:
        if self.n is None and tracker.sites:
            self.n = self.choose([s.meta for s in tracker.sites.values()])
        if self.n is not None and self.n > 1 and tracker.window != self.n:
            tracker.window = self.n
            for site in tracker.sites.values():
                site.meta["stats"][fmt.SITE_WINDOW_STAT] = []
            self.changed = True

    def pack(self, p, tracker, raw_schedule, s: int) -> bool:
        """Step ``s``: raw samples into ``p``, and the window's statistics when it ends at ``s``.
        Returns True when ``p`` must be held back (its window goes on: :meth:`end` may end it)."""
        self._resolve(tracker)
        self.forwards = tracker.forwards
        if self.n is None or self.n == 1:
            pack_activations(p, tracker, raw_schedule, s)
            return False
        if self.first is None:
            self.first = s
        self.len += 1
        full = self.len >= self.n
        pack_activations(p, tracker, raw_schedule, s, with_stats=full, first_step=self.first)
        if full:
            self.first, self.len = None, 0
        return not full

    def end(self, p, tracker, raw_schedule) -> None:
        """End the open window at ``p``'s step (held back by :meth:`pack`): its statistics into ``p``.
        Nothing when a training forward ran since that step (the window goes on)."""
        if not self.len or tracker.forwards != self.forwards:
            return
        pack_activations(p, tracker, raw_schedule, p.step, first_step=self.first)
        self.first, self.len = None, 0
