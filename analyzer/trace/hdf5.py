"""The HDF5 implementation of the shard interface (h5py): the writer and the backend, and the HDF5
helpers both sides share. The reader is :mod:`.h5read` (imported here)."""

from __future__ import annotations

import os

import numpy as np

from . import files
from . import format as fmt
from .h5read import MAX_SPARSE_BYTES, MAX_SPARSE_RATIO, HDF5ShardReader, attr_value, error_line  # noqa: F401
from .flat_writer import FlatWriter
from .packed import encode_index
from .shards import ShardReader, ShardWriter, check_step_cols

#: Payload chunks aim at about this many bytes (several small rows share a chunk).
CHUNK_TARGET_BYTES = 1 << 20
#: Rows of one payload are stacked into one write up to this many bytes, else written row by row.
STACK_MAX_BYTES = 1 << 20
#: Rows of small payloads kept in memory by a shard writer until a chunk is full (all payloads together).
SMALL_BUFFER_BYTES = 32 << 20
#: Upper bound for a single chunk (HDF5 allows 4 GiB; keep reads reasonable).
CHUNK_MAX_BYTES = 64 << 20
#: Whether new shards store the kinds of ``format.PACKED_KINDS`` packed (``/packed/<kind>/<n>``) and of
#: ``format.FLAT_KINDS`` flat (``/flat/<kind>/<n>``): a fixed number of datasets per shard, rather than
#: one group per parameter (the layout of older traces, still read; ``HDF5Backend(packed=False)`` writes it).
PACKED = True


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

    def __init__(self, path: str, attrs: dict, max_rows: int = 1024, packed: bool = True):
        import h5py
        self._h5s = h5py.h5s
        self.path = path
        self.packed = bool(packed)
        self._groups: dict[tuple, int] = {}   # (kind, keys) -> packed group number in this shard
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
        self._flat = FlatWriter(self._f, self.max_rows, SMALL_BUFFER_BYTES,   # raw snapshots, /flat
                                lambda vds, start, block: self._write(vds, start, block))
        self.nbytes = 0
        self.n_steps = 0
        self.step_range = [None, None]

    def append_steps(self, cols):
        k = check_step_cols(cols)
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
            b = self._packed[(kind, keys)] = [[], [], attrs if isinstance(attrs, list) else list(attrs)]
        b[0].append(np.array(values, copy=True))
        b[1].append(np.asarray(steps, dtype=np.int64).reshape(-1))
        nb = int(values.nbytes)
        self._small_bytes += nb
        self.nbytes += nb
        if self._small_bytes > SMALL_BUFFER_BYTES:
            self._write_packed()

    def append_flat(self, kind, layout, steps, values):
        """Into ``/flat/<kind>/<n>`` (:class:`~.flat_writer.FlatWriter`: a few datasets per shard whatever
        the number of tensors); one dataset per tensor with ``packed=False`` or a kind not in
        ``format.FLAT_KINDS``."""
        if not self.packed or kind not in fmt.FLAT_KINDS:
            return super().append_flat(kind, layout, steps, values)
        self.nbytes += self._flat.append(kind, layout, steps, values)

    def _write_packed(self, final: bool = False) -> None:
        """Write the packed rows kept so far: for the kinds of ``format.PACKED_KINDS`` into one
        dataset per list of parameters (``/packed/<kind>/<n>``, :mod:`.packed`), else (and with
        ``packed=False``) one dataset per payload. At close (``final``) a dataset not created yet
        gets a chunk of exactly its rows."""
        for (kind, keys), (blocks, steplist, attrs) in list(self._packed.items()):
            if not blocks:
                continue
            vals = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
            steps = np.concatenate(steplist)
            self._packed[(kind, keys)] = [[], [], attrs]
            self._small_bytes -= int(vals.nbytes)
            self.nbytes -= int(vals.nbytes)   # counted again by _append_now
            if self.packed and kind in fmt.PACKED_KINDS:
                g = self._groups.setdefault((kind, keys), len(self._groups))
                key = (fmt.PACKED_GROUP, kind, str(g))
                new = key not in self._entries
                self._append_now(key, steps, vals, None, chunk_rows=len(steps) if final and new else None)
                if new:
                    self._entries[key][0].create_dataset("index", data=encode_index(kind, keys, attrs))
                continue
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

    def set_attrs(self, attrs):
        self._f.attrs.update(attrs)

    def close(self):
        if self._f is None:
            return
        try:
            self._write_packed(final=True)
            self._flat.close()
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


# --------------------------------------------------------------------------- backends

class HDF5Backend:
    """Shards are HDF5 files; the live shard carries the ``.part`` suffix until it is closed."""

    def __init__(self, packed: bool | None = None):
        self.packed = PACKED if packed is None else bool(packed)

    def create(self, path: str, attrs: dict, max_rows: int = 1024) -> ShardWriter:
        return HDF5ShardWriter(path, attrs, max_rows, packed=self.packed)

    def commit(self, live_path: str, final_path: str) -> None:
        """Publish a closed shard (a rename: from now on it survives a killed process)."""
        files.publish(live_path, final_path, durable=False)

    def sync(self, final_path: str) -> None:
        """Make a published shard durable against power loss, then drop its clean pages from the
        page cache (a recorder writing gigabytes should not evict the training job's data).
        Runs on a background thread, overlapping the next shard's writes."""
        files.fsync_file(final_path, drop_cache=True)
        files.fsync_dir(os.path.dirname(final_path))

    def open(self, path: str, display: str | None = None) -> ShardReader:
        return HDF5ShardReader(path, display)

    def discard(self, live_path: str) -> None:
        """Delete a live shard that will not be published (missing is fine)."""
        try:
            os.unlink(live_path)
        except FileNotFoundError:
            pass
