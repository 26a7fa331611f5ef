"""`bbdecoder attention-iou`: Attention-IoU scores of a recorded attention capture, computed offline.
Never imports torch."""

from __future__ import annotations

import warnings

import click

from ..attention_iou import RESOLUTIONS, SCORES
from ..cam import METHODS
from ..cam_notes import AttentionWarning
from .main import UsageProblem, echo, open_run, records_json


class NothingScored(click.ClickException):
    """No image got a score (exit status 1): the maps or masks are zero everywhere; the message says why."""
    exit_code = 1


def score_table(df) -> str:
    """Text table: one line per (score, split) with n, mean and bootstrap mean +- std."""
    cols = ["score", "split", "n", "mean", "boot_mean", "boot_std"]
    d = df[cols].copy()
    for c in ("mean", "boot_mean", "boot_std"):
        d[c] = [("-" if v != v else f"{v:.4f}") for v in d[c]]
    return d.to_string(index=False)


@click.command("attention-iou")
@click.argument("run_dir", type=click.Path())
@click.option("--target", required=True, help="A captured target name (its attention maps are scored).")
@click.option("--mask-group", default=None, help="Mask score: against this captured mask group (e.g. background).")
@click.option("--protected", default=None, help="Heatmap score: against the maps of this other captured target.")
@click.option("--method", default="gradcam", show_default=True, type=click.Choice(list(METHODS)),
              help="CAM method used for the maps.")
@click.option("--bootstrap", "n_boot", default=10000, show_default=True, type=click.IntRange(0, 10_000_000),
              help="Bootstrap resamples of the images (0: none).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the bootstrap.")
@click.option("--capture", "capture", default="-1", show_default=True,
              help="Capture position (-1: the latest; 'all': every capture, e.g. one per epoch).")
@click.option("--resolution", default="image", show_default=True, type=click.Choice(list(RESOLUTIONS)),
              help="image: maps upsampled to the masks; map: masks downsampled to the maps.")
@click.option("--score", "score_names", default="iou", show_default=True,
              help=f"Comma-separated scores: {', '.join(SCORES)} or all.")
@click.option("--by", default="all", show_default=True,
              help="Group labels whose joint values split the images (comma-separated; 'all' or 'none').")
@click.option("--json", "as_json", is_flag=True, help="Print JSON records.")
def attention_iou_cmd(run_dir, target, mask_group, protected, method, n_boot, seed, capture, resolution,
                      score_names, by, as_json) -> None:
    """Attention-IoU of TARGET's attention maps in RUN_DIR against a mask group (--mask-group) or another
    target's maps (--protected), per split (all, correct, incorrect, group labels), with bootstrap.
    Maps that are 0 everywhere are reported on stderr with their likely cause; exit status 1 when no
    image was scored at all."""
    if (mask_group is None) == (protected is None):
        raise UsageProblem("give exactly one of --mask-group and --protected")
    scores = list(SCORES) if score_names.strip() == "all" else [s.strip() for s in score_names.split(",") if s.strip()]
    bad = [s for s in scores if s not in SCORES]
    if bad or not scores:
        raise UsageProblem(f"--score: unknown {', '.join(bad) or '(empty)'} (choose from {', '.join(SCORES)}, all)")
    if capture != "all":
        try:
            capture = int(capture)
        except ValueError:
            raise UsageProblem(f"--capture must be an integer position or 'all', not {capture!r}") from None
    by_spec = "all" if by == "all" else ([] if by == "none" else [b.strip() for b in by.split(",") if b.strip()])
    run = open_run(run_dir)
    with warnings.catch_warnings():   # the notes come back in df.attrs and are printed below
        warnings.simplefilter("ignore", AttentionWarning)
        df = run.attention_iou(target, mask_group=mask_group, protected=protected, method=method, bootstrap=n_boot,
                               seed=seed, resolution=resolution, capture=capture, scores=scores, by=by_spec)
    notes = df.attrs.get("notes") or []
    if not len(df) or not (df["n"] > 0).any():
        raise NothingScored(notes[0] if notes else f"no image of target {target!r} was scored")
    for n in notes:
        echo(f"bbdecoder: warning: {n}", err=True)
    if as_json:
        echo(records_json(df))
        return
    for (cap, step), d in df.groupby(["capture", "step"], sort=True):
        ref = f"mask group {mask_group!r}" if mask_group is not None else f"target {protected!r}"
        echo(f"capture {cap} (step {step}): {target!r} vs {ref}, {method}, {resolution} resolution, "
                   f"{n_boot} resamples")
        echo(score_table(d))
