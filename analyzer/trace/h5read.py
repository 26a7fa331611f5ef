"""Reading a closed shard (HDF5, h5py) from a stranger: every object reached through hard links only,
every dataset checked (:mod:`.h5safe`) before its first read, and the verdicts remembered.

A shard that passed the checks once is not checked again while it is unchanged: the verdicts are
kept per file identity (device, inode, size, modification and change times of the open file, read
with ``fstat``) for the life of the process, so the catalogue's scan and every later pass over the
same closed shard (several readers, forked workers) check each object once. A file written after it
was checked has new times (the kernel sets them on every write; the change time cannot be set by a
user) and is checked again.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from . import format as fmt
from .format import TraceError
from .h5safe import hard_child, no_filter_plugins, storage_problem
from .packed import open_view
from .shards import ShardReader

#: A dataset of a shard may declare more bytes than the file stores for it (compression, unwritten
#: fill values) only up to this ratio, beyond MAX_SPARSE_BYTES: a sparse dataset of absurd declared
#: size is refused instead of being read (terabytes of fill values).
MAX_SPARSE_RATIO = 1000
MAX_SPARSE_BYTES = 64 << 20
#: Files whose verdicts are remembered (least recently opened forgotten first) ...
VERDICT_FILES = 256
#: ... and paths remembered per file (beyond it, objects are checked each time a reader meets them).
VERDICT_PATHS = 1 << 17
#: Groups a reader keeps open once reached through hard links (then cleared): the walk to each
#: payload starts at its layer's group, not at the root.
GROUPS_KEPT = 4096

_verdicts: "OrderedDict[tuple, set]" = OrderedDict()   # file identity -> paths checked (links and storage)
#: file identity -> the root attributes of a shard that passed the format check (read once per unchanged file)
_root_attrs: "OrderedDict[tuple, dict]" = OrderedDict()


def file_identity(fd: int) -> tuple | None:
    """(device, inode, size, mtime ns, ctime ns) of an open file, or None where fstat fails."""
    try:
        st = os.fstat(fd)
    except (OSError, TypeError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def forget_verdicts() -> None:
    """Forget every remembered verdict (the next reader of each file checks everything again)."""
    _verdicts.clear()
    _root_attrs.clear()


def verdicts() -> dict:
    """A copy of the remembered verdicts (file identity -> paths that passed), to hand to another
    process (a forked worker's checks, kept by its parent: :func:`add_verdicts`)."""
    return {k: set(v) for k, v in _verdicts.items()}


def add_verdicts(more: dict) -> None:
    """Remember verdicts made by another process on the same files (see :func:`verdicts`)."""
    for ident, paths in more.items():
        known = _verdicts.setdefault(ident, set())
        if len(known) < VERDICT_PATHS:
            known.update(paths)
    while len(_verdicts) > VERDICT_FILES:
        _verdicts.popitem(last=False)


class HDF5ShardReader(ShardReader):
    """Opens a closed shard read-only and validates its structure lazily."""

    def __init__(self, path: str, display: str | None = None):
        import h5py
        no_filter_plugins()
        self.path = path
        self._disp = display or path
        self._pairs: dict = {}
        self._views: dict = {}   # kind -> PackedView or None (no packed groups of that kind)
        self._groups: dict = {}  # path -> h5py Group reached through hard links only
        self._known: set = set()  # paths whose links and storage passed the checks (this file's verdicts)
        try:
            # no chunk cache: reads are whole chunk-aligned blocks, and a reader kept open in a
            # ReaderPool must not hold up to 1 MB of cached chunks per dataset it has touched
            self._f = h5py.File(path, "r", locking=False, rdcc_nbytes=0)
        except Exception as e:  # OSError for truncated / random files
            raise TraceError(f"corrupt or truncated shard {self._disp}: {error_line(e)}") from None
        try:
            ident = file_identity(self._f.id.get_vfd_handle())
        except Exception:   # a driver without a file descriptor: nothing remembered
            ident = None
        attrs = _root_attrs.get(ident) if ident is not None else None
        try:
            self.attrs = dict(attrs) if attrs is not None else {k: attr_value(v) for k, v in self._f.attrs.items()}
        except Exception as e:
            self.close()
            raise TraceError(f"corrupt shard {self._disp}: unreadable attributes ({error_line(e)})") from None
        tag = self.attrs.get("format")
        if not isinstance(tag, str) or tag != fmt.FORMAT_NAME:
            self.close()
            raise TraceError(f"{self._disp} is not a bbdecoder shard")
        try:
            fmt.check_version(self.attrs.get("format_version"), self._disp)
        except TraceError:
            self.close()
            raise
        if ident is not None:
            if attrs is None:   # valid: kept for the next reader of this unchanged file
                _root_attrs[ident] = dict(self.attrs)
                while len(_root_attrs) > VERDICT_FILES:
                    _root_attrs.popitem(last=False)
            self._known = _verdicts.pop(ident, None) or set()
            _verdicts[ident] = self._known
            while len(_verdicts) > VERDICT_FILES:
                _verdicts.popitem(last=False)

    def _remember(self, *paths: str) -> None:
        if len(self._known) < VERDICT_PATHS:
            self._known.update(paths)

    def _get(self, path):
        """The object at ``path``, reached through hard links only: a soft or external link in a
        trace could lead anywhere (another file, outside the run), so it is refused. Groups reached
        are kept (:data:`GROUPS_KEPT`), so each link is tested once per reader."""
        got = self._groups.get(path)
        if got is not None:
            return got
        parts = [q for q in path.split("/") if q]
        node, i = self._f, 0
        for k in range(len(parts) - 1, 0, -1):   # start at the deepest group already reached
            g = self._groups.get("/".join(parts[:k]))
            if g is not None:
                node, i = g, k
                break
        try:
            for j in range(i, len(parts)):
                node = hard_child(node, parts[j])
                if node is None:
                    raise KeyError(f"no {parts[j]!r}")
                if j < len(parts) - 1 or not hasattr(node, "dtype"):
                    if len(self._groups) >= GROUPS_KEPT:
                        self._groups.clear()
                    self._groups["/".join(parts[:j + 1])] = node
            return node
        except TraceError as e:
            raise TraceError(f"corrupt shard {self._disp}: {path!r}: {e}") from None
        except Exception as e:
            raise TraceError(f"corrupt shard {self._disp}: missing or unreadable {path!r} ({error_line(e)})") from None

    def _check_dataset(self, ds, what: str, path: str | None = None) -> None:
        """Refuse a dataset that is not a real numeric array, or that declares far more data than the
        file stores (a sparse dataset of absurd size: reading it would exhaust memory or time).
        ``path``: where the dataset was reached through hard links; its verdict is remembered."""
        if path is not None and path in self._known:
            return
        try:
            kind = ds.dtype.kind
        except Exception as e:
            raise TraceError(f"corrupt shard {self._disp}: unreadable {what} ({error_line(e)})") from None
        if kind not in "biuf":
            raise TraceError(f"corrupt shard {self._disp}: {what} holds {ds.dtype}, not numeric (real) values")
        try:   # other files, filters, chunk sizes, compressed chunks (decompression bombs), a declared
            # size beyond MAX_SPARSE_BYTES and MAX_SPARSE_RATIO times what is stored: see h5safe
            why = storage_problem(ds, dense=False, max_ratio=MAX_SPARSE_RATIO, slack=MAX_SPARSE_BYTES)
        except Exception as e:
            why = f"has an unreadable layout ({error_line(e)})"
        if why:
            raise TraceError(f"corrupt shard {self._disp}: {what} {why}, refused in a trace")
        if path is not None:
            self._remember(path)

    def steps(self):
        g = self._get("steps")
        out = {}
        try:
            for c in fmt.STEP_COLUMNS:
                if c not in g:
                    raise TraceError(f"corrupt shard {self._disp}: step table lacks {c!r}")
                ds = hard_child(g, c)
                if not hasattr(ds, "dtype") or ds.ndim != 1:
                    raise TraceError(f"corrupt shard {self._disp}: step table column {c!r} is not 1-D")
                self._check_dataset(ds, f"step table column {c!r}")
                out[c] = ds[()]
        except TraceError:
            raise
        except Exception as e:
            raise TraceError(f"corrupt shard {self._disp}: unreadable step table ({error_line(e)})") from None
        lens = {len(v) for v in out.values()}
        if len(lens) != 1 or any(v.ndim != 1 for v in out.values()):
            raise TraceError(f"corrupt shard {self._disp}: step table columns differ in length")
        return out

    def payloads(self, kind):
        view = self._view(kind)
        out = []
        try:
            for lk, lg in (self._f[kind].items() if kind in self._f else ()):
                for pk in lg.keys():
                    out.append((lk, pk))
        except Exception as e:
            raise TraceError(f"corrupt shard {self._disp}: unreadable {kind} index ({error_line(e)})") from None
        if view is not None:
            both = set(out) & set(view.keys())
            if both:
                lk, pk = sorted(both)[0]
                raise TraceError(f"corrupt shard {self._disp}: {kind}/{lk}/{pk} is stored both packed and on its own")
            out += view.keys()
        return out

    def _view(self, kind, key=None):
        """The :class:`~.packed.PackedView` of ``kind`` (None if the shard stores none packed); with
        ``key``, the view only if it holds that payload."""
        if kind not in self._views:
            self._views[kind] = None
            root = fmt.PACKED_GROUP if kind in fmt.PACKED_KINDS else fmt.FLAT_GROUP if kind in fmt.FLAT_KINDS else None
            if root is not None and root in self._f:
                self._views[kind] = open_view(self._get, lambda ds, p: self._check_dataset(ds, p, p), kind,
                                              f"corrupt shard {self._disp}", root)
        v = self._views[kind]
        return v if key is None or v is None or key in v else None

    def _pair(self, kind, lk, pk, got=None):
        """The ``values`` and ``steps`` datasets of a payload (``got``: already opened), rows matched."""
        if got is not None:
            v, s = got
        else:
            g = self._get(fmt.payload_path(kind, lk, pk))
            try:
                v, s = hard_child(g, "values"), hard_child(g, "steps")
            except TraceError as e:
                raise TraceError(f"corrupt shard {self._disp}: {kind}/{lk}/{pk}: {e}") from None
            except Exception:
                v = s = None
        if v is None or s is None:
            raise TraceError(f"corrupt shard {self._disp}: {kind}/{lk}/{pk} lacks values or steps")
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
        base = fmt.payload_path(kind, lk, pk)
        vp, sp = f"{base}/values", f"{base}/steps"
        if vp in self._known and sp in self._known:   # this unchanged file's links and storage passed
            try:
                v, s = self._f[vp], self._f[sp]
            except Exception as e:
                raise TraceError(f"corrupt shard {self._disp}: {kind}/{lk}/{pk}: unreadable ({error_line(e)})") from None
            v, s = self._pair(kind, lk, pk, (v, s))
        else:
            v, s = self._pair(kind, lk, pk)
            self._check_dataset(v, f"{kind}/{lk}/{pk}/values")
            self._check_dataset(s, f"{kind}/{lk}/{pk}/steps")
            self._remember(vp, sp)
        self._pairs[key] = (v, s)
        return v, s

    def payload_info(self, kind, lk, pk):
        if (view := self._view(kind, (lk, pk))) is not None:
            return view.info((lk, pk))
        v, _ = self._checked_pair(kind, lk, pk)
        chunks = v.chunks[0] if v.chunks else max(1, v.shape[0])
        return v.shape[0], tuple(v.shape[1:]), int(chunks)

    def read_payload_steps(self, kind, lk, pk):
        if (view := self._view(kind, (lk, pk))) is not None:
            return view.steps((lk, pk))
        _, s = self._checked_pair(kind, lk, pk)
        return self._read(s, slice(None))

    def payload_attrs(self, kind, lk, pk):
        if (view := self._view(kind, (lk, pk))) is not None:
            return view.attrs((lk, pk))
        g = self._get(fmt.payload_path(kind, lk, pk))
        try:
            return {k: attr_value(v) for k, v in g.attrs.items()}
        except Exception as e:
            raise TraceError(f"corrupt shard {self._disp}: unreadable attributes of {kind}/{lk}/{pk} "
                             f"({error_line(e)})") from None

    def read_payload(self, kind, lk, pk, start, stop):
        if (view := self._view(kind, (lk, pk))) is not None:
            return view.read((lk, pk), start, stop)
        v, _ = self._checked_pair(kind, lk, pk)
        return self._read(v, slice(start, stop))

    def _read(self, ds, sel):
        try:
            return ds[sel]
        except Exception as e:
            raise TraceError(f"corrupt or truncated shard {self._disp}: {error_line(e)}") from None

    def close(self):
        self._pairs, self._views, self._groups = {}, {}, {}
        f = getattr(self, "_f", None)
        if f is not None:
            try:
                f.close()
            except Exception:
                pass
            self._f = None


def error_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]


def attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v
