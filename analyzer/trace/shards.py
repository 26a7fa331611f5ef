"""Shard storage: the interface both sides use, the in-memory implementation, the reader pool.

Torch-free. The recorder's background writer drives :class:`~.series.ShardSeriesWriter`; the
analyzer reads shards through :class:`ShardReader`. The HDF5 implementation is in :mod:`.hdf5`.
Every implementation passes the same round-trip suite (tests/trace/test_shards.py).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import format as fmt
from .format import TraceError

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

    def append_flat(self, kind: str, layout, steps: np.ndarray, values) -> None:
        """Append the tensors of ``layout`` (a :class:`~.packed.FlatLayout`) that arrive as one flat
        row per step: ``values`` (k, N), or a list of k rows (N,), at ``steps`` (k,); tensor i is
        ``row[start:start + numel]`` reshaped to its shape. Stored exactly as one :meth:`append` per
        tensor (the default does that)."""
        rows = values if isinstance(values, list) else None
        for lk, pk, s, n, shape, attrs in layout.entries:
            if rows is None:
                part = np.asarray(values)[:, s:s + n].reshape((-1, *shape))
            else:
                part = [np.asarray(r)[s:s + n].reshape(shape) for r in rows]
            self.append(kind, lk, pk, steps, part, attrs)

    def set_attrs(self, attrs: dict) -> None:
        """Set root attributes of the shard (scalars), written when it closes."""
        raise NotImplementedError

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

    def payload_attrs(self, kind: str, layer_key: str, param_key: str) -> dict:
        """The attributes of one payload (``layer``, ``param``, ...; ``offset`` and ``global_shape``
        for a slice of a sharded parameter). Default: none."""
        return {}

    def read_payload(self, kind: str, layer_key: str, param_key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as an array (stop - start, *shape) in the stored dtype."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_step_cols(cols: dict) -> int:
    n = None
    for c in fmt.STEP_COLUMNS:
        if c not in cols:
            raise ValueError(f"step table lacks column {c!r}")
        k = len(cols[c])
        if n is not None and k != n:
            raise ValueError("step table columns differ in length")
        n = k
    return n or 0


class ReaderPool:
    """Keeps up to ``keep`` shard readers open between uses, so that analyses which visit every shard
    once per layer or activation site do not reopen each file every time (opening a shard and finding
    its datasets cost more than reading small payloads). Once ``keep`` are kept, a reader given back
    is closed rather than one kept: analyses scan the shards in the same order again and again, so
    with more shards than ``keep`` the first ones still come from here on every scan (closing the
    least recently used would close each reader just before it is needed again, and keep none useful).

    :meth:`borrow` returns a reader to use in a ``with`` block (or ``close()`` it): a reader still
    borrowed is never closed by eviction; one given back becomes idle. Only for closed shards, which
    never change. Not for use across fork(): :meth:`close` before forking (see analyzer.report)."""

    def __init__(self, opener: Callable[[str, str], ShardReader], keep: int = 8):
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
        if len(self._idle) < self.keep:
            self._idle[key] = e[0]
        else:   # full: the readers kept stay (see the class docstring) and this one closes
            e[0].close()

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

    def payload_attrs(self, kind, layer_key, param_key):
        return self._r.payload_attrs(kind, layer_key, param_key)

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
        k = check_step_cols(cols)
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

    def set_attrs(self, attrs):
        self.shard.attrs.update(attrs)

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

    def payload_attrs(self, kind, lk, pk):
        return dict(self._e(kind, lk, pk)[2])

    def read_payload(self, kind, lk, pk, start, stop):
        return np.concatenate(self._e(kind, lk, pk)[1])[start:stop]


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
