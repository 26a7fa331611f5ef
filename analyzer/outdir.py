"""Output directories: where an analysis writes its files. Library code; the CLI words the errors
for its ``--out`` option."""

from __future__ import annotations

import os


class OutputDirError(ValueError):
    """An output directory that cannot be used (not a directory, not creatable, not writable)."""


def prepare_out_dir(out: str | os.PathLike, force: bool | None = None) -> str:
    """Create ``out`` if needed and make sure it is a writable directory.

    Args:
        out: the directory.
        force: None: an existing, non-empty directory is fine. False: a non-empty directory is
            refused with FileExistsError. True: a non-empty directory is written into.

    Returns:
        the absolute path of ``out``.

    Raises:
        OutputDirError: ``out`` exists and is not a directory, cannot be created, or is not writable.
        FileExistsError: ``force`` is False and ``out`` holds files.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputDirError(f"{out} exists and is not a directory")
    if force is False and os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"{out} is not empty; pass force to write into it")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise OutputDirError(f"cannot create {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputDirError(f"{out} is not writable")
    return out
