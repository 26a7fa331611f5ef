"""Packed payloads: the rows of every parameter of a shard in one dataset per group of parameters.

The gradient statistics of a step arrive as one (P, 6) array for P parameters. Stored one dataset
per parameter, a shard close creates 2P datasets and P groups (Python and HDF5 work per tensor);
packed, it creates three datasets per group of parameters, whatever P is::

    /packed/<kind>/<n>/values   (k, P, *shape)  row i of column j: payload index[j] at step steps[i]
    /packed/<kind>/<n>/steps    int64 (k,)      strictly increasing
    /packed/<kind>/<n>/index    uint8 (bytes,)  UTF-8 JSON [[layer_key, param_key, {attrs}], ...] (P entries)

Raw gradient and weight snapshots (tensors of different shapes) are stored *flat* the same way: the
tensors of a step concatenated into one row, their places listed in the index::

    /flat/<kind>/<n>/values     (k, N)          row i: the N values of every tensor at step steps[i]
    /flat/<kind>/<n>/steps      int64 (k,)      strictly increasing
    /flat/<kind>/<n>/index      uint8 (bytes,)  UTF-8 JSON [[layer_key, param_key, {attrs}, start, numel,
                                                shape], ...]: the tensor is values[:, start:start + numel]

A shard holds one group ``n`` = 0, 1, ... per distinct list of parameters (usually one: a step with
a parameter without gradient, or gradients on several devices, start another). Readers see each
column (each tensor) as the payload ``(kind, layer_key, param_key)`` of the per-parameter layout (its
rows from every group, in step order), so every analysis reads both layouts alike. Torch-free.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from typing import Any

import numpy as np

from . import format as fmt
from .format import TraceError

#: Largest index (bytes of JSON) a reader accepts: about 700,000 parameters (a 100,000-layer model's
#: 200,000 parameters write 18.5 MB; 16 MiB refused what the recorder wrote; H3)
MAX_INDEX_BYTES = 64 << 20
#: A packed ``values`` dataset of at most this many bytes is read once and kept by the reader (all
#: its columns are read one after the other).
CACHE_BYTES = 16 << 20
#: A larger one is read in blocks of consecutive columns (every row) of at most this many bytes,
#: at most BLOCKS_KEPT blocks kept per view (least recently used dropped first, and a group's
#: earlier blocks when a later one is read): readers that walk the payloads in column order (the order
#: :meth:`_GroupedView.keys` lists them) read each block once.
BLOCK_BYTES = 8 << 20
BLOCKS_KEPT = 4
#: A group whose blocks were read more than this many times its bytes (readers that jump across
#: columns) is read a column at a time from then on: bytes read stay linear in what is stored.
BLOCK_REREAD = 3
#: Chunks of a flat ``values`` dataset (k, N): at most this many bytes of one row (a column block)...
FLAT_CHUNK_COL_BYTES = 256 << 10
#: ... and about this many bytes in all (several rows of a block, when the writer has them at once).
FLAT_CHUNK_BYTES = 1 << 20
#: Most dimensions of a tensor in a flat index.
MAX_DIMS = 32

_ATTR_TYPES = (str, int, float, bool)
_ATTR_SET = frozenset(_ATTR_TYPES)   # exact types of parsed JSON scalars
_index_cache: dict = {}   # (kind, keys) or a flat layout's key -> (attrs list, encoded index)


def _plain(v):
    """A payload attribute as JSON (numpy scalars and arrays as numbers and lists)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (np.ndarray, tuple)):
        return np.asarray(v).tolist()
    return v


def _attrs_json(at) -> dict:
    return {a: _plain(v) for a, v in (at or {}).items() if v is not None}


def _dumps(entries) -> np.ndarray:
    return np.frombuffer(json.dumps(entries, separators=(",", ":")).encode("utf-8"), np.uint8)


def encode_index(kind: str, keys: tuple, attrs: list) -> np.ndarray:
    """The ``index`` dataset of a packed group: uint8 (bytes,), UTF-8 JSON of
    ``[[layer_key, param_key, {attr: value}], ...]`` (one entry per column of ``values``).
    Cached per (kind, keys) while ``attrs`` is the same list object (the recorder's plans keep theirs)."""
    hit = _index_cache.get((kind, keys))
    if hit is not None and hit[0] is attrs:
        return hit[1]
    out = _dumps([[lk, pk, _attrs_json(at)] for (lk, pk), at in zip(keys, attrs)])
    if len(_index_cache) >= 64:
        _index_cache.clear()
    _index_cache[(kind, keys)] = (attrs, out)
    return out


class FlatLayout:
    """Where each tensor of a flat row is: ``entries`` [(layer_key, param_key, start, numel, shape,
    attrs)] in row order; ``size`` the row's length N; ``sig`` what identifies the layout (tensors
    with the same keys and places share a flat group of a shard)."""

    __slots__ = ("entries", "size", "sig")

    def __init__(self, entries: list):
        self.entries = entries
        self.size = max((s + n for _, _, s, n, _, _ in entries), default=0)
        self.sig = tuple((lk, pk, s, n) for lk, pk, s, n, _, _ in entries)

    def index(self) -> np.ndarray:
        """The ``index`` dataset of a flat group: uint8 (bytes,), UTF-8 JSON of
        ``[[layer_key, param_key, {attrs}, start, numel, [shape]], ...]``. Cached per layout while the
        attribute dicts are the same objects (the recorder's targets keep theirs): a shard close
        encodes nothing new."""
        key = (self.sig, tuple(tuple(e[4]) for e in self.entries))
        attrs = [e[5] for e in self.entries]
        hit = _index_cache.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], attrs)):
            return hit[1]
        out = _dumps([[lk, pk, _attrs_json(at), int(s), int(n), [int(d) for d in shape]]
                      for lk, pk, s, n, shape, at in self.entries])
        if len(_index_cache) >= 64:
            _index_cache.clear()
        _index_cache[key] = (attrs, out)
        return out


def flat_chunks(size: int, itemsize: int, rows: int) -> tuple[int, int]:
    """Chunk shape of a flat ``values`` dataset (k, ``size``) first written ``rows`` rows at a time:
    columns in blocks of at most :data:`FLAT_CHUNK_COL_BYTES` (reading one tensor across the steps
    touches only the blocks that hold it, never the whole row of a large model), rows as many as the
    first write brings, up to :data:`FLAT_CHUNK_BYTES` a chunk (a small model's shard is a few chunks;
    rows written one at a time never leave a chunk half written)."""
    cols = max(1, min(int(size), FLAT_CHUNK_COL_BYTES // max(1, itemsize)))
    return max(1, min(int(rows), FLAT_CHUNK_BYTES // (cols * itemsize))), cols


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _flat_place(e: list, width: int, where: str) -> tuple[int, int, tuple]:
    """(start, numel, shape) of a flat index entry, checked against the row's ``width`` before any read."""
    if len(e) != 6 or not _int(e[3]) or not _int(e[4]) or not isinstance(e[5], list) \
            or len(e[5]) > MAX_DIMS or not all(_int(d) for d in e[5]):
        raise TraceError(f"{where}: index entry for {e[0]}/{e[1]} is not [layer_key, param_key, attrs, start, "
                         "numel, shape] with non-negative integers")
    start, n, shape = e[3], e[4], tuple(e[5])
    if int(np.prod(shape, dtype=np.int64)) != n or start + n > width:
        raise TraceError(f"{where}: index places {e[0]}/{e[1]} ({n} values of shape {shape}) at {start}, "
                         f"outside rows of {width} values")
    return start, n, shape


#: Decoded indexes are kept by their bytes (the shards of a run usually repeat one index: every shard of
#: a 20-shard run would decode it again each time an analysis opens it): indexes of at most this many
#: bytes, this many in all (least recently used dropped first). The decoded entries are shared: their
#: integer-list attributes are read-only arrays, and readers hand out copies of the attribute dicts.
INDEX_MEMO_BYTES = 1 << 20
INDEX_MEMO_TOTAL = 16 << 20
_decoded: "OrderedDict[tuple, list]" = OrderedDict()
_decoded_bytes = [0]


def _decode_index(raw: np.ndarray, cols: int | None, where: str, width: int | None = None) -> list:
    """The entries of an index: ``[(layer_key, param_key, attrs)]`` (packed: exactly ``cols``
    entries), or with ``width`` (flat: rows of that many values) ``[(layer_key, param_key, attrs,
    (start, numel, shape))]``. Each distinct key is checked once (an index of 200,000 parameters
    names 100,000 layers and two parameter keys). The same bytes with the same ``cols`` and ``width``
    give the same entries: small indexes are decoded once (see :data:`INDEX_MEMO_BYTES`); a bad
    index raises every time."""
    b = np.asarray(raw, np.uint8).tobytes()
    key = (b, cols, width)
    hit = _decoded.get(key)
    if hit is not None:
        _decoded.move_to_end(key)
        return hit
    out = _decode(b, cols, where, width)
    if len(b) <= INDEX_MEMO_BYTES:
        _decoded[key] = out
        _decoded_bytes[0] += len(b)
        while _decoded_bytes[0] > INDEX_MEMO_TOTAL:
            _decoded_bytes[0] -= len(_decoded.popitem(last=False)[0][0])
    return out


def _decode(b: bytes, cols: int | None, where: str, width: int | None) -> list:
    try:
        entries = json.loads(b.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TraceError(f"{where}: index is not UTF-8 JSON ({str(e)[:100]})") from None
    if not isinstance(entries, list) or (cols is not None and len(entries) != cols):
        raise TraceError(f"{where}: index lists {len(entries) if isinstance(entries, list) else 'no'} "
                         f"parameters for {cols} columns")
    out, seen, safe, same = [], set(), {}, {}

    def key_ok(k) -> bool:   # JSON gives exact types: str, never a subclass
        if type(k) is not str:
            return False
        ok = safe.get(k)
        if ok is None:
            ok = safe[k] = fmt.is_safe_key(k)
        return ok

    for e in entries:
        if type(e) is not list or len(e) < 2 or not (key_ok(e[0]) and key_ok(e[1])) \
                or (width is None and len(e) not in (2, 3)):
            raise TraceError(f"{where}: index entry {str(e)[:80]!r} is not [layer_key, param_key, attrs] "
                             "with valid keys")
        attrs = e[2] if len(e) >= 3 else {}
        if type(attrs) is not dict:
            bad = True
        else:
            lists = [a for a, v in attrs.items() if type(v) not in _ATTR_SET]
            bad = any(type(attrs[a]) is not list or not all(isinstance(x, int) for x in attrs[a]) for a in lists)
        if bad:
            raise TraceError(f"{where}: index entry for {e[0]}/{e[1]} has attributes that are not scalars "
                             "or integer lists")
        key = (same.setdefault(e[0], e[0]), same.setdefault(e[1], e[1]))   # one str object per distinct key
        if key in seen:
            raise TraceError(f"{where}: index lists {e[0]}/{e[1]} twice")
        seen.add(key)
        for a in lists:   # the parsed dict is this entry's own: integer lists become arrays in place
            attrs[a] = np.asarray(attrs[a], np.int64)
            attrs[a].flags.writeable = False   # shared by every reader of these index bytes
        item = (key[0], key[1], attrs)
        out.append(item if width is None else item + (_flat_place(e, width, where),))
    return out


class _GroupedView:
    """Payloads stored in columns of several groups (datasets with a row per step): which group and
    column hold each payload, its attributes, and its rows merged in step order. Subclasses say how
    a group's column is read (:meth:`_column`) and what shape a row of a payload has."""

    def __init__(self, where: str):
        self._vals: list = []
        self._steps: list[np.ndarray] = []
        self._cache: dict[int, np.ndarray] = {}
        self._geom: dict[int, tuple[int, int, int]] = {}
        self._blks: dict[tuple[int, int], np.ndarray] = {}   # (group, first column) -> block, LRU order
        self._blk_read: dict[int, int] = {}   # group -> bytes read in blocks
        # key -> group << 32 | column (one group, a packed column) or [(group, column)]; attributes decoded
        # when asked for (:meth:`attrs`), not kept (100,000 layers: about 140 MB less per open shard)
        self._cols: dict[tuple[str, str], Any] = {}
        self._index: list = []   # per group: (index dataset, columns, message prefix, width)
        self._attrs: dict[int, dict] = {}   # group -> {key: attributes}, decoded on demand
        self._merged: dict[tuple[str, str], tuple[np.ndarray, np.ndarray | None]] = {}
        self._where = where

    @staticmethod
    def _check(v, s, ix, w: str, ndim: str) -> None:
        if s.ndim != 1 or ix.ndim != 1 or v.shape[0] != s.shape[0]:
            raise TraceError(f"{w}: values {tuple(v.shape)}, steps {tuple(s.shape)}, index {tuple(ix.shape)} "
                             f"do not fit {ndim}, (k,), (bytes,)")
        if ix.dtype != np.uint8 or ix.shape[0] > MAX_INDEX_BYTES:
            raise TraceError(f"{w}: index must be uint8 of at most {MAX_INDEX_BYTES:,} bytes, "
                             f"not {ix.dtype} {tuple(ix.shape)}")

    def _add(self, v, s, entries, index: tuple) -> int:
        """A group: ``entries`` [(layer_key, param_key, column)]; ``index``: :meth:`attrs` decodes it."""
        gi = len(self._vals)
        self._vals.append(v)
        self._steps.append(np.asarray(s[()], np.int64))
        self._index.append(index)
        for lk, pk, col in entries:
            new = (lk, pk) not in self._cols
            self._cols[(lk, pk)] = (gi << 32 | col) if new and type(col) is int and 0 <= col < 1 << 32 else \
                ([] if new else self._places((lk, pk))) + [(gi, col)]
        return gi

    def _places(self, key) -> list:
        """[(group, column)] that hold ``key``, in group order."""
        got = self._cols[key]
        return [(got >> 32, got & 0xFFFFFFFF)] if type(got) is int else got

    def keys(self) -> list[tuple[str, str]]:
        """``(layer_key, param_key)`` of every packed payload, in index order."""
        return list(self._cols)

    def __contains__(self, key) -> bool:
        return key in self._cols

    def _order(self, key) -> tuple[np.ndarray, np.ndarray | None]:
        """(steps in increasing order, the permutation of the groups' concatenated rows or None)."""
        cols = self._places(key)
        if len(cols) == 1:   # one group: its steps (increasing, checked by the reader), nothing kept per key
            return self._steps[cols[0][0]], None
        got = self._merged.get(key)
        if got is None:
            parts = [self._steps[g] for g, _ in cols]
            steps = parts[0] if len(parts) == 1 else np.concatenate(parts)
            order = None
            if len(parts) > 1:
                order = np.argsort(steps, kind="stable")
                steps = steps[order]
            got = self._merged[key] = (steps, order)
        return got

    def _shape(self, key) -> tuple:
        raise NotImplementedError

    def info(self, key) -> tuple[int, tuple, int]:
        rows = len(self._order(key)[0])
        return rows, self._shape(key), max(1, rows)

    def steps(self, key) -> np.ndarray:
        return self._order(key)[0].copy()

    def attrs(self, key) -> dict:
        g = self._places(key)[0][0]   # the first group's, as the payload's
        got = self._attrs.get(g)
        if got is None:
            ix, cols, where, width = self._index[g]
            got = self._attrs[g] = {(e[0], e[1]): e[2] for e in _decode_index(ix[()], cols, where, width)}
        return dict(got[key])

    def _geometry(self, g: int) -> tuple[int, int, int]:
        """(rows, bytes in all, bytes of one column (every row, dim 1)) of group ``g``'s values,
        as declared (checked against what the file stores when the group was opened)."""
        got = self._geom.get(g)
        if got is None:
            v = self._vals[g]
            shape, item = tuple(int(d) for d in v.shape), v.dtype.itemsize
            col = shape[0] * math.prod(shape[2:]) * item
            got = self._geom[g] = (shape[0], col * (shape[1] if len(shape) > 1 else 1), col)
        return got

    def _whole(self, g: int):
        """Group ``g``'s values read once and kept if small enough (else None)."""
        whole = self._cache.get(g)
        if whole is None and self._geometry(g)[1] <= CACHE_BYTES:
            whole = self._cache[g] = self._vals[g][()]
        return whole

    def _block(self, g: int, j: int):
        """(block, first column) of group ``g``: every row of the consecutive columns around column
        ``j`` (dim 1), at most :data:`BLOCK_BYTES` of them, read at once (the group's declared size
        was checked against what the file stores when it was opened). None where one column alone
        exceeds the budget, or the group's blocks were read :data:`BLOCK_REREAD` times over."""
        k, nbytes, col = self._geometry(g)
        width = BLOCK_BYTES // max(1, col)
        if width < 2 or self._blk_read.get(g, 0) > BLOCK_REREAD * nbytes:
            return None, 0
        lo = j - j % width
        block = self._blks.pop((g, lo), None)
        if block is None:   # a reader walking forward is done with the group's earlier blocks
            for key in [key for key in self._blks if key[0] == g and key[1] < lo]:
                del self._blks[key]
            while len(self._blks) >= BLOCKS_KEPT:
                self._blks.pop(next(iter(self._blks)))
            block = self._vals[g][:, lo:lo + width]
            self._blk_read[g] = self._blk_read.get(g, 0) + int(block.nbytes)
        self._blks[(g, lo)] = block   # most recently used last
        return block, lo

    def _column(self, g: int, col, rows: slice) -> np.ndarray:
        raise NotImplementedError

    def _cached(self, a: np.ndarray) -> bool:
        """Whether ``a`` is a view of a block or group kept here (a caller must get a copy), not read for it."""
        while isinstance(a.base, np.ndarray):
            a = a.base
        return any(a is b for b in (*self._blks.values(), *self._cache.values()))

    def read(self, key, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the payload ``key`` in step order, (stop - start, *shape)."""
        cols = self._places(key)
        try:
            if len(cols) == 1:   # one group: only the rows asked for (copied only out of what is kept here)
                a = self._column(*cols[0], slice(start, stop))
                return np.array(a) if self._cached(a) else a
            parts = [self._column(g, c, slice(None)) for g, c in cols]
        except TraceError:
            raise
        except Exception as e:
            raise TraceError(f"{self._where}: unreadable ({str(e).strip()[:100]})") from None
        rows = np.concatenate(parts)
        order = self._order(key)[1]
        if order is not None:
            rows = rows[order]
        return np.array(rows[start:stop])


class PackedView(_GroupedView):
    """The packed groups of one kind in one open shard, as per-parameter payloads.

    Args:
        groups: [(values dataset (k, P, *shape), steps dataset (k,), index dataset (bytes,))], each
            already checked as a real numeric dataset of sane declared size.
        where: the group path prefix for messages (``"<shard>: packed/<kind>"``).
    """

    def __init__(self, groups: list, where: str):
        super().__init__(where)
        shape = None
        for gi, (v, s, ix) in enumerate(groups):
            w = f"{where}/{gi}"
            if v.ndim < 2:
                raise TraceError(f"{w}: values {tuple(v.shape)}, steps {tuple(s.shape)}, index {tuple(ix.shape)} "
                                 "do not fit (k, P, ...), (k,), (bytes,)")
            self._check(v, s, ix, w, "(k, P, ...)")
            if shape is not None and tuple(v.shape[2:]) != shape:
                raise TraceError(f"{w}: rows of shape {tuple(v.shape[2:])}, another group's are {shape}")
            shape = tuple(v.shape[2:])
            entries = _decode_index(ix[()], int(v.shape[1]), w)
            self._add(v, s, [(lk, pk, j) for j, (lk, pk, _) in enumerate(entries)], (ix, int(v.shape[1]), w, None))
        self.shape = shape or ()

    def _shape(self, key) -> tuple:
        return self.shape

    def _column(self, g: int, j: int, rows: slice) -> np.ndarray:
        whole = self._whole(g)
        if whole is not None:
            return whole[rows, j]
        k = self._geometry(g)[0]
        if rows.indices(k) == (0, k, 1):
            block, lo = self._block(g, j)   # every row: from a block of columns (callers walk columns in order)
            if block is not None:
                return block[:, j - lo]
        return self._vals[g][rows, j]


class FlatView(_GroupedView):
    """The flat groups of one kind (raw snapshots) in one open shard, as per-tensor payloads.

    Args:
        groups: [(values dataset (k, N), steps dataset (k,), index dataset (bytes,))], each already
            checked as a real numeric dataset of sane declared size; every index entry's place is
            checked against N here, before anything but the index is read.
        where: the group path prefix for messages (``"<shard>: flat/<kind>"``).
    """

    def __init__(self, groups: list, where: str):
        super().__init__(where)
        self._shapes: dict[tuple[str, str], tuple] = {}
        for gi, (v, s, ix) in enumerate(groups):
            w = f"{where}/{gi}"
            if v.ndim != 2:
                raise TraceError(f"{w}: values {tuple(v.shape)}, steps {tuple(s.shape)}, index {tuple(ix.shape)} "
                                 "do not fit (k, N), (k,), (bytes,)")
            self._check(v, s, ix, w, "(k, N)")
            entries = _decode_index(ix[()], None, w, width=int(v.shape[1]))
            for lk, pk, _, (_, _, shape) in entries:
                if self._shapes.setdefault((lk, pk), shape) != shape:
                    raise TraceError(f"{w}: {lk}/{pk} has shape {shape}, in another group {self._shapes[(lk, pk)]}")
            self._add(v, s, [(lk, pk, place) for lk, pk, _, place in entries], (ix, None, w, int(v.shape[1])))

    def _shape(self, key) -> tuple:
        return self._shapes[key]

    def _column(self, g: int, place: tuple, rows: slice) -> np.ndarray:
        start, n, shape = place
        whole = self._whole(g)
        block = whole[rows, start:start + n] if whole is not None else self._vals[g][rows, start:start + n]
        return block.reshape((block.shape[0], *shape))


def open_view(get, check, kind: str, where: str, root: str = fmt.PACKED_GROUP) -> _GroupedView | None:
    """The packed (``root`` = ``format.PACKED_GROUP``) or flat (``format.FLAT_GROUP``) groups of
    ``kind`` of an open shard as a :class:`PackedView` or :class:`FlatView` (None if it has none).

    Args:
        get: ``get(path)`` -> the HDF5 object at ``path`` reached through hard links only (raises
            :class:`TraceError` for a missing object or a link).
        check: ``check(dataset, what)`` raises :class:`TraceError` for a dataset that is not real
            numeric data of sane declared size (see ``HDF5ShardReader._check_dataset``).
        where: prefix of messages (``"corrupt shard <name>"``).
    """
    node = get(root)
    try:
        present = kind in node
    except Exception:
        present = False
    if not present:
        return None
    base = f"{root}/{kind}"
    try:
        names = sorted(get(base).keys(), key=lambda n: (len(n), n))
    except TraceError:
        raise
    except Exception as e:
        raise TraceError(f"{where}: unreadable {base} ({str(e)[:100]})") from None
    groups = []
    for n in names:
        ds = [get(f"{base}/{n}/{d}") for d in ("values", "steps", "index")]
        for d, name in zip(ds, ("values", "steps", "index")):
            if not hasattr(d, "dtype"):
                raise TraceError(f"{where}: {base}/{n}/{name} is not a dataset")
            check(d, f"{base}/{n}/{name}")
        groups.append(ds)
    if not groups:
        return None
    try:
        return (FlatView if root == fmt.FLAT_GROUP else PackedView)(groups, f"{where}: {base}")
    except TraceError:
        raise
    except Exception as e:   # h5py read errors of steps or index
        raise TraceError(f"{where}: unreadable {base} ({str(e).strip()[:100]})") from None
