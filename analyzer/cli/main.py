"""`bbdecoder` command line: the click group, opening a run, the terminal progress bar, the ``--out``
helper and :func:`main`, which turns every error into one line on stderr.

Bad input never shows a traceback: every error becomes one line on stderr and exit status 2
(1 for unexpected failures; set BBDECODER_DEBUG=1 to see the traceback).

The commands live one module (or small family) each beside this one and register on :data:`cli` in
the package's ``__init__``; they import their helpers from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Iterator

import click

from ..outdir import OutputDirError, out_lock, prepare_out_dir
from ..progress import null_progress
from ..trace.format import TraceError
from ..values import json_safe, terminal_safe


def echo(text="", err: bool = False) -> None:
    """Print ``text`` (stdout, or stderr with ``err``) with terminal controls escaped: every line the
    CLI prints goes through here, because names in a trace come from strangers."""
    click.echo(terminal_safe(text), err=err)


class UsageProblem(Exception):
    """A problem with the user's input that is not a trace problem (e.g. an unwritable --out)."""


def terminal_progress(label: str, total: int):
    """The CLI's progress factory (see :mod:`analyzer.progress`): a click progress bar on stderr when
    stderr is a terminal and there is more than one item, else :func:`~analyzer.progress.null_progress`.

    Args:
        label: text before the bar.
        total: number of items (``update(n)`` advances by n of them).
    """
    if total > 1 and sys.stderr.isatty():
        return click.progressbar(length=max(total, 1), label=label, file=sys.stderr, show_pos=True)
    return null_progress(label, total)


def open_run(path: str, engine: str = "local"):
    """Open the run at ``path`` with the terminal progress bar; ``engine``: "local" or "dask".

    Raises:
        TraceError: ``path`` is missing, not a run, or malformed (see ``analyzer.open``).
    """
    from .. import run
    return run.open(path, progress=terminal_progress, engine=engine)


def records_json(df) -> str:
    """A data frame as indented JSON records, NaN/Inf written as null."""
    return json.dumps(json_safe(df.to_dict(orient="records")), indent=1, allow_nan=False)


def _out_message(msg: str, path: str, flag: str) -> str | None:
    """The library's message about output directory ``path``, worded for the option ``flag``
    (None: not a message about ``path``)."""
    if msg.startswith(path + " "):
        return f"{flag} {msg}".replace("; pass force ", "; pass --force ")
    if msg.startswith(f"cannot create {path}:"):
        return f"cannot create {flag} {msg[len('cannot create '):]}"
    return None



@contextlib.contextmanager
def out_errors(out: str, flag: str = "--out") -> Iterator[None]:
    """Context: an unusable output directory ``out`` (``analyzer.outdir.prepare_out_dir``'s errors,
    also when raised inside a library call) becomes a UsageProblem that names ``flag``, e.g.
    "--out X exists and is not a directory", "--out X is not empty; pass --force to write into it".
    Any other error passes unchanged."""
    try:
        yield
    except (OutputDirError, FileExistsError) as e:
        msg = _out_message(str(e), os.path.abspath(os.fspath(out)), flag)
        if msg is None:
            raise
        raise UsageProblem(msg) from None


def out_dir(out: str, force: bool | None = None, subdirs: tuple[str, ...] = ()) -> str:
    """Create the ``--out`` directory (and ``subdirs``) if needed, check that it is a writable real
    directory without symbolic links where outputs go, and lock it until the command ends (a second
    command writing the same --out stops with one line); returns its absolute path.

    Args:
        out: the directory given to ``--out``.
        force: None: an existing non-empty directory is fine; False: refused unless empty;
            True: written into.
        subdirs: subdirectories the command writes into (see ``analyzer.outdir.prepare_out_dir``).

    Raises:
        UsageProblem: the directory is unusable or busy (message worded for ``--out`` and ``--force``).
    """
    with out_errors(out):
        path = prepare_out_dir(out, force, subdirs)
        lock = out_lock(path)
        lock.__enter__()
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(lambda: lock.__exit__(None, None, None))
    else:   # outside a command (a direct call): held until the process ends
        _open_locks.append(lock)
    return path


_open_locks: list = []


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bbdecoder", prog_name="bbdecoder")
def cli() -> None:
    """BBDecoder: record what happens inside a PyTorch network during training, explain it offline."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the click group, turning errors into one line on stderr.

    Exit status: 0 success, 2 bad input (click usage errors keep click's status), 130 aborted,
    1 an unexpected failure.
    """
    debug = bool(os.environ.get("BBDECODER_DEBUG"))
    try:
        cli.main(args=argv, prog_name="bbdecoder", standalone_mode=False)
    except click.exceptions.Abort:
        echo("bbdecoder: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        msg = e.format_message().splitlines()[0] if e.format_message() else type(e).__name__
        echo(f"bbdecoder: error: {msg}", err=True)
        sys.exit(e.exit_code)
    except (TraceError, UsageProblem, FileExistsError, ValueError) as e:
        if debug:
            raise
        echo(f"bbdecoder: error: {_one_line(e)}", err=True)
        sys.exit(2)
    except OSError as e:
        if debug:
            raise
        echo(f"bbdecoder: error: {_one_line(e)}", err=True)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - never a traceback for the user
        if debug:
            raise
        echo(f"bbdecoder: internal error: {type(e).__name__}: {_one_line(e)} "
                   "(set BBDECODER_DEBUG=1 for details)", err=True)
        sys.exit(1)


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s[:500] if s else type(e).__name__
