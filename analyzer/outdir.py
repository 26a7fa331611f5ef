"""Output directories: where an analysis writes its files. Library code; the CLI words the errors
for its ``--out`` option.

Outputs go only inside the output directory: a directory that is a symbolic link, or that holds
symbolic links where outputs go (its own entries, the subdirectories a command writes into), is
refused, so a planted link cannot send a figure or a table elsewhere; every file is written through
:func:`analyzer.trace.files.atomic_write` (a rename, which replaces a name and never writes through
one). :func:`out_lock` keeps two writers out of one directory at once.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterable, Iterator

#: the lock file a writer holds (fcntl.flock) inside an output directory while it writes
LOCK_NAME = ".bbdecoder.lock"


class OutputDirError(ValueError):
    """An output directory that cannot be used (not a directory, not creatable, not writable, a
    symbolic link or holding one where outputs go)."""


class OutputBusyError(OutputDirError):
    """Another writer (a bbdecoder command, in this or another process) holds the directory's lock."""


def _links(d: str, subdirs: Iterable[str]) -> str | None:
    """The first symbolic link among ``d``'s entries and those of its ``subdirs`` (None: none)."""
    for sub in ("", *subdirs):
        p = os.path.join(d, sub) if sub else d
        try:
            with os.scandir(p) as it:
                for e in it:
                    if e.is_symlink():
                        return e.path
        except (FileNotFoundError, NotADirectoryError):
            continue
    return None


def _entries(d: str) -> list[str]:
    return [n for n in os.listdir(d) if n != LOCK_NAME]


def prepare_out_dir(out: str | os.PathLike, force: bool | None = None, subdirs: Iterable[str] = ()) -> str:
    """Create ``out`` (and its ``subdirs``) if needed and make sure it is a writable directory where
    nothing written can leave it.

    Args:
        out: the directory.
        force: None: an existing, non-empty directory is fine. False: a non-empty directory is
            refused with FileExistsError. True: a non-empty directory is written into.
        subdirs: subdirectories the caller writes into (e.g. ``("figures", "tables")``): created,
            and refused when they are links or hold links.

    Returns:
        the absolute path of ``out``.

    Raises:
        OutputDirError: ``out`` exists and is not a directory, is a symbolic link, holds a symbolic
            link where outputs go, cannot be created, or is not writable.
        FileExistsError: ``force`` is False and ``out`` holds files.
    """
    out = os.path.abspath(os.fspath(out))
    subdirs = tuple(subdirs)
    if os.path.islink(out):
        raise OutputDirError(f"{out} is a symbolic link (outputs are written only into a real directory)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputDirError(f"{out} exists and is not a directory")
    if force is False and os.path.isdir(out) and _entries(out):
        raise FileExistsError(f"{out} is not empty; pass force to write into it")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot create {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputDirError(f"{out} is not writable")
    link = _links(out, subdirs)
    if link:
        raise OutputDirError(f"{out} holds a symbolic link where outputs go ({os.path.relpath(link, out)}); "
                             "remove it or choose another directory")
    for sub in subdirs:
        p = os.path.join(out, sub)
        try:
            os.mkdir(p)
        except FileExistsError:
            if os.path.islink(p) or not os.path.isdir(p):
                raise OutputDirError(f"{out} holds {sub}, which is not a directory") from None
        except OSError as e:
            raise OutputDirError(f"cannot create {p}: {e.strerror}") from None
    return out


_held: dict[str, list] = {}   # real path -> [fd, depth]: this process's locks (re-entrant)


@contextlib.contextmanager
def out_lock(out: str | os.PathLike) -> Iterator[str]:
    """Context: hold the write lock of output directory ``out`` (an existing directory), so that
    two writers never mix their files in it. Re-entrant within a process; released (and the lock
    file removed) on exit. Non-blocking: a directory locked by another writer raises at once.

    Raises:
        OutputBusyError: another writer holds the lock (its process id is named when known).
        OutputDirError: the lock file cannot be created (the lock file is itself a link, ...).
    """
    import fcntl
    out = os.path.abspath(os.fspath(out))
    key = os.path.realpath(out)
    if key in _held:
        _held[key][1] += 1
        try:
            yield out
        finally:
            _held[key][1] -= 1
        return
    path = os.path.join(out, LOCK_NAME)
    for _ in range(5):   # retry when the file we locked was unlinked by a writer finishing meanwhile
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputDirError(f"{out}: cannot create the lock file {LOCK_NAME}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                pid = ""
            os.close(fd)
            who = f" (process {pid})" if pid.isdigit() else ""
            raise OutputBusyError(f"{out} is being written by another bbdecoder command{who}; "
                                  "wait for it to finish or choose another directory") from None
        try:
            same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    else:
        raise OutputBusyError(f"{out} is being written by another bbdecoder command; wait for it to finish")
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[key] = [fd, 1]
    try:
        yield out
    finally:
        del _held[key]
        try:
            os.unlink(path)     # while still locked: a waiting writer re-checks the inode
        except OSError:
            pass
        os.close(fd)
