"""`bbdecoder demo`: train a small CNN on a synthetic task while recording, then write a report."""

from __future__ import annotations

import os

import click

from .main import UsageProblem, echo, out_dir


@click.command()
@click.option("--out", "out", default="bbdecoder-demo", show_default=True, type=click.Path(),
              help="Directory for the demo's run and report.")
@click.option("--force", is_flag=True, help="Replace an earlier demo in --out.")
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(1, 100))
@click.option("--samples", default=2048, show_default=True, type=click.IntRange(64, 1_000_000))
def demo(out: str, force: bool, epochs: int, samples: int) -> None:
    """Train a small CNN on a synthetic image task while recording, then write a report."""
    try:
        from bbdecoder.recorder.demo import run_demo
    except ImportError as e:
        raise UsageProblem(f"the demo needs torch (pip install 'bbdecoder[torch]'): {e}") from None
    out = out_dir(out)
    run_dir = os.path.join(out, "run")   # where run_demo writes the trace
    if os.path.exists(run_dir) and not force:
        raise UsageProblem(f"{run_dir} already exists; pass --force to replace the earlier demo")
    res = run_demo(out, force=force, epochs=epochs, samples=samples, log=lambda m: echo(m))
    echo(f"report: {res['report']}")
