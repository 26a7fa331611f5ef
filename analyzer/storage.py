"""Shard storage: one interface, an HDF5 implementation and an in-memory one for tests.

Torch-free. The recorder's background writer drives :class:`ShardSeriesWriter`; the analyzer reads
shards through :class:`ShardReader`. Every implementation passes the same round-trip suite
(tests/test_storage.py).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import format as fmt
from .format import TraceError

#: Payload chunks aim at about this many bytes (several small rows share a chunk).
CHUNK_TARGET_BYTES = 1 << 20
#: Rows of one payload are stacked into one write up to this many bytes, else written row by row.
STACK_MAX_BYTES = 1 << 20
#: Rows of small payloads kept in memory by a shard writer until a chunk is full (all payloads together).
SMALL_BUFFER_BYTES = 32 << 20
#: Upper bound for a single chunk (HDF5 allows 4 GiB; keep reads reasonable).
CHUNK_MAX_BYTES = 64 << 20
#: A dataset of a shard may declare more bytes than the file stores for it (compression, unwritten
#: fill values) only up to this ratio, beyond MAX_SPARSE_BYTES: a sparse dataset of absurd declared
#: size is refused instead of being read (terabytes of fill values).
MAX_SPARSE_RATIO = 1000
MAX_SPARSE_BYTES = 64 << 20


def chunk_shape(row_shape: tuple[int, ...], itemsize: int, max_rows: int = 1024) -> tuple[int, ...]:
    """Chunk shape for a dataset of rows of ``row_shape``: several rows for small tensors,
    one row (or a slab of it) for large ones."""
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * itemsize)
    rows = int(max(1, min(max_rows, CHUNK_TARGET_BYTES // row_bytes)))
    dims = [max(1, d) for d in row_shape]
    i = 0
    while rows == 1 and int(np.prod(dims, dtype=np.int64)) * itemsize > CHUNK_MAX_BYTES and i < len(dims):
        if dims[i] > 1:
            dims[i] = (dims[i] + 1) // 2
        else:
            i += 1
    return (rows, *dims)


# --------------------------------------------------------------------------- interface

class ShardWriter:
    """Writes one shard. Methods are called from a single thread."""

    nbytes: int = 0

    def append_steps(self, cols: dict[str, np.ndarray]) -> None:
        """Append rows to the step table; ``cols`` maps every name in STEP_COLUMNS to a 1-D array."""
        raise NotImplementedError

    def append(self, kind: str, layer_key: str, param_key: str, steps: np.ndarray,
               values: np.ndarray, attrs: dict | None = None) -> None:
        """Append raw tensors ``values`` (k, *shape) recorded at ``steps`` (k,)."""
        raise NotImplementedError

    def append_packed(self, kind: str, keys: tuple, steps: np.ndarray, values: np.ndarray,
                      attrs: list) -> None:
        """Append several payloads of one kind that arrive together: ``values`` (k, P, *shape) holds
        at column i the rows of payload ``keys[i]`` = (layer_key, param_key), with ``attrs[i]``.
        Stored exactly as P calls of :meth:`append` (the default does that)."""
        values = np.asarray(values)
        for i, (lk, pk) in enumerate(keys):
            self.append(kind, lk, pk, steps, values[:, i], attrs[i])

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Close a shard that will be discarded, keeping nothing; never raises."""
        try:
            self.close()
        except Exception:
            pass


class ShardReader:
    """Reads one closed shard."""

    path: str
    attrs: dict

    def steps(self) -> dict[str, np.ndarray]:
        """The step table: every column of STEP_COLUMNS as a 1-D array of equal length."""
        raise NotImplementedError

    def payloads(self, kind: str) -> list[tuple[str, str]]:
        """``(layer_key, param_key)`` pairs present for ``kind``."""
        raise NotImplementedError

    def payload_info(self, kind: str, layer_key: str, param_key: str) -> tuple[int, tuple, int]:
        """``(rows, row_shape, chunk_rows)`` of one payload."""
        raise NotImplementedError

    def read_payload_steps(self, kind: str, layer_key: str, param_key: str) -> np.ndarray:
        raise NotImplementedError

    def read_payload(self, kind: str, layer_key: str, param_key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as an array (stop - start, *shape) in the stored dtype."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_step_cols(cols: dict) -> int:
    n = None
    for c in fmt.STEP_COLUMNS:
        if c not in cols:
            raise ValueError(f"step table lacks column {c!r}")
        k = len(cols[c])
        if n is not None and k != n:
            raise ValueError("step table columns differ in length")
        n = k
    return n or 0


# --------------------------------------------------------------------------- HDF5

class HDF5ShardWriter(ShardWriter):
    """Chunked datasets, one group per payload with ``values`` and ``steps``.

    Written for speed on the writer thread: value datasets are created with room for ``max_rows``
    rows and filled through the low-level API (one H5Dwrite per block, no Python-level selection
    machinery); the step table and the step indices are kept in memory and written once, at
    ``close()``, when every dataset is also trimmed to its length. The live file is not meant to
    be read before it is closed (readers ignore ``.part`` files).
    """

    _STEP_DTYPES = {"step": "i8", "epoch": "i8", "loss": "f8", "time": "f8", "dropped": "i4"}

    def __init__(self, path: str, attrs: dict, max_rows: int = 1024):
        import h5py
        self._h5s = h5py.h5s
        self.path = path
        self.max_rows = max(1, int(max_rows))
        self._f = h5py.File(path, "w")
        for k, v in attrs.items():
            self._f.attrs[k] = v
        self._f.attrs["format"] = fmt.FORMAT_NAME
        self._f.attrs["format_version"] = fmt.FORMAT_VERSION
        self._cols: dict[str, list] = {c: [] for c in fmt.STEP_COLUMNS}
        self._entries: dict[tuple[str, str, str], list] = {}   # key -> [group, vds, n, cap, [steps]]
        # payloads of small rows (several rows per chunk): rows kept here and written a chunk at a
        # time; key -> [rows per chunk, [row blocks], [step arrays], n buffered, attrs, shape, dtype]
        self._small: dict[tuple[str, str, str], list] = {}
        self._small_bytes = 0
        # packed payloads (append_packed): (kind, keys) -> [[row blocks], [step arrays], attrs]
        self._packed: dict[tuple, list] = {}
        self._parents: dict[tuple[str, str], object] = {}   # (kind, layer key) -> h5py group
        self.nbytes = 0
        self.n_steps = 0
        self.step_range = [None, None]

    def append_steps(self, cols):
        k = _check_step_cols(cols)
        if not k:
            return
        for c in fmt.STEP_COLUMNS:
            self._cols[c].append(np.asarray(cols[c]).astype(self._STEP_DTYPES[c], copy=True))
        s = np.asarray(cols["step"])
        if self.step_range[0] is None:
            self.step_range[0] = int(s[0])
        self.step_range[1] = int(s[-1]) + 1
        self.n_steps += k

    def _write(self, vds, start: int, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=vds.dtype)
        fspace = vds.id.get_space()
        fspace.select_hyperslab((start,) + (0,) * (block.ndim - 1), block.shape)
        vds.id.write(self._h5s.create_simple(block.shape), fspace, block)

    def append(self, kind, layer_key, param_key, steps, values, attrs=None):
        """``values``: an array (k, *shape), or a list of k arrays of ``shape`` written row by row
        without first copying them into one block (large tensors).

        Rows small enough to share a chunk are kept in memory and written a whole chunk at a time
        (one HDF5 write per chunk instead of one per step; a dataset that ends with fewer rows than
        a chunk gets a chunk of just those rows, so sparse schedules do not allocate empty rows).
        At most :data:`SMALL_BUFFER_BYTES` are kept; the file is not meant to be read before close."""
        key = (kind, layer_key, param_key)
        b = self._small.get(key)
        if isinstance(values, list) and b is not None:   # small rows: kept in order with the others
            values = np.stack([np.asarray(v) for v in values])
        if not isinstance(values, list):
            values = np.asarray(values)
            shape, dtype = values.shape[1:], values.dtype
            if b is None and key not in self._entries:
                per = chunk_shape(shape, dtype.itemsize, self.max_rows)[0]
                if per > 1:
                    b = self._small[key] = [per, [], [], 0, attrs, tuple(shape), dtype]
            if b is not None:
                if tuple(shape) != b[5]:
                    raise ValueError(f"{kind}/{layer_key}/{param_key}: shape {tuple(shape)} != {b[5]}")
                k = values.shape[0]
                b[1].append(np.array(values, dtype=b[6], copy=True))   # the caller may reuse its buffer
                b[2].append(np.asarray(steps, dtype=np.int64).reshape(-1))
                b[3] += k
                nb = int(values.nbytes)
                self._small_bytes += nb
                self.nbytes += nb
                if b[3] >= b[0]:
                    self._write_small(key)
                elif self._small_bytes > SMALL_BUFFER_BYTES:
                    for kk in list(self._small):
                        self._write_small(kk)
                return
        self._append_now(key, steps, values, attrs)

    def append_packed(self, kind, keys, steps, values, attrs):
        """Kept whole (one list append per call) and split into the payloads' datasets when the
        shard closes or :data:`SMALL_BUFFER_BYTES` are kept: the writer's per-step cost does not
        grow with the number of parameters."""
        values = np.asarray(values)
        if values.ndim < 2 or values.shape[1] != len(keys):
            raise ValueError(f"{kind}: packed values of shape {values.shape} for {len(keys)} payloads")
        b = self._packed.get((kind, keys))
        if b is None:
            b = self._packed[(kind, keys)] = [[], [], list(attrs)]
        b[0].append(np.array(values, copy=True))
        b[1].append(np.asarray(steps, dtype=np.int64).reshape(-1))
        nb = int(values.nbytes)
        self._small_bytes += nb
        self.nbytes += nb
        if self._small_bytes > SMALL_BUFFER_BYTES:
            self._write_packed()

    def _write_packed(self, final: bool = False) -> None:
        """Write the packed rows kept so far, one dataset per payload (at close, ``final``, a
        dataset not created yet gets a chunk of exactly its rows)."""
        for (kind, keys), (blocks, steplist, attrs) in list(self._packed.items()):
            if not blocks:
                continue
            vals = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
            steps = np.concatenate(steplist)
            self._packed[(kind, keys)] = [[], [], attrs]
            self._small_bytes -= int(vals.nbytes)
            self.nbytes -= int(vals.nbytes)   # counted again by _append_now
            for i, (lk, pk) in enumerate(keys):
                key = (kind, lk, pk)
                self._append_now(key, steps, vals[:, i], attrs[i],
                                 chunk_rows=len(steps) if final and key not in self._entries else None)

    def _write_small(self, key, final: bool = False) -> None:
        """Write the rows kept for ``key``; at close (``final``) a dataset not created yet gets a
        chunk of exactly its rows."""
        b = self._small.get(key)
        if b is None or not b[3]:
            return
        per, blocks, steplist, n, attrs, shape, dtype = b
        vals = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        steps = np.concatenate(steplist)
        self._small_bytes -= int(vals.nbytes)
        b[1], b[2], b[3] = [], [], 0
        self.nbytes -= int(vals.nbytes)       # counted again by _append_now
        self._append_now(key, steps, vals, attrs, chunk_rows=n if final and key not in self._entries else None)

    def _append_now(self, key, steps, values, attrs=None, chunk_rows: int | None = None):
        kind, layer_key, param_key = key
        rows = values if isinstance(values, list) else None
        if rows is not None:
            first = np.asarray(rows[0])
            shape, dtype, k = first.shape, first.dtype, len(rows)
        else:
            values = np.asarray(values)
            shape, dtype, k = values.shape[1:], values.dtype, values.shape[0]
        e = self._entries.get(key)
        if e is None:
            parent = self._parents.get((kind, layer_key))
            if parent is None:   # cached: a lookup per payload and shard costs more than the cache
                parent = self._parents[(kind, layer_key)] = self._f.require_group(kind).require_group(layer_key)
            g = parent.create_group(param_key)
            for a, v in (attrs or {}).items():
                if v is not None:
                    g.attrs[a] = v
            cap = k if chunk_rows is not None else max(self.max_rows, k)
            chunks = chunk_shape(shape, dtype.itemsize, self.max_rows)
            if chunk_rows is not None:
                chunks = (max(1, min(chunks[0], chunk_rows)), *chunks[1:])
            vds = g.create_dataset("values", shape=(cap, *shape), maxshape=(None, *shape),
                                   chunks=chunks, dtype=dtype)
            e = self._entries[key] = [g, vds, 0, cap, []]
        g, vds, n, cap, steplist = e
        if tuple(shape) != vds.shape[1:] or (rows is not None and any(np.shape(r) != shape for r in rows)):
            raise ValueError(f"{kind}/{layer_key}/{param_key}: shape {tuple(shape)} != {vds.shape[1:]}")
        if n + k > cap:
            cap = max(n + k, 2 * cap)
            vds.resize((cap, *shape))
            e[3] = cap
        if rows is None:
            self._write(vds, n, values)
        else:
            for i, r in enumerate(rows):
                self._write(vds, n + i, np.asarray(r)[None])
        steplist.append(np.asarray(steps, dtype=np.int64).reshape(-1))
        e[2] = n + k
        self.nbytes += k * int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def close(self):
        if self._f is None:
            return
        try:
            self._write_packed(final=True)
            for key in list(self._small):
                self._write_small(key, final=True)
            g = self._f.create_group("steps")
            for c in fmt.STEP_COLUMNS:
                v = self._cols[c]
                data = np.concatenate(v) if v else np.zeros(0, self._STEP_DTYPES[c])
                g.create_dataset(c, data=data.astype(self._STEP_DTYPES[c], copy=False))
            for grp, vds, n, cap, steplist in self._entries.values():
                if n != cap:
                    vds.resize((n, *vds.shape[1:]))
                grp.create_dataset("steps", data=np.concatenate(steplist) if steplist else np.zeros(0, np.int64))
            self._f.attrs["n_steps"] = self.n_steps
            self._f.attrs["step_start"] = -1 if self.step_range[0] is None else self.step_range[0]
            self._f.attrs["step_stop"] = -1 if self.step_range[1] is None else self.step_range[1]
            self._f.flush()   # a write error (ENOSPC) shows here, while the file can still be aborted
        except BaseException:
            self.abort()
            raise
        self._f.close()
        self._f = None

    def abort(self):
        """Close the file keeping nothing (the caller deletes it); see :func:`abort_h5`."""
        f, self._f = self._f, None
        abort_h5(f)


def abort_h5(f) -> None:
    """Close an h5py file being written, keeping nothing (the caller deletes it); never raises.

    Its descriptor is first pointed at /dev/null, so that HDF5's pending writes succeed into
    nothing. After a failed write (ENOSPC, EFBIG) a plain close fails as well and leaves a
    half-closed file that crashes the interpreter at exit (h5py 3 with HDF5 1.14: a segmentation
    fault), i.e. it would kill the training job."""
    if f is None:
        return
    try:
        if f.id.valid:
            nul = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(nul, f.id.get_vfd_handle())
            finally:
                os.close(nul)
    except Exception:
        pass
    try:
        f.close()
    except Exception:
        pass


class HDF5ShardReader(ShardReader):
    """Opens a closed shard read-only and validates its structure lazily."""

    def __init__(self, path: str, display: str | None = None):
        import h5py
        self.path = path
        self._disp = display or path
        self._checked: set = set()
        self._pairs: dict = {}
        try:
            # no chunk cache: reads are whole chunk-aligned blocks, and a reader kept open in a
            # ReaderPool must not hold up to 1 MB of cached chunks per dataset it has touched
            self._f = h5py.File(path, "r", locking=False, rdcc_nbytes=0)
        except Exception as e:  # OSError for truncated / random files
            raise TraceError(f"corrupt or truncated shard {self._disp}: {_short(e)}") from None
        try:
            self.attrs = {k: _py(v) for k, v in self._f.attrs.items()}
        except Exception as e:
            self.close()
            raise TraceError(f"corrupt shard {self._disp}: unreadable attributes ({_short(e)})") from None
        tag = self.attrs.get("format")
        if not isinstance(tag, str) or tag != fmt.FORMAT_NAME:
            self.close()
            raise TraceError(f"{self._disp} is not a bbdecoder shard")
        try:
            fmt.check_version(self.attrs.get("format_version"), self._disp)
        except TraceError:
            self.close()
            raise

    def _get(self, path):
        try:
            return self._f[path]
        except Exception as e:
            raise TraceError(f"corrupt shard {self._disp}: missing or unreadable {path!r} ({_short(e)})") from None

    def _check_dataset(self, ds, what: str) -> None:
        """Refuse a dataset that is not a real numeric array, or that declares far more data than the
        file stores (a sparse dataset of absurd size: reading it would exhaust memory or time)."""
        try:
            kind, size, itemsize = ds.dtype.kind, int(ds.size), int(ds.dtype.itemsize)
            stored = int(ds.id.get_storage_size())
        except Exception as e:
            raise TraceError(f"corrupt shard {self._disp}: unreadable {what} ({_short(e)})") from None
        if kind not in "biuf":
            raise TraceError(f"corrupt shard {self._disp}: {what} holds {ds.dtype}, not numeric (real) values")
        declared = size * itemsize
        if declared > MAX_SPARSE_BYTES and declared > MAX_SPARSE_RATIO * stored:
            raise TraceError(f"corrupt shard {self._disp}: {what} declares an absurd size "
                             f"{tuple(ds.shape)} ({declared:,} bytes) but stores {stored:,} bytes")

    def steps(self):
        g = self._get("steps")
        out = {}
        try:
            for c in fmt.STEP_COLUMNS:
                if c not in g:
                    raise TraceError(f"corrupt shard {self._disp}: step table lacks {c!r}")
                ds = g[c]
                if not hasattr(ds, "dtype") or ds.ndim != 1:
                    raise TraceError(f"corrupt shard {self._disp}: step table column {c!r} is not 1-D")
                self._check_dataset(ds, f"step table column {c!r}")
                out[c] = ds[()]
        except TraceError:
            raise
        except Exception as e:
            raise TraceError(f"corrupt shard {self._disp}: unreadable step table ({_short(e)})") from None
        lens = {len(v) for v in out.values()}
        if len(lens) != 1 or any(v.ndim != 1 for v in out.values()):
            raise TraceError(f"corrupt shard {self._disp}: step table columns differ in length")
        return out

    def payloads(self, kind):
        if kind not in self._f:
            return []
        out = []
        try:
            for lk, lg in self._f[kind].items():
                for pk in lg.keys():
                    out.append((lk, pk))
        except Exception as e:
            raise TraceError(f"corrupt shard {self._disp}: unreadable {kind} index ({_short(e)})") from None
        return out

    def _pair(self, kind, lk, pk):
        g = self._get(fmt.payload_path(kind, lk, pk))
        try:
            v, s = g["values"], g["steps"]
        except Exception:
            raise TraceError(f"corrupt shard {self._disp}: {kind}/{lk}/{pk} lacks values or steps") from None
        try:
            ok = v.ndim >= 1 and s.ndim == 1 and v.shape[0] == s.shape[0]
        except Exception:
            raise TraceError(f"corrupt shard {self._disp}: {kind}/{lk}/{pk} values or steps are not datasets") from None
        if not ok:
            raise TraceError(f"corrupt shard {self._disp}: {kind}/{lk}/{pk} has {v.shape[0] if v.ndim else 0} rows "
                             f"but {s.shape[0] if s.ndim else 0} steps")
        return v, s

    def _checked_pair(self, kind, lk, pk):
        key = (kind, lk, pk)
        got = self._pairs.get(key)
        if got is not None:     # the file is closed and read-only: a validated pair stays valid
            return got
        v, s = self._pair(kind, lk, pk)
        if key not in self._checked:
            self._check_dataset(v, f"{kind}/{lk}/{pk}/values")
            self._check_dataset(s, f"{kind}/{lk}/{pk}/steps")
            self._checked.add(key)
        self._pairs[key] = (v, s)
        return v, s

    def payload_info(self, kind, lk, pk):
        v, _ = self._checked_pair(kind, lk, pk)
        chunks = v.chunks[0] if v.chunks else max(1, v.shape[0])
        return v.shape[0], tuple(v.shape[1:]), int(chunks)

    def read_payload_steps(self, kind, lk, pk):
        _, s = self._checked_pair(kind, lk, pk)
        return self._read(s, slice(None))

    def read_payload(self, kind, lk, pk, start, stop):
        v, _ = self._checked_pair(kind, lk, pk)
        return self._read(v, slice(start, stop))

    def _read(self, ds, sel):
        try:
            return ds[sel]
        except Exception as e:
            raise TraceError(f"corrupt or truncated shard {self._disp}: {_short(e)}") from None

    def close(self):
        self._pairs = {}
        f = getattr(self, "_f", None)
        if f is not None:
            try:
                f.close()
            except Exception:
                pass
            self._f = None


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


def _py(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


class ReaderPool:
    """Keeps up to ``keep`` shard readers open between uses (least recently used closed first), so
    that analyses which visit every shard once per layer or activation site do not reopen each file
    every time (opening a shard and finding its datasets cost more than reading small payloads).

    :meth:`borrow` returns a reader to use in a ``with`` block (or ``close()`` it): a reader still
    borrowed is never closed by eviction; one given back becomes idle. Only for closed shards, which
    never change. Not for use across fork(): :meth:`close` before forking (see analyzer.report)."""

    def __init__(self, opener: Callable[[str, str], ShardReader], keep: int = 8):
        from collections import OrderedDict
        self._opener = opener
        self.keep = max(0, int(keep))
        self._idle: "OrderedDict[tuple, ShardReader]" = OrderedDict()
        self._busy: dict[tuple, list] = {}     # key -> [reader, borrow count]

    def borrow(self, path: str, name: str) -> "_Borrowed":
        key = (path, name)
        e = self._busy.get(key)
        if e is None:
            r = self._idle.pop(key, None)
            if r is None:
                r = self._opener(path, name)     # a TraceError here leaves the pool as it was
            e = self._busy[key] = [r, 0]
        e[1] += 1
        return _Borrowed(self, key, e[0])

    def _give_back(self, key: tuple) -> None:
        e = self._busy[key]
        e[1] -= 1
        if e[1]:
            return
        del self._busy[key]
        self._idle[key] = e[0]
        while len(self._idle) > self.keep:
            _, old = self._idle.popitem(last=False)
            old.close()

    def close(self) -> None:
        """Close every idle reader (borrowed ones close when given back, beyond ``keep``)."""
        while self._idle:
            _, old = self._idle.popitem(last=False)
            old.close()

    @property
    def open_count(self) -> int:
        return len(self._idle) + len(self._busy)


class _Borrowed(ShardReader):
    """A reader lent by a :class:`ReaderPool`: reads go to it, ``close()`` gives it back (once)."""

    def __init__(self, pool: ReaderPool, key: tuple, reader: ShardReader):
        self._pool, self._key, self._r = pool, key, reader
        self.path = reader.path
        self.attrs = reader.attrs

    def steps(self):
        return self._r.steps()

    def payloads(self, kind):
        return self._r.payloads(kind)

    def payload_info(self, kind, layer_key, param_key):
        return self._r.payload_info(kind, layer_key, param_key)

    def read_payload_steps(self, kind, layer_key, param_key):
        return self._r.read_payload_steps(kind, layer_key, param_key)

    def read_payload(self, kind, layer_key, param_key, start, stop):
        return self._r.read_payload(kind, layer_key, param_key, start, stop)

    def close(self):
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool._give_back(self._key)


# --------------------------------------------------------------------------- in memory

@dataclass
class MemoryShard:
    attrs: dict
    steps: dict = field(default_factory=lambda: {c: [] for c in fmt.STEP_COLUMNS})
    payloads: dict = field(default_factory=dict)   # (kind, lk, pk) -> ([steps arrays], [values arrays], attrs)


class MemoryShardWriter(ShardWriter):
    """Keeps the shard in a :class:`MemoryShard` (for tests of everything above storage)."""

    def __init__(self, shard: MemoryShard):
        self.shard = shard
        self.nbytes = 0
        self.n_steps = 0

    def append_steps(self, cols):
        k = _check_step_cols(cols)
        for c in fmt.STEP_COLUMNS:
            self.shard.steps[c].append(np.asarray(cols[c]).copy())
        self.n_steps += k

    def append(self, kind, layer_key, param_key, steps, values, attrs=None):
        if isinstance(values, list):
            values = np.stack(values)
        key = (kind, layer_key, param_key)
        e = self.shard.payloads.setdefault(key, ([], [], dict(attrs or {})))
        if e[1] and values.shape[1:] != e[1][0].shape[1:]:
            raise ValueError(f"{kind}/{layer_key}/{param_key}: shape mismatch")
        e[0].append(np.asarray(steps, dtype=np.int64).copy())
        e[1].append(np.array(values, copy=True))
        self.nbytes += values.nbytes

    def close(self):
        pass


class MemoryShardReader(ShardReader):
    _DT = {"step": np.int64, "epoch": np.int64, "loss": np.float64, "time": np.float64, "dropped": np.int32}

    def __init__(self, shard: MemoryShard, path: str = "<memory>"):
        self.shard, self.path = shard, path
        self.attrs = dict(shard.attrs, format=fmt.FORMAT_NAME, format_version=fmt.FORMAT_VERSION)

    def steps(self):
        return {c: (np.concatenate(v) if v else np.zeros(0)).astype(self._DT[c])
                for c, v in self.shard.steps.items()}

    def payloads(self, kind):
        return [(lk, pk) for (k, lk, pk) in self.shard.payloads if k == kind]

    def _e(self, kind, lk, pk):
        try:
            return self.shard.payloads[(kind, lk, pk)]
        except KeyError:
            raise TraceError(f"{self.path}: no payload {kind}/{lk}/{pk}") from None

    def payload_info(self, kind, lk, pk):
        e = self._e(kind, lk, pk)
        return sum(len(s) for s in e[0]), tuple(e[1][0].shape[1:]), 1

    def read_payload_steps(self, kind, lk, pk):
        return np.concatenate(self._e(kind, lk, pk)[0])

    def read_payload(self, kind, lk, pk, start, stop):
        return np.concatenate(self._e(kind, lk, pk)[1])[start:stop]


# --------------------------------------------------------------------------- backends

class HDF5Backend:
    """Shards are HDF5 files; the live shard carries the ``.part`` suffix until it is closed."""

    def create(self, path: str, attrs: dict, max_rows: int = 1024) -> ShardWriter:
        return HDF5ShardWriter(path, attrs, max_rows)

    def commit(self, live_path: str, final_path: str) -> None:
        """Publish a closed shard (a rename: from now on it survives a killed process)."""
        os.replace(live_path, final_path)

    def sync(self, final_path: str) -> None:
        """Make a published shard durable against power loss, then drop its clean pages from the
        page cache (a recorder writing gigabytes should not evict the training job's data).
        Runs on a background thread, overlapping the next shard's writes."""
        fmt.fsync_file(final_path, drop_cache=True)
        fmt.fsync_dir(os.path.dirname(final_path))

    def open(self, path: str, display: str | None = None) -> ShardReader:
        return HDF5ShardReader(path, display)

    def discard(self, live_path: str) -> None:
        """Delete a live shard that will not be published (missing is fine)."""
        try:
            os.unlink(live_path)
        except FileNotFoundError:
            pass


class MemoryBackend:
    """Shards live in a dict keyed by path (nothing touches the disk but the JSON files)."""

    def __init__(self):
        self.shards: dict[str, MemoryShard] = {}

    def create(self, path, attrs, max_rows=1024):
        self.shards[path] = MemoryShard(dict(attrs))
        return MemoryShardWriter(self.shards[path])

    def commit(self, live_path, final_path):
        self.shards[final_path] = self.shards.pop(live_path)

    def sync(self, final_path):
        pass

    def open(self, path, display=None):
        return MemoryShardReader(self.shards[path], display or path)

    def discard(self, live_path):
        self.shards.pop(live_path, None)


# --------------------------------------------------------------------------- series writer

@dataclass
class StepRecord:
    """One optimizer step as the writer receives it (numpy only, no torch)."""

    step: int
    epoch: int
    loss: float
    time: float
    dropped: int = 0
    #: (kind, layer_key, param_key, array (*shape), attrs); or, for several payloads of one kind
    #: that arrive together, (kind, None, ((layer_key, param_key), ...), array (P, *shape), [attrs])
    payloads: list = field(default_factory=list)


class ShardSeriesWriter:
    """Writes one rank's series of shards and keeps ``rank.json`` current.

    A shard is closed (and becomes visible to readers) after ``flush_steps`` steps, after
    ``flush_secs`` seconds, or after ``max_shard_bytes`` bytes, whichever comes first. A crash loses
    at most the live shard, i.e. at most that window.
    """

    def __init__(self, rank_dir: str, rank: int, flush_steps: int = 100, flush_secs: float = 10.0,
                 max_shard_bytes: int = 1 << 30, backend=None, clock: Callable[[], float] = time.monotonic):
        self.rank_dir, self.rank = rank_dir, rank
        self.flush_steps, self.flush_secs, self.max_shard_bytes = flush_steps, flush_secs, max_shard_bytes
        self.backend = backend or HDF5Backend()
        self.clock = clock
        self._w: ShardWriter | None = None
        self._live = self._final = None
        self._live_ok = True        # False while a write into the live shard is under way (or failed)
        self._opened_at = 0.0
        self._n_in_shard = 0
        self._last_step: int | None = None
        self.shard_index = 0
        self.state = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "rank": rank,
                      "status": fmt.STATUS_RECORDING, "shards": 0, "steps_flushed": 0,
                      "last_step": None, "dropped": 0, "bytes": 0, "errors": [], "warnings": []}
        self._lock = threading.RLock()
        # published shards waiting for fsync, synced by a background thread (at most 2 pending)
        self._sync_cv = threading.Condition()
        self._sync_q: list[str] = []
        self._sync_busy = False
        self._sync_error: BaseException | None = None
        self._sync_thread: threading.Thread | None = None
        os.makedirs(rank_dir, exist_ok=True)
        self.write_state()

    # -- state file
    def write_state(self):
        with self._lock:
            st = dict(self.state, updated=time.time())
            fmt.write_json_atomic(os.path.join(self.rank_dir, fmt.RANK_FILE), st)

    def _open(self):
        self._live = os.path.join(self.rank_dir, fmt.shard_filename(self.shard_index, live=True))
        self._final = os.path.join(self.rank_dir, fmt.shard_filename(self.shard_index))
        self._w = self.backend.create(self._live, {"rank": self.rank, "shard_index": self.shard_index,
                                                   "created": time.time()},
                                      max_rows=self.flush_steps)
        self._opened_at = self.clock()
        self._n_in_shard = 0
        self._live_ok = True

    def write(self, records: list[StepRecord]) -> None:
        """Write records (in step order). Payloads of equal shape are batched into one append."""
        i = 0
        while i < len(records):
            if self._w is None:
                self._open()
            room = self.flush_steps - self._n_in_shard
            budget = self.max_shard_bytes - self._w.nbytes
            j, used = i, 0
            while j < len(records) and j - i < room:
                nb = sum(p[3].nbytes for p in records[j].payloads)
                if j > i and used + nb > budget:
                    break
                used += nb
                j += 1
            self._write_part(records[i:j])
            i = j
            if self._due():
                self.rotate()

    def _write_part(self, recs: list[StepRecord]):
        w = self._w
        self._live_ok = False   # until every payload of recs is in: a failure leaves the shard inconsistent
        w.append_steps({
            "step": np.array([r.step for r in recs], np.int64),
            "epoch": np.array([r.epoch for r in recs], np.int64),
            "loss": np.array([r.loss for r in recs], np.float64),
            "time": np.array([r.time for r in recs], np.float64),
            "dropped": np.array([r.dropped for r in recs], np.int32),
        })
        groups: dict[tuple, list] = {}
        for r in recs:
            for kind, lk, pk, arr, attrs in r.payloads:
                groups.setdefault((kind, lk, pk), []).append((r.step, arr, attrs))
        for (kind, lk, pk), rows in groups.items():
            if lk is None:   # packed: pk = ((layer_key, param_key), ...), rows (P, *shape), attrs a list
                steps = np.array([s for s, _, _ in rows], np.int64)
                vals = rows[0][1][None] if len(rows) == 1 else np.stack([a for _, a, _ in rows])
                w.append_packed(kind, pk, steps, vals, rows[0][2])
                continue
            if kind in fmt.MULTIROW_KINDS:   # each record brings (k, *shape): k rows of one step
                steps = np.concatenate([np.full(len(a), s, np.int64) for s, a, _ in rows])
                vals = rows[0][1] if len(rows) == 1 else np.concatenate([a for _, a, _ in rows])
                w.append(kind, lk, pk, steps, vals, rows[0][2])
                continue
            steps = np.array([s for s, _, _ in rows], np.int64)
            if len(rows) == 1:
                vals = rows[0][1][None]          # a view: no copy
            elif rows[0][1].nbytes * len(rows) <= STACK_MAX_BYTES:
                vals = np.stack([a for _, a, _ in rows])   # small tensors: one write
            else:
                vals = [a for _, a, _ in rows]   # large tensors: row by row, no extra copy
            w.append(kind, lk, pk, steps, vals, rows[0][2])
        self._n_in_shard += len(recs)
        self._last_step = recs[-1].step
        self._live_ok = True
        with self._lock:
            self.state["dropped"] += int(sum(r.dropped for r in recs))

    def _due(self) -> bool:
        if self._w is None:
            return False
        return (self._n_in_shard >= self.flush_steps or self._w.nbytes >= self.max_shard_bytes
                or (self._n_in_shard and self.clock() - self._opened_at >= self.flush_secs))

    def tick(self) -> None:
        """Close the live shard if its time is up (called by the writer when idle)."""
        if self._due():
            self.rotate()

    def time_to_deadline(self) -> float | None:
        if self._w is None or not self._n_in_shard:
            return None
        return max(0.0, self.flush_secs - (self.clock() - self._opened_at))

    def rotate(self) -> None:
        """Close the live shard (if it holds anything), publish it and update rank.json."""
        if self._w is None:
            return
        w, self._w = self._w, None
        w.close()
        if self._n_in_shard == 0:
            try:
                os.unlink(self._live)
            except OSError:
                pass
            return
        self.backend.commit(self._live, self._final)
        self.shard_index += 1
        with self._lock:
            self.state["shards"] = self.shard_index
            self.state["steps_flushed"] += self._n_in_shard
            self.state["last_step"] = self._last_step
            self.state["bytes"] += int(getattr(w, "nbytes", 0))
        self.write_state()
        self._queue_sync(self._final)

    # -- background fsync of published shards
    def _queue_sync(self, path: str) -> None:
        with self._sync_cv:
            self._raise_sync_error()
            while len(self._sync_q) + self._sync_busy >= 2:   # bounded: at most 2 shards unsynced
                self._sync_cv.wait()
                self._raise_sync_error()
            self._sync_q.append(path)
            if self._sync_thread is None:
                self._sync_thread = threading.Thread(target=self._sync_loop, name="bbdecoder-sync", daemon=True)
                self._sync_thread.start()
            self._sync_cv.notify_all()

    def _sync_loop(self) -> None:
        while True:
            with self._sync_cv:
                while not self._sync_q:
                    self._sync_cv.wait()
                path = self._sync_q.pop(0)
                if path is None:
                    return
                self._sync_busy = True
            try:
                self.backend.sync(path)
            except BaseException as e:  # noqa: BLE001 - re-raised on the writer thread
                self._sync_error = self._sync_error or e
            finally:
                with self._sync_cv:
                    self._sync_busy = False
                    self._sync_cv.notify_all()

    def _raise_sync_error(self) -> None:
        if self._sync_error is not None:
            e, self._sync_error = self._sync_error, None
            raise e

    def wait_synced(self) -> None:
        """Wait until every published shard is fsynced; raises a sync error if one happened."""
        with self._sync_cv:
            while self._sync_q or self._sync_busy:
                self._sync_cv.wait()
            self._raise_sync_error()

    def close(self, status: str = fmt.STATUS_COMPLETE) -> None:
        self.rotate()
        try:
            self.wait_synced()
        finally:
            if self._sync_thread is not None:
                with self._sync_cv:
                    self._sync_q.append(None)
                    self._sync_cv.notify_all()
                self._sync_thread.join()
                self._sync_thread = None
        with self._lock:
            if self.state["status"] != fmt.STATUS_FAILED:
                self.state["status"] = status
        self.write_state()

    def record_error(self, message: str) -> None:
        """Note a recorder failure in rank.json (status "failed")."""
        with self._lock:
            self.state["errors"].append(message[:2000])
            self.state["status"] = fmt.STATUS_FAILED
        try:
            self.write_state()
        except Exception:
            pass

    def abandon_live(self) -> None:
        """After an error: publish the live shard if it is consistent (the error came from outside a
        write, e.g. converting a tensor), so that what it holds is kept. A live shard that a write
        failed in the middle of (e.g. ``ENOSPC``: its step table would list steps whose tensors are
        partly missing), or that cannot be closed and published, is deleted instead, as a crash
        would lose it; deleting it also gives the space back on a full disk."""
        if self._w is not None and self._live_ok:
            try:
                self.rotate()
                return
            except Exception:
                pass
        w, self._w = self._w, None
        if w is not None:
            w.abort()
        if self._live is not None:   # (a shard renamed before the failure is no longer there)
            try:
                self.backend.discard(self._live)
            except Exception:
                pass
