"""Gradient sufficient statistics computed on the device every step (recording tier 1).

For the gradients of a list of parameters on one device, :meth:`GradStatsPlan.partials` does a
fixed number of whole-tensor operations, whatever the number of parameters: one ``torch.cat`` of
the gradients into a flat buffer in which every parameter starts on a chunk boundary (zero padded),
viewed as (rows, CHUNK); then row reductions: the non-finite count, and over the finite elements
sum, 2-norm, sum |g| and max |g|. The result, (rows, 5) float32, is about 5 KB per million
parameters; it travels to the host like any payload (asynchronously on CUDA).
:meth:`GradStatsPlan.finish` (writer thread, numpy) reduces the chunk rows of each parameter into
one vector of :data:`analyzer.format.GRAD_STAT_FIELDS`, handed to the writer as one packed
payload (:meth:`analyzer.storage.ShardWriter.append_packed`). No ``.item()``, no synchronisation, no
Python loop over elements.
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


class Scratch:
    """Two float32 work buffers (and a chunk of zeros) per device, reused by every plan and step:
    fresh multi-MB temporaries cost a page fault per 4 KiB on the CPU. Safe to share on a device
    because its plans run one after the other (same thread, same stream)."""

    def __init__(self):
        self._bufs: dict = {}

    def get(self, dev: torch.device, n: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(zeros (chunk,), flat (n,), tmp (n,)) on ``dev``; the buffers grow when ``n`` does."""
        b = self._bufs.get(dev)
        if b is None or b[1].numel() < n or b[0].numel() < chunk:
            b = self._bufs[dev] = (torch.zeros(chunk, dtype=torch.float32, device=dev),
                                   torch.empty(n, dtype=torch.float32, device=dev),
                                   torch.empty(n, dtype=torch.float32, device=dev))
        return b[0][:chunk], b[1][:n], b[2][:n]


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


class GradStatsPlan:
    """Static layout of the chunk rows of a fixed list of parameters (one device).

    Args:
        items: [(layer_key, param_key, numel, attrs)] in the order the gradients are passed.
        chunk: elements per row.
    """

    def __init__(self, items: list[tuple[str, str, int, dict]], chunk: int = CHUNK):
        self.items = items
        self.chunk = int(chunk)
        nchunks = [max(1, -(-int(n) // self.chunk)) for _, _, n, _ in items]
        self.starts = np.concatenate([[0], np.cumsum(nchunks)[:-1]]).astype(np.int64)
        self.pads = [nc * self.chunk - int(n) for nc, (_, _, n, _) in zip(nchunks, items)]
        self.numel = np.array([int(n) for _, _, n, _ in items], np.float64)
        self.rows = int(sum(nchunks))
        self.keys = tuple((lk, pk) for lk, pk, _, _ in items)     # payload keys, in row order
        self.attrs = [a for *_, a in items]
        self._scratch = None

    def partials(self, grads: list[torch.Tensor], scratch: Scratch | None = None) -> torch.Tensor:
        """Per-chunk partial statistics on the gradients' device.

        Args:
            grads: one gradient per item, all on one device.
            scratch: work buffers to use (shared by the plans of a recorder); default the plan's own.

        Returns:
            (rows, 5) float32 tensor on that device: non-finite
            count, sum, 2-norm, sum |g|, max |g|, the last four over the finite elements of the row.
            Row sums are float32 reductions over CHUNK values (cascade sums on CPU, tree
            reductions on CUDA): relative error about 1e-7 of the row's sum |g|.
        """
        if scratch is None:
            scratch = self._scratch = self._scratch or Scratch()
        z, flat, tmp = scratch.get(grads[0].device, self.rows * self.chunk, self.chunk)
        pieces = []
        for g, pad in zip(grads, self.pads):
            pieces.append(g.reshape(-1))
            if pad:
                pieces.append(z[:pad])
        if all(g.dtype == torch.float32 for g in grads):
            torch.cat(pieces, out=flat)
        else:   # other dtypes: promoted, then float32 (float64 gradients lose precision here)
            flat.copy_(torch.cat(pieces))
        x = flat.view(self.rows, self.chunk)
        t = tmp.view(self.rows, self.chunk)
        # non-finite count: x - x is 0 where x is finite and NaN elsewhere (cheaper than isfinite on CPU)
        nonfin = torch.sub(x, x, out=t).nan_to_num_(nan=1.0).sum(1)
        xz = x.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)   # our own copy: in place
        a = torch.abs(xz, out=t)
        # float32 row reductions (a float64 dtype= would first copy the buffer as float64)
        return torch.stack([nonfin, xz.sum(1), torch.linalg.vector_norm(xz, 2, dim=1), a.sum(1), a.amax(1)], 1)

    def finish(self, part: np.ndarray) -> np.ndarray:
        """Reduce the chunk rows of each parameter (host, numpy).

        Args:
            part: (rows, 5) from :meth:`partials`, on the host.

        Returns:
            (P, len(GRAD_STAT_FIELDS)) float64, row i for ``items[i]`` (see :attr:`keys`): count
            (finite elements), nonfinite, sum, sumsq, sum_abs, max_abs (NaN when count is 0).
        """
        part = np.asarray(part, np.float64)
        st = self.starts
        nonfinite = np.add.reduceat(part[:, 0], st)
        count = self.numel - nonfinite
        s = np.add.reduceat(part[:, 1], st)
        sq = np.add.reduceat(part[:, 2] * part[:, 2], st)
        l1 = np.add.reduceat(part[:, 3], st)
        mx = np.where(count > 0, np.maximum.reduceat(part[:, 4], st), np.nan)
        return np.stack([count, nonfinite, s, sq, l1, mx], 1)
