"""Writing the flat groups of raw snapshots (``/flat/<kind>/<n>``: the tensors of a step in one row,
an index of their places) into one shard being written; :mod:`.packed` reads them back."""

from __future__ import annotations

import numpy as np

from . import format as fmt
from .packed import FlatLayout, flat_chunks


class FlatWriter:
    """Writes the flat groups (``/flat/<kind>/<n>``) of one shard being written, for
    :class:`~.hdf5.HDF5ShardWriter`: rows are kept in memory up to ``buffer_bytes`` (all groups
    together) and written a block at a time; a row of more than that is written at once, without a
    copy. :meth:`close` trims each ``values`` to its rows and writes ``steps`` and ``index`` (one
    group and three datasets per list of tensors, whatever their number). ``write(dataset, row, block)``
    writes a block of rows (k, N) at ``row`` (default: an h5py slice assignment)."""

    def __init__(self, f, max_rows: int, buffer_bytes: int, write=None):
        self._f, self.max_rows, self.buffer_bytes = f, max(1, int(max_rows)), int(buffer_bytes)
        self._put = write or self._assign
        # (kind, layout sig) -> [layout, dataset or None, rows written, [blocks], [steps arrays], n]
        self._groups: dict[tuple, list] = {}
        self._count: dict[str, int] = {}   # kind -> groups created
        self._buffered = 0

    def append(self, kind: str, layout: FlatLayout, steps, values) -> int:
        """``values``: (k, N) array or a list of k rows (N,), at ``steps`` (k,). Returns its bytes."""
        steps = np.asarray(steps, np.int64).reshape(-1)
        e = self._groups.get((kind, layout.sig))
        if e is None:
            e = self._groups[(kind, layout.sig)] = [layout, None, 0, [], [], None]
        if isinstance(values, list):
            nb = sum(int(np.asarray(r).nbytes) for r in values)
        else:
            values = np.asarray(values)
            nb = int(values.nbytes)
        if isinstance(values, list) or nb > self.buffer_bytes:
            self._write(kind, e)                      # what is kept first: rows stay in step order
            self._write(kind, e, values, steps)
            return nb
        e[3].append(np.array(values, copy=True))      # the caller may reuse its buffer
        e[4].append(steps)
        self._buffered += nb
        if self._buffered > self.buffer_bytes:
            self.write_all()
        return nb

    def write_all(self, final: bool = False) -> None:
        """Write every row kept; ``final`` (the shard closes): a dataset created now has exactly its rows."""
        for (kind, _), e in self._groups.items():
            self._write(kind, e, final=final)

    def _write(self, kind: str, e: list, values=None, steps=None, final: bool = False) -> None:
        if values is None:   # the kept rows
            if not e[3]:
                return
            values = e[3][0] if len(e[3]) == 1 else np.concatenate(e[3])
            self._buffered -= int(values.nbytes)
            e[3] = []
        else:
            e[4].append(steps)
        rows = values if isinstance(values, list) else None
        first = np.asarray(rows[0]) if rows is not None else values[0]
        k, width = (len(rows) if rows is not None else values.shape[0]), e[0].size
        if first.shape != (width,) or (rows is not None and any(np.shape(r) != (width,) for r in rows)):
            raise ValueError(f"flat {kind}: rows of shape {first.shape} for a layout of {width} values")
        ds, n = e[1], e[2]
        if ds is None:
            g = self._count.get(kind, 0)
            self._count[kind] = g + 1
            e[5] = self._f.require_group(fmt.FLAT_GROUP).require_group(kind).create_group(str(g))
            cap = k if final else max(self.max_rows, k)
            ds = e[1] = e[5].create_dataset("values", shape=(cap, width), maxshape=(None, max(1, width)),
                                            chunks=flat_chunks(width, first.dtype.itemsize, k), dtype=first.dtype)
        if n + k > ds.shape[0]:
            ds.resize((max(n + k, 2 * ds.shape[0]), width))
        if rows is None:
            self._put(ds, n, values)
        else:
            for i, r in enumerate(rows):
                self._put(ds, n + i, np.asarray(r)[None])
        e[2] = n + k

    @staticmethod
    def _assign(ds, start: int, block: np.ndarray) -> None:
        ds[start:start + len(block)] = block

    def close(self) -> None:
        """Write what is kept, trim every ``values``, write every ``steps`` and ``index``."""
        self.write_all(final=True)
        for layout, ds, n, _, steps, g in self._groups.values():
            if ds is None:
                continue
            if ds.shape[0] != n:
                ds.resize((n, ds.shape[1]))
            g.create_dataset("steps", data=np.concatenate(steps))
            g.create_dataset("index", data=layout.index())
