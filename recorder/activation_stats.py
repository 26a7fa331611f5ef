"""The per-site statistics kernels of the activation capture: per unit and on the device.

One call of :meth:`SiteStats.stats` reduces one activation tensor to per-unit sums (count, sum,
sum |h|, sum h^2, min, max, count(h > 0), non-finite count) and, for bounded kinds, a fixed-edge
histogram; :class:`recorder.activations.ActivationTracker` adds them up over a step. Hot path: only
torch operations on the device (no ``.item()``, ``.cpu()`` or Python loops over elements; the only
Python loop walks large CPU tensors in cache-sized slabs).
"""

from __future__ import annotations

import math

import torch

from .activation_kinds import HIST_BINS

__all__ = ["Site", "SiteStats", "bin_counts"]

#: float counts (0/1 indicators summed in float32) are exact up to this many terms
_EXACT_F32 = 1 << 24


def bin_counts(idx: torch.Tensor, n: int, bincount: bool | None = None) -> torch.Tensor:
    """float64 counts of the values ``0 <= idx < n`` (1-D int64). ``torch.bincount`` on the CPU;
    elsewhere an ``index_add_`` (CUDA's bincount reads the largest index back to the host: a
    synchronisation)."""
    if bincount if bincount is not None else idx.device.type == "cpu":
        return torch.bincount(idx, minlength=n).double()
    ones = torch.ones((), dtype=torch.float64, device=idx.device).expand(idx.numel())
    return torch.zeros(n, dtype=torch.float64, device=idx.device).index_add_(0, idx, ones)


class Site:
    """Per-step accumulators of one site, kept on the device (the count is a host int: it follows
    from the shapes alone)."""

    __slots__ = ("meta", "acc", "samples", "count", "nonneg", "plan")

    def __init__(self, meta: dict, nonneg: bool = False):
        self.meta = meta
        self.acc: dict[str, torch.Tensor] | None = None
        self.samples: list[torch.Tensor] = []
        self.count = 0
        self.nonneg = nonneg
        #: CPU: the partials' buffers and their per-slab views for the last (shape, dtype) seen
        #: (reused by the next call of that shape; the returned statistics never alias them)
        self.plan: tuple | None = None

    def add(self, st: dict[str, torch.Tensor]) -> None:
        """Add one call's statistics (:meth:`SiteStats.stats`) to the accumulators, in place on the
        device (sums add, min of minima, max of maxima); the first call's tensors become them."""
        acc = self.acc
        if acc is None:   # the first call of a step (or window): its own buffers, accumulated in place
            seen: set = set()
            for k, v in st.items():
                if id(v) in seen:   # sum |h| is sum h for kinds that are never negative: one tensor
                    st[k] = v.clone()
                seen.add(id(st[k]))
            self.acc = st
            return
        for k, v in st.items():
            if k == "min":
                torch.minimum(acc[k], v, out=acc[k])
            elif k == "max":
                torch.maximum(acc[k], v, out=acc[k])
            else:
                acc[k].add_(v)


class SiteStats:
    """The statistics kernels of one tracker's sites, with the CPU scratch buffers they reuse.

    Attributes:
        chunk_bytes: CPU: bytes of one slab of rows walked by the statistics (about the L2 cache).
        floor0_kinds: kinds whose values are never negative and often exactly 0 (ReLU, ReLU6): the
            CPU fast path computes their minima afterwards, for the units that need it only.
        scratch: CPU: one reusable buffer per dtype (see :meth:`buffer`).
    """

    def __init__(self):
        self.scratch: dict = {}
        self.chunk_bytes = 2 << 20
        self.floor0_kinds = ("relu", "relu6")

    def buffer(self, like: torch.Tensor) -> torch.Tensor:
        """A scratch tensor shaped like ``like`` (contiguous). On the CPU one buffer per dtype is kept
        and reused (fresh large allocations cost page faults); elsewhere the allocator caches."""
        if like.device.type != "cpu":
            return torch.empty(like.shape, dtype=like.dtype, device=like.device)
        key = like.dtype
        n = like.numel()
        b = self.scratch.get(key)
        if b is None or b.numel() < n:
            b = self.scratch[key] = torch.empty(n, dtype=like.dtype)
        return b[:n].view(like.shape)

    def stats(self, x: torch.Tensor, axis: int, U: int, site: Site) -> dict[str, torch.Tensor]:
        """Per-unit sums of one call: float64 tensors (U,) (nonfinite: a scalar, hist: see :meth:`hist`).

        The tensor is seen as (A, U, Q) (units in the middle). A first stage reduces, in the
        tensor's own dtype, along Q (long contiguous rows) or along A (short rows: vectorised
        across U*Q) into small partials, and a second stage combines the partials in float64.
        Each partial g keeps a shift m_g, the sum e_g of (value - m_g) and the square sum q_g of
        (value - m_g); Chan et al.'s rule combines them, so sum and sum of squares are exact up
        to float32 rounding of each partial.

        Two paths per slab of rows:

        * exact (always off the CPU, where nothing may be read back to the host): m_g is the
          partial's own mean, so the variance derived later (sumsq / n - mean**2, in float64)
          keeps float32 precision even where the mean is far larger than the spread (a
          saturated tanh unit), and the finite values are counted. Four plain reductions and
          four (three for kinds that are never negative) elementwise passes.
        * fast (CPU): m_g = 0 and no count of finite values: sum, min, max, 2-norms of short
          pieces, count(h > 0) and, unless the kind is never negative, sum |h| -- six or eight
          passes instead of eleven or thirteen. Afterwards two checks on the small partials
          (a host read, free on the CPU) send a slab back through the exact path when one of
          its partials holds a non-finite value (then the exact count is needed) or has a
          spread (standard deviation) below 10% of its root mean square (below that, rounding
          of the uncentred square sum would cost more than about five float32 roundings of the
          spread).

        Sums of 0/1 indicators are exact (float64 partials from 2**24 terms on). On the CPU a
        large tensor is walked in slabs of rows so that the slab and the scratch stay in the cache.
        """
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # half / bfloat16: reduce in float32 (squares overflow float16)
        shape = x.shape
        A, Q = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
        if Q == 1 or x.is_contiguous():
            v = x.reshape(A, U, Q)
        else:
            xm = x.movedim(axis, -1)
            if xm.is_contiguous():   # channels_last: units innermost
                v = xm.reshape(-1, U, 1)
            else:
                v = x.reshape(A, U, Q)   # a copy
        A, Q = v.shape[0], v.shape[2]
        inner = Q >= 32                          # first stage along Q, else along A
        d = 2 if inner else 0
        cpu = v.device.type == "cpu"
        rows = A if not cpu else max(1, min(A, self.chunk_bytes // max(1, U * Q * v.element_size())))
        nch = -(-A // rows)
        pshape = (A, U) if inner else (nch, U, Q)
        exact = (Q if inner else rows) < _EXACT_F32   # sums of 0/1 terms stay exact in float32
        nonneg = site.nonneg
        k = 0   # square sums: 2-norms of contiguous pieces of k <= 256 values (fast)
        if inner and cpu:
            k = Q if Q <= 256 else next((c for c in (256, 192, 160, 128, 112, 100, 96, 64, 49, 32) if Q % c == 0), 0)
        names = ["sum", "csum", "shift", "n_pos", "fin"] + ([] if nonneg else ["sum_abs"]) + ([] if k else ["csq"])
        key = (v.shape, v.dtype, rows, k, nonneg)
        plan = site.plan if cpu and site.plan is not None and site.plan[0] == key else None
        if plan is None:
            part = torch.empty((len(names),) + pshape, dtype=v.dtype, device=v.device)
            cnt = None if exact else torch.empty((2,) + pshape, dtype=torch.float64, device=v.device)
            ext = torch.empty((2,) + pshape, dtype=v.dtype, device=v.device)
            nrm = torch.empty((A, U, Q // k), dtype=v.dtype, device=v.device) if k else None
            views = [None] * nch
            if cpu:   # kept for the next call of this shape (one forward after another)
                site.plan = (key, part, cnt, ext, nrm, views)
        else:
            _, part, cnt, ext, nrm, views = plan
        scratch = self.buffer(v[:rows])
        fmax = torch.finfo(v.dtype).max
        # ReLU / ReLU6: values >= 0, so a unit's minimum is 0 unless every one of its values is
        # positive: the fast path skips the min pass and computes it afterwards for those units only
        floor0 = cpu and site.meta.get("kind") in self.floor0_kinds

        def slab_views(c):
            """The outputs of slab ``c``: (row range, {partial name: view}, min view, max view)."""
            i, j = c * rows, min(A, (c + 1) * rows)
            sel = (slice(None), slice(i, j)) if inner else (slice(None), c)
            o = dict(zip(names, part[sel].unbind(0)))
            if cnt is not None:
                o["n_pos"], o["fin"] = cnt[sel].unbind(0)
            lo, hi = ext[sel].unbind(0)
            o["nrm"] = nrm[i:j] if k else None
            return i, j, o, lo, hi

        def slab(c, fast):
            sv = views[c]
            if sv is None:
                sv = views[c] = slab_views(c)
            i, j, o, lo, hi = sv
            w, b = v[i:j], scratch[: j - i]
            torch.sum(w, d, out=o["sum"])
            if not (fast and floor0):   # fast ReLU: minima 0 (set below), checked afterwards
                torch.amin(w, d, out=lo)
            torch.amax(w, d, out=hi)
            if fast:   # shift 0, shifted sum = sum and every value finite: set for all slabs below
                c_in = w
            else:
                # centred: each value minus the mean of its partial (as rounded in the tensor's dtype)
                torch.div(o["sum"], Q if inner else j - i, out=o["shift"])
                c_in = torch.sub(w, o["shift"].unsqueeze(d), out=b)
                torch.sum(c_in, d, out=o["csum"])
            if k:
                torch.linalg.vector_norm(c_in.view(j - i, U, -1, k), 2, dim=-1, out=o["nrm"])
            elif fast:
                torch.sum(torch.mul(w, w, out=b), d, out=o["csq"])
            else:
                torch.sum(c_in.mul_(c_in), d, out=o["csq"])
            # count(h > 0): for kinds that are never negative sign(h) is that indicator (0 for +-0,
            # 1 above) in half the time of a comparison; a NaN sends the slab through the exact path
            self.count(torch.sign(w, out=b) if fast and nonneg else torch.gt(w, 0, out=b), d, o["n_pos"])
            if not nonneg:
                torch.sum(torch.abs(w, out=b), d, out=o["sum_abs"])
            if fast:
                return
            if nonneg:   # values >= 0, +inf or NaN: finite <=> h <= max
                torch.le(w, fmax, out=b)
            else:        # |h| <= max is false exactly for NaN and +-inf
                b.le_(fmax)
            self.count(b, d, o["fin"])

        if floor0:
            ext[0].zero_()
        for c in range(nch):
            slab(c, cpu)
        f64 = torch.float64
        axes = (0,) if inner else (0, 2)
        n = float(A * Q)
        if inner:
            ng = float(Q)
        else:
            ng = torch.full((nch, 1, 1), float(rows), dtype=f64, device=v.device)
            ng[-1] = float(A - (nch - 1) * rows)
        redo = []
        if cpu:
            # slabs whose partials hold a non-finite value or a spread small against their size
            # go through the exact path (host reads of small tensors: free on the CPU). NaN
            # compares False, so a NaN partial fails the first test and an infinite one the second.
            S = part[0].double()
            q = nrm.double().square_().sum(2) if k else part[names.index("csq")].double()
            bad = ~(((q - S * S / ng) >= 0.01 * q) & (q < math.inf))
            if bool(bad.any()):
                hit = bad.flatten(1).any(1).nonzero().flatten().tolist()
                redo = sorted({a // rows for a in hit}) if inner else hit
        if cpu and not redo:
            # every slab took the fast path: shifts 0, every value finite, so the Chan combination
            # below reduces to plain float64 sums of the partials (sum of squares = sum of q_g)
            total = S.sum(axes)
            st = {"sum": total, "sumsq": q.sum(axes)}
            st["n_pos"] = (cnt[0] if cnt is not None else part[names.index("n_pos")]).sum(axes, dtype=f64)
            st["sum_abs"] = total if nonneg else part[names.index("sum_abs")].sum(axes, dtype=f64)
            st["nonfinite"] = torch.zeros((), dtype=f64)
        else:
            if cpu:   # the fast slabs' partials in the exact path's terms, then redo the bad slabs
                part[names.index("shift")].zero_()
                part[names.index("csum")].copy_(part[0])
                fin_p = cnt[1] if cnt is not None else part[names.index("fin")]
                if inner:
                    fin_p.fill_(Q)
                else:
                    fin_p.fill_(rows)
                    fin_p[-1].fill_(A - (nch - 1) * rows)
                for c in redo:
                    slab(c, False)
            P = {nm: part[i].double() for i, nm in enumerate(names)}
            # per partial g: shift m_g (its rounded mean, or 0), shifted sum e_g and square sum q_g
            m_g = P["shift"]
            e_g = P["csum"]
            q_g = nrm.double().square_().sum(2) if k else P["csq"]
            mean_g = m_g + e_g / ng
            M2_g = q_g - e_g * e_g / ng
            total = (mean_g * ng).sum(axes)
            mean = total / n
            M2 = M2_g.sum(axes) + (ng * (mean_g - mean.view((1, U) if inner else (1, U, 1))).square()).sum(axes)
            st = {"sum": total, "sumsq": M2 + total * mean}
            if cnt is not None:
                st["n_pos"], fin = cnt.sum(tuple(a + 1 for a in axes)).unbind(0)
            else:
                st["n_pos"], fin = P["n_pos"].sum(axes), P["fin"].sum(axes)
            st["sum_abs"] = total if nonneg else P["sum_abs"].sum(axes)
            st["nonfinite"] = n * U - fin.sum()
        st["min"] = ext[0].amin(axes).double()
        st["max"] = ext[1].amax(axes).double()
        if floor0:   # the units whose every value is positive: their true minimum (one pass over them)
            allpos = st["n_pos"] >= n
            if bool(allpos.any()):
                idx = allpos.nonzero().flatten()
                st["min"][idx] = torch.amin(v.index_select(1, idx), (0, 2)).double()
        meta = site.meta
        if meta.get("hist_edges") is not None:
            st["hist"] = self.hist(x, v, U, meta, self.buffer(v))
        return st

    @staticmethod
    def count(b, d, out):
        """Sum of a 0/1 indicator along ``d`` into ``out`` (float64 when 2**24 terms or more: exact)."""
        if out.dtype == b.dtype:
            torch.sum(b, d, out=out)
        else:
            out.copy_(b.sum(d, dtype=out.dtype))

    def hist(self, x, v, U, meta, b):
        """Fixed-edge histogram over the kind's range: per unit (U, B), or for softmax of each row's
        largest probability (B,). ``v``: the (A, U, Q) view of ``x``, ``b`` a scratch buffer like it.
        NaN values are counted in no bin."""
        lo, hi = meta["bounds"]
        B = HIST_BINS
        if meta["kind"] == "softmax":
            v = x.amax(meta["softmax_dim"] % x.dim()).reshape(-1)
            b = torch.empty_like(v)
        torch.sub(v, lo, out=b).mul_(B / (hi - lo)).floor_().clamp_(0, B - 1).nan_to_num_(nan=float(B))
        if meta["kind"] == "softmax":
            return bin_counts(b.to(torch.int64), B + 1)[:B]
        if U * (B + 1) < _EXACT_F32:
            off = torch.arange(U, device=b.device, dtype=b.dtype).mul_(B + 1)
            idx = b.add_(off.view(1, U, 1)).to(torch.int64)
        else:
            off = torch.arange(U, device=b.device, dtype=torch.int64).mul_(B + 1)
            idx = b.to(torch.int64).add_(off.view(1, U, 1))
        return bin_counts(idx.reshape(-1), U * (B + 1)).view(U, B + 1)[:, :B]
