"""A byte budget for the raw activation samples (``Recorder(activation_sample_bytes=...)``).

Without a budget a capture step copies the first K inputs (``activation_samples``, default 8) of every
site: a 7B transformer's (heads, T, T) attention probabilities alone make that some 600 GB per capture
step and rank. With a budget of B bytes per capture step and rank the recorder stores at most B bytes of
``/activations`` payloads (float32 values and one int64 step per row) at each step where the raw
schedule fires:

1. **Sharing** (:func:`allocate`): the sites share B by max-min fairness (water filling): in the order of
   their full cost (K rows of the whole output; ties: the order sites were first seen), each site gets
   at most ``what is left / sites left``. Sites that fit their share keep everything, and what they leave
   goes to the larger ones. When every site fits, every site keeps exactly what it stores without a
   budget (same tensors, same bytes): the reference CNN and small transformers are unchanged.
2. **Fewer samples** (:func:`site_plan`): a site over its share keeps the first ``rows < K`` inputs.
3. **Fewer positions**: when one whole input is over the share, one input is kept, strided along the
   axes other than the unit axis: on each such axis the positions ``n-1, n-1-s, n-1-2s, ...`` (the last
   position always, which in a causal model sees the whole context), with power-of-two strides ``s``.
   The axis with the most kept positions is halved first; a softmax's own axis (the probabilities of one
   row) only when every other axis is down to one position, so that attention rows stay whole where
   possible. The unit axis is never cut. A site whose one position per axis does not fit keeps nothing.

The plan is a function of host-side ints only (shapes, K, B): no device synchronisation, no loop over
elements (at most a few dozen halvings per site, once). It is fixed per site for the run and recorded
in the site's manifest entry (``sample_rows``, ``output_shape``, ``sample_stride``, with
``sample_shape`` the stored row shape: docs/trace-format.md), so the analyzer knows which positions it
reads (:func:`analyzer.trace.format.sample_positions`). It is made at the first step that holds
samples (every site seen so far known); the samples of that step were taken with a provisional plan
of at most B bytes per site and are cut to the final plan then (power-of-two strides nest, so the cut
is a slice of what was kept). A site first seen later is planned at once with what is left of B.

Default ``DEFAULT_SAMPLE_BYTES`` = 32 MiB: about 7 times what the reference CNN stores per capture step
at defaults (4.7 MB), so small models keep every sample; amortised over ``activations_every=50`` it is
at most 0.67 MB per step and rank, under the 1 MiB per step that ``activation_budget`` gives the
per-unit statistics, so raw samples never dominate a trace; and a small part of the writer queue
(512 MiB) and of device memory.
"""

from __future__ import annotations

import math

__all__ = ["SampleBudget", "site_plan", "allocate", "plan_bytes", "kept_shape", "selector", "sample_rows_bytes",
           "DEFAULT_SAMPLE_BYTES", "VALUE_ITEMSIZE", "STEP_ITEMSIZE"]

#: default bytes of raw activation samples per capture step and rank
DEFAULT_SAMPLE_BYTES = 32 << 20
#: stored bytes of one sample value (float32) and of the int64 step of each stored row
VALUE_ITEMSIZE = 4
STEP_ITEMSIZE = 8


def sample_rows_bytes(rows: int, shape) -> int:
    """Stored bytes of ``rows`` sample rows of shape ``shape`` (float32 values + an int64 step each)."""
    return rows * (math.prod(shape) * VALUE_ITEMSIZE + STEP_ITEMSIZE)


def kept_shape(shape, strides) -> list[int]:
    """The stored row shape: ``ceil(n / s)`` positions per axis of ``shape`` (one input, no batch axis)."""
    return [-(-n // s) for n, s in zip(shape, strides)]


def plan_bytes(shape, plan) -> int:
    """Stored bytes per capture step of a site of output shape ``shape`` under ``plan`` (rows, strides)."""
    rows, strides = plan
    return sample_rows_bytes(rows, kept_shape(shape, strides))


def site_plan(shape, unit_axis: int | None, softmax_axis: int | None, k: int, allowance: int
              ) -> tuple[int, tuple[int, ...]]:
    """The rows and per-axis strides that keep one site's samples under ``allowance`` bytes.

    Args:
        shape: one input's output shape (no batch axis).
        unit_axis: the unit axis among ``shape``'s axes (never cut); None: none of them.
        softmax_axis: a softmax's own axis among ``shape``'s axes (cut last); None: none.
        k: the most rows wanted (``activation_samples``, at most the batch).
        allowance: bytes.

    Returns:
        ``(rows, strides)``: ``rows`` in ``[0, k]`` first inputs, each strided by ``strides`` (powers of 2;
        all 1 when ``rows > 1``). ``rows == 0``: nothing fits.
    """
    ones = (1,) * len(shape)
    if k <= 0:
        return 0, ones
    row = sample_rows_bytes(1, shape)
    if k * row <= allowance or row <= allowance:
        return min(k, allowance // row), ones
    strides, counts = [1] * len(shape), list(shape)
    others = [a for a in range(len(shape)) if a not in (unit_axis, softmax_axis)]
    last = [softmax_axis] if softmax_axis is not None and softmax_axis != unit_axis else []
    for phase in (others, last):
        while sample_rows_bytes(1, counts) > allowance:
            cand = [a for a in phase if counts[a] > 1]
            if not cand:
                break
            a = max(cand, key=lambda i: counts[i])   # the most positions; ties: the first such axis
            strides[a] *= 2
            counts[a] = -(-shape[a] // strides[a])
        else:
            return 1, tuple(strides)
    return 0, ones


def _axes(meta: dict) -> tuple[int | None, int | None]:
    """(unit axis, softmax axis) of a site among its sample axes (output axes without the batch axis)."""
    nd = len(meta.get("output_shape", meta["sample_shape"]))
    ua = meta.get("unit_axis", 1) - 1
    sd = meta.get("softmax_dim")
    sa = sd - 1 if isinstance(sd, int) and 1 <= sd <= nd else None
    return (ua if 0 <= ua < nd else None), sa


def allocate(metas: list[dict], k, budget: int) -> dict[str, tuple[int, tuple[int, ...]]]:
    """``{site key: (rows, strides)}`` sharing ``budget`` bytes among the sites (manifest entries) by
    max-min fairness; ``k``: the most rows per site, an int or ``{key: int}``."""
    ks = {S["key"]: (k.get(S["key"], 0) if isinstance(k, dict) else k) for S in metas}
    full = {S["key"]: tuple(S.get("output_shape", S["sample_shape"])) for S in metas}
    order = sorted(range(len(metas)), key=lambda i: (sample_rows_bytes(ks[metas[i]["key"]], full[metas[i]["key"]]), i))
    left, plans = budget, {}
    for j, i in enumerate(order):
        S = metas[i]
        key = S["key"]
        plans[key] = site_plan(full[key], *_axes(S), ks[key], left // (len(order) - j))
        left -= plan_bytes(full[key], plans[key])
    return plans


def selector(shape, plan) -> tuple:
    """The basic-slicing index of a batch ``(B, *shape)`` that keeps ``plan``'s rows and positions."""
    rows, strides = plan
    return (slice(0, rows),) + tuple(slice((n - 1) % s if n else 0, None, s) for n, s in zip(shape, strides))


class SampleBudget:
    """The raw-sample plans of one recorder (see the module docstring).

    Args:
        samples: K, the most raw samples per site and capture step (``activation_samples``).
        budget: bytes per capture step and rank, or None (no budget: K samples of every site).

    Raises:
        ValueError: ``samples`` is not an int >= 0 or ``budget`` not None or an int >= 1.
    """

    def __init__(self, samples: int = 0, budget: int | None = None):
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise ValueError("activation_samples must be an int >= 0")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"activation_sample_bytes must be None or an int >= 1 (bytes per capture step), "
                             f"not {budget!r}")
        self.k, self.budget = samples, budget
        self.plans: dict[str, tuple] = {}      # final plans, once resolved
        self._first: dict[str, tuple] = {}     # key -> (provisional plan, rows wanted) before then
        self.resolved = False
        self.left = budget                     # bytes not planned yet (sites first seen later)

    def capture(self, site, x) -> None:
        """At hook time: keep ``x``'s (one call of ``site``) samples under the plan in ``site.samples``."""
        meta = site.meta
        full = meta.get("output_shape", meta["sample_shape"])
        if list(x.shape[1:]) != full:   # the stored rows have one shape per site
            meta["samples_skipped"] = meta.get("samples_skipped", 0) + 1
            return
        if self.budget is None:
            site.samples.append(x[: self.k].clone())
            return
        plan = self.plans.get(meta["key"])
        if plan is None and self.resolved:   # first seen after the plan: what is left of the budget
            plan = self.plans[meta["key"]] = site_plan(full, *_axes(meta), min(self.k, x.shape[0]), self.left)
            self.left -= plan_bytes(full, plan)
            _describe(meta, plan, min(self.k, x.shape[0]))
        elif plan is None:   # before the plan: at most the whole budget (cut at resolve())
            plan = site_plan(full, *_axes(meta), min(self.k, x.shape[0]), self.budget)
            self._first[meta["key"]] = (plan, min(self.k, x.shape[0]))
        if plan[0] == 0:
            return
        if not any(s > 1 for s in plan[1]):
            site.samples.append(x[: plan[0]].clone())
        else:
            site.samples.append(x[selector(full, plan)].clone())

    def resolve(self, tracker) -> bool:
        """At a step: the final plans once a site holds samples (cutting those samples to them).
        Returns True when site entries changed (the manifest must be rewritten)."""
        if self.resolved or self.budget is None or not self.k or not any(s.samples for s in tracker.sites.values()):
            return False
        self.resolved = True
        metas = [s.meta for s in tracker.sites.values()]
        ks = {S["key"]: self._first.get(S["key"], (None, self.k))[1] for S in metas}
        self.plans = allocate(metas, ks, self.budget)
        changed = False
        for s in tracker.sites.values():
            key, full = s.meta["key"], s.meta["sample_shape"]
            plan = self.plans[key]
            self.left -= plan_bytes(full, plan)
            if s.samples and key in self._first:
                s.samples = _cut(s.samples, full, self._first[key][0], plan)
            changed = _describe(s.meta, plan, ks[key]) or changed
        self._first.clear()
        return changed


def _cut(samples: list, full, first, plan) -> list:
    """Samples taken under the provisional plan ``first``, cut to ``plan`` (strides nest: powers of 2)."""
    if plan == first:
        return samples
    if plan[0] == 0:
        return []
    idx = (slice(0, plan[0]),) + tuple(
        slice((((n - 1) % f) - ((n - 1) % p)) // p if n else 0, None, f // p)
        for n, p, f in zip(full, first[1], plan[1]))
    return [t[idx] for t in samples]


def _describe(meta: dict, plan, k: int) -> bool:
    """Record a plan that keeps less than ``k`` whole rows in the site's manifest entry; True when the
    entry changed."""
    rows, strides = plan
    if rows >= k and not any(s > 1 for s in strides):
        return False
    meta["sample_rows"] = rows
    if rows and any(s > 1 for s in strides):
        full = meta.get("output_shape", meta["sample_shape"])
        meta["output_shape"] = list(full)
        meta["sample_stride"] = list(strides)
        meta["sample_shape"] = kept_shape(full, strides)
    return True
