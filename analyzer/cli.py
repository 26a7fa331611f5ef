"""`bbdecoder` command line: a thin click group over the analyzer's Python API.

Bad input never shows a traceback: every error becomes one line on stderr and exit status 2
(1 for unexpected failures; set BBDECODER_DEBUG=1 to see the traceback).
"""

from __future__ import annotations

import json
import os
import sys

import click

from .format import TraceError


class UsageProblem(Exception):
    """A problem with the user's input that is not a trace problem (e.g. an unwritable --out)."""


def _progress(label: str, total: int):
    return click.progressbar(length=max(total, 1), label=label, file=sys.stderr,
                             show_pos=True) if total > 1 and sys.stderr.isatty() else _Quiet()


class _Quiet:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False

    def update(self, n):
        pass


def _open(path: str):
    from . import run as _run
    return _run.open(path, progress=_progress)


def check_out_dir(out: str) -> str:
    """Create ``out`` if needed and make sure it is a writable directory; returns its absolute path."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageProblem(f"--out {out} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageProblem(f"cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UsageProblem(f"--out {out} is not writable")
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bbdecoder", prog_name="bbdecoder")
def cli() -> None:
    """BBDecoder: record what happens inside a PyTorch network during training, explain it offline."""


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def info(run_dir: str, as_json: bool) -> None:
    """Status, steps, epochs, layers, ranks, bytes and what was recorded in RUN_DIR."""
    run = _open(run_dir)
    d = run.info()
    if as_json:
        click.echo(json.dumps(d, indent=1, sort_keys=True, default=str))
        return
    rec = d["recorded"]
    lines = [
        f"run       {d['path']}",
        f"status    {d['status']}" + (f" ({d['status_reason']})" if d["status_reason"] else ""),
        f"steps     {d['steps']}" + (f" ({d['first_step']}..{d['last_step']})" if d["steps"] else ""),
        f"epochs    {d['epochs']}",
        f"layers    {d['layers']}",
        f"ranks     {', '.join(map(str, d['ranks'])) or '-'} (world size {d['world_size']})",
        f"bytes     {d['bytes']:,} in {d['shards']} shard(s)",
        f"grads     {rec['grads']['steps']} step(s), {rec['grads']['layers']} layer(s)",
        f"weights   {rec['weights']['steps']} snapshot(s), {rec['weights']['layers']} layer(s)",
        f"dropped   {d['dropped']}",
    ]
    for e in d["errors"]:
        lines.append(f"error     {e}")
    for p in d["problems"]:
        lines.append(f"problem   {p}")
    click.echo("\n".join(lines))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def layers(run_dir: str, as_json: bool) -> None:
    """The layer table of RUN_DIR: id, name, type, parameter count."""
    run = _open(run_dir)
    df = run.layers[["id", "name", "type", "n_params", "selected"]]
    if as_json:
        click.echo(df.to_json(orient="records"))
    else:
        click.echo(df.to_string(index=False))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(), help="Directory for the report.")
@click.option("--layers", "layer_spec", default=None,
              help="Layers: ids, dotted names, globs or type names, comma-separated (default: all).")
@click.option("--bins", default=64, show_default=True, type=click.IntRange(1, 10000),
              help="Bins of the weight histograms.")
def report(run_dir: str, out: str, layer_spec: str | None, bins: int) -> None:
    """Write an HTML report with figures, tables and summary.json for RUN_DIR into --out."""
    from .report import build_report
    run = _open(run_dir)
    run.select(layer_spec)  # unknown layers fail before anything is written
    out = check_out_dir(out)
    summary = build_report(run, out, layers=layer_spec, bins=bins)
    click.echo(f"report: {os.path.join(out, 'index.html')}")
    for w in summary.get("skipped", []):
        click.echo(f"note: {w}", err=True)


@cli.command()
@click.option("--out", "out", default="bbdecoder-demo", show_default=True, type=click.Path(),
              help="Directory for the demo's run and report.")
@click.option("--force", is_flag=True, help="Replace an earlier demo in --out.")
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--samples", default=2048, show_default=True, type=click.IntRange(64, 1_000_000))
def demo(out: str, force: bool, epochs: int, samples: int) -> None:
    """Train a small CNN on a synthetic image task while recording, then write a report."""
    try:
        from recorder import demo as _demo
    except ImportError as e:
        raise UsageProblem(f"the demo needs torch (pip install 'bbdecoder[torch]'): {e}") from None
    out = check_out_dir(out)
    res = _demo.run_demo(out, force=force, epochs=epochs, samples=samples, log=lambda m: click.echo(m))
    click.echo(f"report: {res['report']}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the click group, turning errors into one line on stderr."""
    debug = bool(os.environ.get("BBDECODER_DEBUG"))
    try:
        cli.main(args=argv, prog_name="bbdecoder", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("bbdecoder: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        msg = e.format_message().splitlines()[0] if e.format_message() else type(e).__name__
        click.echo(f"bbdecoder: error: {msg}", err=True)
        sys.exit(e.exit_code)
    except (TraceError, UsageProblem, FileExistsError, ValueError) as e:
        if debug:
            raise
        click.echo(f"bbdecoder: error: {_one_line(e)}", err=True)
        sys.exit(2)
    except OSError as e:
        if debug:
            raise
        click.echo(f"bbdecoder: error: {_one_line(e)}", err=True)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - never a traceback for the user
        if debug:
            raise
        click.echo(f"bbdecoder: internal error: {type(e).__name__}: {_one_line(e)} "
                   "(set BBDECODER_DEBUG=1 for details)", err=True)
        sys.exit(1)


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s[:500] if s else type(e).__name__


if __name__ == "__main__":  # pragma: no cover
    main()
