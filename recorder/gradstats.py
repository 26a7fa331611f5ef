"""Gradient sufficient statistics computed on the device every step (recording tier 1).

For the gradients of a list of parameters on one device, :meth:`GradStatsPlan.partials` does a
fixed number of whole-buffer operations, whatever the number of parameters: one
``torch._foreach_copy_`` of the gradients into a persistent flat buffer (through views cached
between steps), in which every parameter occupies whole rows, zero padded: with the plan's row length
``L`` (:data:`CHUNK` for a large model, shorter for a small one: :func:`chunk_for`), a parameter of more
than ``L / 4`` elements rows of ``L``, a smaller one a single row of the smallest of ``L / 4``,
``L / 16``, ... (at least 16) that holds it, so that a model of many small
tensors is not padded to ``CHUNK`` per tensor; then row reductions per row length (at most five):
the non-finite count, and over the finite elements sum, 2-norm, sum |g| and max |g|. The result,
(rows, 5) float32, is about 5 KB per million parameters; it travels to the host like any payload
(asynchronously on CUDA). :meth:`GradStatsPlan.finish` (writer thread, numpy) reduces the rows of
each parameter into one vector of :data:`analyzer.format.GRAD_STAT_FIELDS`, handed to the writer
as one packed payload (:meth:`analyzer.storage.ShardWriter.append_packed`). No ``.item()``, no
synchronisation, no Python loop over elements or (after the first step) over parameters.
"""

from __future__ import annotations

import numpy as np
import torch


#: Elements per chunk row: float32 partial sums over 4,096 values, added up in float64 on the host.
CHUNK = 4096
#: Parameters are taken in groups of at most this many (padded) elements, one group after the other
#: through the same two scratch buffers: the device memory the statistics keep is bounded by
#: 2 x 4 bytes x min(this, the model's size, or its largest parameter): 512 MiB at most, for any model
#: with no single parameter above 64M elements.
GROUP_ELEMS = 1 << 26
#: A group of few elements gets rows shorter than CHUNK (:func:`chunk_for`): about this many rows, of at
#: least MIN_CHUNK elements. A small model's statistics then take one region of short rows (fewer
#: operations and less padding: 0.77 against 0.9 ms per step on the tiny BERT, 141k parameters in 33
#: tensors, the buffer's passes cold after backward), while a large model keeps rows of CHUNK (its
#: partial statistics stay about 5 KB per million parameters).
ROWS_TARGET = 1024
MIN_CHUNK = 256
#: A shorter row length (for the parameters of at most CHUNK / 4 elements) is used only where it saves
#: at least this many elements of padding; else those parameters take rows of the next longer length.
MIN_SAVED = 1 << 15


class Scratch:
    """Two float32 work buffers (and a chunk of zeros) per device, reused by every plan and step:
    fresh multi-MB temporaries cost a page fault per 4 KiB on the CPU. Safe to share on a device
    because its plans run one after the other (same thread, same stream)."""

    def __init__(self):
        self._bufs: dict = {}
        self._owner: dict = {}   # device -> the plan whose layout (zero padding) the flat buffer holds

    def get(self, dev: torch.device, n: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(zeros (chunk,), flat (n,), tmp (n,)) on ``dev``; the buffers grow when ``n`` does."""
        b = self._bufs.get(dev)
        if b is None or b[1].numel() < n or b[0].numel() < chunk:
            b = self._bufs[dev] = (torch.zeros(chunk, dtype=torch.float32, device=dev),
                                   torch.empty(n, dtype=torch.float32, device=dev),
                                   torch.empty(n, dtype=torch.float32, device=dev))
            self._owner.pop(dev, None)
        return b[0][:chunk], b[1][:n], b[2][:n]

    def claim(self, dev: torch.device, plan) -> bool:
        """Make ``plan`` the user of the flat buffer on ``dev``; True if it was not already (its
        padding must then be zeroed again)."""
        if self._owner.get(dev) is plan:
            return False
        self._owner[dev] = plan
        return True


def group_items(numels: list[int], limit: int | None = None, chunk: int = CHUNK) -> list[list[int]]:
    """Consecutive groups of indices whose padded sizes add up to at most ``limit`` elements
    (default :data:`GROUP_ELEMS`; a parameter larger than that is a group of its own).

    Returns:
        [[indices of group 0], [indices of group 1], ...] covering ``range(len(numels))`` in order.
    """
    limit = GROUP_ELEMS if limit is None else limit
    groups: list[list[int]] = []
    cur, size = [], 0
    for i, n in enumerate(numels):
        padded = max(1, -(-int(n) // chunk)) * chunk
        if cur and size + padded > limit:
            groups.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += padded
    if cur:
        groups.append(cur)
    return groups


def chunk_for(elems: int) -> int:
    """The row length of a plan for ``elems`` gradient elements: the shortest of MIN_CHUNK, 4 x MIN_CHUNK,
    ... up to :data:`CHUNK` whose :data:`ROWS_TARGET` rows hold them (256 for 141k, 1024 for 651k, CHUNK
    from about 1M elements)."""
    L = MIN_CHUNK
    while L < CHUNK and L * ROWS_TARGET < elems:
        L *= 4
    return min(L, CHUNK)


def row_lengths(chunk: int) -> list[int]:
    """The row lengths of a plan: ``chunk``, then ``chunk / 4``, ``chunk / 16``, ... down to 16 (at
    most four of them; none for a chunk under 64)."""
    out, n = [int(chunk)], int(chunk) // 4
    while n >= 16 and len(out) < 5:
        out.append(n)
        n //= 4
    return out


class GradStatsPlan:
    """Static layout of the rows of a fixed list of parameters (one device).

    Args:
        items: [(layer_key, param_key, numel, attrs)] in the order the gradients are passed.
        chunk: elements per row of a parameter larger than ``chunk / 4`` (smaller ones get one
            shorter row, see :func:`row_lengths`).
    """

    def __init__(self, items: list[tuple[str, str, int, dict]], chunk: int = CHUNK):
        self.items = items
        self.chunk = int(chunk)
        lengths = row_lengths(self.chunk)
        numels = [int(n) for _, _, n, _ in items]
        # row length of each item: the shortest that holds a small parameter in one row
        item_len = []
        for n in numels:
            L = self.chunk
            for cand in lengths[1:]:
                if n <= cand:
                    L = cand
            item_len.append(L)
        # a row length of its own costs a few operations: worth it only if it saves enough padding
        for L, longer in zip(lengths[:0:-1], lengths[-2::-1]):
            count = sum(1 for li in item_len if li == L)
            if count and count * (longer - L) < MIN_SAVED:
                item_len = [longer if li == L else li for li in item_len]
        nrows = [max(1, -(-n // L)) for n, L in zip(numels, item_len)]
        self.rows = int(sum(nrows))
        self.starts = np.concatenate([[0], np.cumsum(nrows)[:-1]]).astype(np.int64)   # item order
        # device layout: the rows of one length together (one 2-D view each), items in order within
        self.regions: list[tuple[int, int, int]] = []   # (offset in elements, rows, row length)
        self.offsets = [0] * len(items)                  # element offset of each item in the buffer
        perm = np.empty(self.rows, np.int64)             # device row of each item-ordered row
        off = row = 0
        for L in lengths:
            k0 = row
            for i, (r, li) in enumerate(zip(nrows, item_len)):
                if li == L:
                    self.offsets[i] = off + (row - k0) * L
                    perm[self.starts[i]:self.starts[i] + r] = np.arange(row, row + r)
                    row += r
            if row > k0:
                self.regions.append((off, row - k0, L))
                off += (row - k0) * L
        self.size = off                                  # elements of the flat buffer
        self.perm = None if np.array_equal(perm, np.arange(self.rows)) else perm
        self.numel = np.array(numels, np.float64)
        self.keys = tuple((lk, pk) for lk, pk, _, _ in items)     # payload keys, in row order
        self.attrs = [a for *_, a in items]
        self._scratch = None
        self._views: tuple | None = None   # (flat buffer's data_ptr, [per-item views], [shapes])

    def _dest(self, flat: torch.Tensor, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Views of ``flat`` shaped like ``grads`` (cached while the buffer and shapes stay)."""
        v = self._views
        if v is None or v[0] != flat.data_ptr():
            views = [flat[o:o + int(n)].view(g.shape) for o, n, g in zip(self.offsets, self.numel, grads)]
            v = self._views = (flat.data_ptr(), views)
        return v[1]

    def partials(self, grads: list[torch.Tensor], scratch: Scratch | None = None) -> torch.Tensor:
        """Per-row partial statistics on the gradients' device.

        Args:
            grads: one gradient per item, all on one device (any shape of the item's size, any
                floating dtype: converted to float32, so float64 gradients lose precision here).
            scratch: work buffers to use (shared by the plans of a recorder); default the plan's own.

        Returns:
            (rows, 5) float32 tensor on that device, rows in device order (see :meth:`finish`):
            non-finite count, sum, 2-norm, sum |g|, max |g|, the last four over the finite elements
            of the row. Row sums are float32 reductions over at most CHUNK values (cascade sums on
            CPU, tree reductions on CUDA): relative error about 1e-7 of the row's sum |g|.
        """
        if scratch is None:
            scratch = self._scratch = self._scratch or Scratch()
        dev = grads[0].device
        _, flat, tmp = scratch.get(dev, self.size, self.chunk)
        if scratch.claim(dev, self):
            flat.zero_()   # the padding: never written by a copy, kept zero while this plan owns it
        dest = self._dest(flat, grads)
        try:
            torch._foreach_copy_(dest, grads)
        except RuntimeError:   # a gradient of another shape (same size): new views
            self._views = None
            torch._foreach_copy_(self._dest(flat, grads), grads)
        # non-finite count: x - x is 0 where x is finite and NaN elsewhere (cheaper than isfinite on CPU)
        torch.sub(flat, flat, out=tmp).nan_to_num_(nan=1.0)
        nonfin = [tmp[o:o + k * L].view(k, L).sum(1) for o, k, L in self.regions]
        flat.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)   # our own copy: in place
        torch.abs(flat, out=tmp)
        out = []
        for (o, k, L), nf in zip(self.regions, nonfin):
            xz, a = flat[o:o + k * L].view(k, L), tmp[o:o + k * L].view(k, L)
            # float32 row reductions (a float64 dtype= would first copy the buffer as float64)
            out.append(torch.stack([nf, xz.sum(1), torch.linalg.vector_norm(xz, 2, dim=1), a.sum(1), a.amax(1)], 1))
        return out[0] if len(out) == 1 else torch.cat(out)

    def finish(self, part: np.ndarray) -> np.ndarray:
        """Reduce the chunk rows of each parameter (host, numpy).

        Args:
            part: (rows, 5) from :meth:`partials`, on the host (device row order).

        Returns:
            (P, len(GRAD_STAT_FIELDS)) float64, row i for ``items[i]`` (see :attr:`keys`): count
            (finite elements), nonfinite, sum, sumsq, sum_abs, max_abs (NaN when count is 0).
        """
        part = np.asarray(part, np.float64)
        if self.perm is not None:   # device row order -> item order
            part = part[self.perm]
        st = self.starts
        nonfinite = np.add.reduceat(part[:, 0], st)
        count = self.numel - nonfinite
        s = np.add.reduceat(part[:, 1], st)
        sq = np.add.reduceat(part[:, 2] * part[:, 2], st)
        l1 = np.add.reduceat(part[:, 3], st)
        mx = np.where(count > 0, np.maximum.reduceat(part[:, 4], st), np.nan)
        return np.stack([count, nonfinite, s, sq, l1, mx], 1)
