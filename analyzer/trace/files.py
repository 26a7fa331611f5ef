"""Files on disk: the one atomic write, fsync helpers, and bounded JSON reading. Torch-free.

Every file BBDecoder writes whole (manifest, rank state, graph, plans, report pages, figures, tables)
goes through :func:`atomic_write`: a temporary file in the same directory, then a rename, so a
reader never sees half a file and a crash leaves the old one.
"""

from __future__ import annotations

import json
import os
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


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically and durably: temporary file, fsync, rename."""
    def w(p: str) -> None:
        with open(p, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True, allow_nan=True)
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


def read_json(path: str | os.PathLike, what: str) -> dict:
    """Read a JSON object, raising :class:`TraceError` with a one-line reason on any problem."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise TraceError(f"{what} not found: {os.fspath(path)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"cannot read {what} {os.fspath(path)}: {e}") from None
    except json.JSONDecodeError as e:
        raise TraceError(f"malformed {what} {os.fspath(path)}: {e.msg} at line {e.lineno}") from None
    if not isinstance(obj, dict):
        raise TraceError(f"malformed {what} {os.fspath(path)}: expected a JSON object")
    return obj
