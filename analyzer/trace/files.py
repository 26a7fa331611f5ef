"""Files on disk: the one atomic write, fsync helpers, and bounded JSON reading. Torch-free.

Every file BBDecoder writes whole (manifest, rank state, graph, plans, report pages, figures, tables)
goes through :func:`atomic_write`: a temporary file in the same directory, then a rename, so a
reader never sees half a file and a crash leaves the old one.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from typing import Any, Callable

from .format import TraceError


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None], durable: bool = False,
                 mode: int | None = 0o644) -> str:
    """Write ``path`` through a temporary file in the same directory, then rename it into place.

    Args:
        path: the file to create or replace.
        writer: called with the temporary file's path; writes the whole content there.
        durable: fsync the file before the rename and the directory after it (crash-safe).
        mode: permission bits of the result (``mkstemp`` makes 0600; a run is shared like its shards);
            None leaves them as created.

    Returns:
        ``path`` as a string. On any error the temporary file is removed and the error re-raised;
        the old file, if any, is untouched.
    """
    path = os.fspath(path)
    d = os.path.dirname(path) or "."
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{base[:40]}-", suffix=os.path.splitext(base)[1], dir=d)
    os.close(fd)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        writer(tmp)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(d)
    return path


def publish(src: str | os.PathLike, dst: str | os.PathLike, durable: bool = True) -> str:
    """Rename a finished file into its final name (a shard, a capture); with ``durable``, fsync the
    file first and the directory after. Returns ``dst``."""
    src, dst = os.fspath(src), os.fspath(dst)
    if durable:
        fsync_file(src)
    os.replace(src, dst)
    if durable:
        fsync_dir(os.path.dirname(dst) or ".")
    return dst


def write_text_atomic(path: str | os.PathLike, text: str, durable: bool = False) -> str:
    """:func:`atomic_write` of a UTF-8 text."""
    def w(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
    return atomic_write(path, w, durable=durable)


def finite_json(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, scalars) with NaN and +-Infinity written as None: what
    BBDecoder writes is strict JSON, which readers may demand (:func:`read_json` does)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON (NaN and Infinity as null) to ``path`` atomically and durably:
    temporary file, fsync, rename."""
    obj = finite_json(obj)

    def w(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False)
    atomic_write(path, w, durable=True)


def fsync_file(path: str, drop_cache: bool = False) -> None:
    """Flush a closed file's data to stable storage; with ``drop_cache``, then tell the kernel the
    (now clean) pages are not needed, so a recorder writing gigabytes does not push the training
    job's data out of the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if drop_cache and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
    finally:
        os.close(fd)


def fsync_dir(d: str) -> None:
    """Make renames in directory ``d`` durable (best effort)."""
    try:
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


#: the largest JSON file a reader accepts (a manifest of 100,000 layers is about 30 MB)
MAX_JSON_BYTES = 64 << 20
#: the deepest nesting of arrays and objects a reader accepts (BBDecoder's own files nest < 10 deep)
MAX_JSON_DEPTH = 64


def check_trace_file(path: str | os.PathLike, root: str | os.PathLike | None, what: str,
                     allow_links: bool = False) -> str:
    """Refuse a trace file that is not a regular file inside the run: the checks every reader makes
    before it opens a file of a trace, which may come from a stranger.

    Args:
        path: the file. root: the run directory it must lie in (None: no confinement, e.g. a plan
            file the user named). what: a few words for messages.
        allow_links: accept symbolic links whose target stays inside ``root`` (default: refuse any
            link at or below ``root``).

    Returns:
        ``path`` as a string.

    Raises:
        TraceError: missing, a link (or a link leading outside ``root``), not a regular file (a FIFO,
            device, socket or directory: checked without opening it, so nothing blocks).
    """
    path = os.fspath(path)
    if root is not None:
        root_real = os.path.realpath(root)
        real = os.path.realpath(path)
        if real != root_real and not real.startswith(root_real.rstrip(os.sep) + os.sep):
            raise TraceError(f"{what} {path} leads outside the run ({real})")
        plain = os.path.join(root_real, os.path.relpath(os.path.abspath(path), os.path.abspath(root)))
        if not allow_links and os.path.normpath(plain) != real:
            raise TraceError(f"{what} {path} is a symbolic link (refused in a trace)")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise TraceError(f"{what} not found: {path}") from None
    except OSError as e:
        raise TraceError(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TraceError(f"{what} {path} is not a regular file")
    return path


def _no_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):   # (the loop below only for the message: dict() is ~5x faster per object)
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


def _sharing_no_duplicates():
    """:func:`_no_duplicates` for one read, with equal short string values one object (a manifest of
    100,000 layers repeats its layer types, parameter names and dtypes: about 45 MB less; issue 16)."""
    same: dict = {}

    def hook(pairs: list) -> dict:
        out = _no_duplicates(pairs)
        for k, v in out.items():
            if type(v) is str and len(v) <= 64:
                out[k] = same.setdefault(v, v)
        return out
    return hook


def _no_constant(name: str):
    raise ValueError(f"non-finite number {name} (not JSON)")


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of arrays and objects (iterative: a hostile file cannot exhaust the stack)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > deepest:
            deepest = d
            if deepest > limit:
                return deepest
        # only containers go on the stack (a 100,000-layer manifest holds millions of scalars)
        stack.extend([(v, d + 1) for v in (o.values() if isinstance(o, dict) else o) if isinstance(v, (dict, list))])
    return deepest


def read_json(path: str | os.PathLike, what: str, root: str | os.PathLike | None = None,
              max_bytes: int | None = None) -> dict:
    """Read a JSON object of a trace, raising :class:`TraceError` with a one-line reason on any problem.

    A regular file only (:func:`check_trace_file`, inside ``root`` when given), at most ``max_bytes``
    (default :data:`MAX_JSON_BYTES`) read whatever the file claims, strict JSON (duplicate keys and
    NaN/Infinity refused), nested at most :data:`MAX_JSON_DEPTH` deep.
    """
    limit = MAX_JSON_BYTES if max_bytes is None else max_bytes
    check_trace_file(path, root, what)
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))   # a FIFO swapped in cannot block
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TraceError(f"{what} {p} is not a regular file")
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read(limit + 1)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise TraceError(f"{what} not found: {p}") from None
    except OSError as e:
        raise TraceError(f"cannot read {what} {p}: {e.strerror or e}") from None
    if len(raw) > limit:
        raise TraceError(f"{what} {p} is larger than {limit:,} bytes")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_sharing_no_duplicates(), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise TraceError(f"cannot read {what} {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise TraceError(f"malformed {what} {p}: {e.msg} at line {e.lineno}") from None
    except ValueError as e:
        raise TraceError(f"malformed {what} {p}: {e}") from None
    except RecursionError:
        raise TraceError(f"malformed {what} {p}: nested deeper than {MAX_JSON_DEPTH}") from None
    if not isinstance(obj, dict):
        raise TraceError(f"malformed {what} {p}: expected a JSON object")
    if _depth(obj, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise TraceError(f"malformed {what} {p}: nested deeper than {MAX_JSON_DEPTH}")
    return obj
