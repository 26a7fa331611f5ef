"""Packed payloads: the rows of every parameter of a shard in one dataset per group of parameters.

The gradient statistics of a step arrive as one (P, 6) array for P parameters. Stored one dataset
per parameter, a shard close creates 2P datasets and P groups (Python and HDF5 work per tensor);
packed, it creates three datasets per group of parameters, whatever P is::

    /packed/<kind>/<n>/values   (k, P, *shape)  row i of column j: payload index[j] at step steps[i]
    /packed/<kind>/<n>/steps    int64 (k,)      strictly increasing
    /packed/<kind>/<n>/index    uint8 (bytes,)  UTF-8 JSON [[layer_key, param_key, {attrs}], ...] (P entries)

A shard holds one group ``n`` = 0, 1, ... per distinct list of parameters (usually one: a step with
a parameter without gradient, or gradients on several devices, start another). Readers see each
column as the payload ``(kind, layer_key, param_key)`` of the per-parameter layout (its rows from
every group, in step order), so every analysis reads both layouts alike. Torch-free.
"""

from __future__ import annotations

import json

import numpy as np

from . import format as fmt
from .format import TraceError

#: Largest index (bytes of JSON) a reader accepts: about 100,000 parameters of long names.
MAX_INDEX_BYTES = 16 << 20
#: A packed ``values`` dataset of at most this many bytes is read once and kept by the reader (all
#: its columns are read one after the other); a larger one is read a column at a time.
CACHE_BYTES = 16 << 20

_ATTR_TYPES = (str, int, float, bool)
_index_cache: dict = {}   # (kind, keys) -> (attrs list, encoded index): a shard close encodes nothing new


def _plain(v):
    """A payload attribute as JSON (numpy scalars and arrays as numbers and lists)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (np.ndarray, tuple)):
        return np.asarray(v).tolist()
    return v


def encode_index(kind: str, keys: tuple, attrs: list) -> np.ndarray:
    """The ``index`` dataset of a packed group: uint8 (bytes,), UTF-8 JSON of
    ``[[layer_key, param_key, {attr: value}], ...]`` (one entry per column of ``values``).
    Cached per (kind, keys) while ``attrs`` is the same list object (the recorder's plans keep theirs)."""
    hit = _index_cache.get((kind, keys))
    if hit is not None and hit[0] is attrs:
        return hit[1]
    entries = [[lk, pk, {a: _plain(v) for a, v in (at or {}).items() if v is not None}]
               for (lk, pk), at in zip(keys, attrs)]
    out = np.frombuffer(json.dumps(entries, separators=(",", ":")).encode("utf-8"), np.uint8)
    if len(_index_cache) >= 64:
        _index_cache.clear()
    _index_cache[(kind, keys)] = (attrs, out)
    return out


def _decode_index(raw: np.ndarray, cols: int, where: str) -> list[tuple[str, str, dict]]:
    try:
        entries = json.loads(np.asarray(raw, np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TraceError(f"{where}: index is not UTF-8 JSON ({str(e)[:100]})") from None
    if not isinstance(entries, list) or len(entries) != cols:
        raise TraceError(f"{where}: index lists {len(entries) if isinstance(entries, list) else 'no'} "
                         f"parameters for {cols} columns")
    out, seen = [], set()
    for e in entries:
        if not isinstance(e, list) or len(e) not in (2, 3) or not all(fmt.is_safe_key(k) for k in e[:2]):
            raise TraceError(f"{where}: index entry {str(e)[:80]!r} is not [layer_key, param_key, attrs] "
                             "with valid keys")
        attrs = e[2] if len(e) == 3 else {}
        if not isinstance(attrs, dict) or not all(
                isinstance(v, _ATTR_TYPES) or (isinstance(v, list) and all(isinstance(x, int) for x in v))
                for v in attrs.values()):
            raise TraceError(f"{where}: index entry for {e[0]}/{e[1]} has attributes that are not scalars "
                             "or integer lists")
        if (e[0], e[1]) in seen:
            raise TraceError(f"{where}: index lists {e[0]}/{e[1]} twice")
        seen.add((e[0], e[1]))
        out.append((e[0], e[1], {a: (np.asarray(v, np.int64) if isinstance(v, list) else v)
                                 for a, v in attrs.items()}))
    return out


class PackedView:
    """The packed groups of one kind in one open shard, as per-parameter payloads.

    Args:
        groups: [(values dataset (k, P, *shape), steps dataset (k,), index dataset (bytes,))], each
            already checked as a real numeric dataset of sane declared size.
        where: the group path prefix for messages (``"<shard>: packed/<kind>"``).
    """

    def __init__(self, groups: list, where: str):
        self._vals: list = []
        self._steps: list[np.ndarray] = []
        self._cache: dict[int, np.ndarray] = {}
        self._cols: dict[tuple[str, str], list[tuple[int, int]]] = {}   # key -> [(group, column)]
        self._attrs: dict[tuple[str, str], dict] = {}
        self._merged: dict[tuple[str, str], tuple[np.ndarray, np.ndarray | None]] = {}
        self._where = where
        shape = None
        for gi, (v, s, ix) in enumerate(groups):
            w = f"{where}/{gi}"
            if v.ndim < 2 or s.ndim != 1 or ix.ndim != 1 or v.shape[0] != s.shape[0]:
                raise TraceError(f"{w}: values {tuple(v.shape)}, steps {tuple(s.shape)}, index {tuple(ix.shape)} "
                                 "do not fit (k, P, ...), (k,), (bytes,)")
            if ix.dtype != np.uint8 or ix.shape[0] > MAX_INDEX_BYTES:
                raise TraceError(f"{w}: index must be uint8 of at most {MAX_INDEX_BYTES:,} bytes, "
                                 f"not {ix.dtype} {tuple(ix.shape)}")
            if shape is not None and tuple(v.shape[2:]) != shape:
                raise TraceError(f"{w}: rows of shape {tuple(v.shape[2:])}, another group's are {shape}")
            shape = tuple(v.shape[2:])
            entries = _decode_index(ix[()], int(v.shape[1]), w)
            self._vals.append(v)
            self._steps.append(np.asarray(s[()], np.int64))
            for j, (lk, pk, attrs) in enumerate(entries):
                self._cols.setdefault((lk, pk), []).append((gi, j))
                self._attrs.setdefault((lk, pk), attrs)
        self.shape = shape or ()

    def keys(self) -> list[tuple[str, str]]:
        """``(layer_key, param_key)`` of every packed payload, in index order."""
        return list(self._cols)

    def __contains__(self, key) -> bool:
        return key in self._cols

    def _order(self, key) -> tuple[np.ndarray, np.ndarray | None]:
        """(steps in increasing order, the permutation of the groups' concatenated rows or None)."""
        got = self._merged.get(key)
        if got is None:
            parts = [self._steps[g] for g, _ in self._cols[key]]
            steps = parts[0] if len(parts) == 1 else np.concatenate(parts)
            order = None
            if len(parts) > 1:
                order = np.argsort(steps, kind="stable")
                steps = steps[order]
            got = self._merged[key] = (steps, order)
        return got

    def info(self, key) -> tuple[int, tuple, int]:
        rows = len(self._order(key)[0])
        return rows, self.shape, max(1, rows)

    def steps(self, key) -> np.ndarray:
        return self._order(key)[0].copy()

    def attrs(self, key) -> dict:
        return dict(self._attrs[key])

    def _column(self, g: int, j: int) -> np.ndarray:
        v = self._vals[g]
        whole = self._cache.get(g)
        if whole is None and int(v.size) * v.dtype.itemsize <= CACHE_BYTES:
            whole = self._cache[g] = v[()]
        return whole[:, j] if whole is not None else v[:, j]

    def read(self, key, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of the payload ``key`` in step order, (stop - start, *shape)."""
        try:
            parts = [self._column(g, j) for g, j in self._cols[key]]
        except Exception as e:
            raise TraceError(f"{self._where}: unreadable ({str(e).strip()[:100]})") from None
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        order = self._order(key)[1]
        if order is not None:
            rows = rows[order]
        return np.array(rows[start:stop])


def open_view(get, check, kind: str, where: str) -> PackedView | None:
    """The packed groups of ``kind`` of an open shard as a :class:`PackedView` (None if it has none).

    Args:
        get: ``get(path)`` -> the HDF5 object at ``path`` reached through hard links only (raises
            :class:`TraceError` for a missing object or a link).
        check: ``check(dataset, what)`` raises :class:`TraceError` for a dataset that is not real
            numeric data of sane declared size (see ``HDF5ShardReader._check_dataset``).
        where: prefix of messages (``"corrupt shard <name>"``).
    """
    root = get(fmt.PACKED_GROUP)
    try:
        present = kind in root
    except Exception:
        present = False
    if not present:
        return None
    base = f"{fmt.PACKED_GROUP}/{kind}"
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
        return PackedView(groups, f"{where}: {base}")
    except TraceError:
        raise
    except Exception as e:   # h5py read errors of steps or index
        raise TraceError(f"{where}: unreadable {base} ({str(e).strip()[:100]})") from None
