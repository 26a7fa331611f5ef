"""`bbdecoder prune`: a pruning plan (JSON) or a sparsity-versus-threshold sweep from a recorded run.
Never imports torch."""

from __future__ import annotations

import json
import math
import os

import click

from ..pruning import CRITERIA, OVERALL
from ..trace.files import atomic_write
from ..values import csv_safe
from .main import UsageProblem, echo, open_run, out_dir


def _parse_thresholds(text: str) -> list[float]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            v = float(item)
        except ValueError:
            raise UsageProblem(f"--thresholds: {item!r} is not a number") from None
        if not math.isfinite(v):
            raise UsageProblem(f"--thresholds: {item!r} is not a finite number")
        out.append(v)
    if not out:
        raise UsageProblem("--thresholds: give at least one number, e.g. --thresholds 0,0.01,0.1")
    return out


def _steps(text: str | None):
    """"A:B" (half-open, either side may be empty) or "a,b,c"."""
    if text is None:
        return None
    try:
        if ":" in text:
            a, b = text.split(":", 1)
            out = (int(a) if a.strip() else None, int(b) if b.strip() else None)
        else:
            out = [int(s) for s in text.split(",") if s.strip()]
        if any(v is not None and not -(1 << 63) <= v < 1 << 63 for v in out):   # steps are int64
            raise ValueError
        return out
    except ValueError:
        raise UsageProblem(f"--steps must be START:STOP or a comma-separated list of steps, not {text!r}") from None


def _label(name: str) -> str:
    return name if name else "(model)"


def _pct(x: float) -> str:
    return f"{100.0 * x:6.2f}%"


def plan_table(plan: dict) -> str:
    """A short text table: per layer units removed and sparsity, then the overall sparsity."""
    es = plan["expected_sparsity"]
    by = {e["layer"]: e for e in plan["layers"]}
    rows = [("layer", "removed", "sparsity")]
    for name, sp in es["per_layer"].items():
        e = by.get(name)
        if e is None and sp == 0:
            continue
        if e is not None and "units" in e:
            rem = f"{len(e['units'])}/{e.get('units_total', '?')} units"
        elif e is not None:
            rem = f"|w| <= {e['magnitude_threshold']:.4g}"
        elif sp > 0:
            rem = "inputs"
        else:
            rem = "-"
        rows.append((_label(name), rem, _pct(sp)))
    rows.append((OVERALL, "", _pct(es["overall"])))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0].ljust(w[0])}  {r[1].ljust(w[1])}  {r[2].rjust(w[2])}".rstrip() for r in rows)


def sweep_table(df) -> str:
    """threshold x (overall + up to 6 layers) sparsity table."""
    piv = df.pivot_table(index="threshold", columns="layer", values="sparsity", sort=False)
    layers = [c for c in dict.fromkeys(df["layer"]) if c != OVERALL]
    moving = [c for c in layers if piv[c].max() > 0][:6]
    cols = [OVERALL] + moving
    head = ["threshold"] + [_label(c) for c in cols]
    rows = [head] + [[f"{t:.4g}"] + [_pct(piv.loc[t, c]).strip() for c in cols] for t in piv.index]
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(r[i].rjust(w[i]) for i in range(len(head))) for r in rows)


@click.command("prune")
@click.argument("run_dir", type=click.Path())
@click.option("--criterion", default=None, type=click.Choice(CRITERIA),
              help="dead (never active), dormant (E|h| relative to the layer), magnitude (|w|), "
                   "l1-channel (L1 norm of output channels).")
@click.option("--threshold", type=float, default=None,
              help="The criterion's threshold (required unless --sweep).")
@click.option("--max-active-fraction", "max_active_fraction", type=float, default=0.0, show_default=True,
              help="dead: a unit is dead if active (> 0) at most this often (threshold 0 only).")
@click.option("--layers", "layer_spec", default=None,
              help="Layers that may be pruned: ids, names, globs or type names, comma-separated "
                   "(default: all but the model's final layer).")
@click.option("--steps", "steps_spec", default=None,
              help="Steps to use: START:STOP (half-open) or a comma-separated list (default: all).")
@click.option("--sweep", is_flag=True, help="Sparsity versus threshold per layer: DIR/sweep.csv and DIR/sweep.png.")
@click.option("--thresholds", default=None, help="--sweep: comma-separated thresholds (default: from the data).")
@click.option("--out", "out", default=None, type=click.Path(),
              help="The plan file (JSON), or with --sweep the output directory.")
@click.option("--check", "check", default=None, type=click.Path(),
              help="Validate the plan file CHECK (format version, fields) and that it fits RUN_DIR's model.")
@click.option("--force", is_flag=True, help="Replace an existing plan file (--sweep: write into a non-empty --out).")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def prune(run_dir, criterion, threshold, max_active_fraction, layer_spec, steps_spec, sweep, thresholds, out,
          force, as_json, check=None) -> None:
    """Write a pruning plan for RUN_DIR (--out plan.json), or a sweep (--sweep --out DIR), or check a
    plan file against RUN_DIR (--check plan.json).

    Apply a plan to a torch model with recorder.apply_plan(model, "plan.json").
    """
    from ..pruning import pruning_plan, sweep as _sweep
    from ..trace.plans import write_plan
    if check is not None:
        if criterion or threshold is not None or sweep or out:
            raise UsageProblem("--check PLAN takes no --criterion, --threshold, --sweep or --out")
        return _check_plan(run_dir, check, as_json)
    if criterion is None or out is None:
        raise UsageProblem(f"--{'criterion' if criterion is None else 'out'} is required (or --check PLAN)")
    steps = _steps(steps_spec)
    if sweep:
        if threshold is not None:
            raise UsageProblem("--sweep takes --thresholds a,b,c, not --threshold")
        ts = _parse_thresholds(thresholds) if thresholds is not None else None
        run = open_run(run_dir)
        df = _sweep(run, criterion, ts, layers=layer_spec, steps=steps, max_active_fraction=max_active_fraction)
        out = out_dir(out, force=force)
        csv = os.path.join(out, "sweep.csv")
        atomic_write(csv, lambda p: csv_safe(df).to_csv(p, index=False))
        from ..report.plots import sweep_figure
        png = sweep_figure(df, os.path.join(out, "sweep.png"), criterion)
        if as_json:
            echo(json.dumps({"csv": csv, "png": png, "notes": df.attrs.get("notes", []),
                                   "rows": json.loads(df.to_json(orient="records"))}))
            return
        echo(sweep_table(df))
        for n in df.attrs.get("notes", []):
            echo(f"note: {n}", err=True)
        echo(f"sweep: {csv}, {png}")
        return
    if thresholds is not None:
        raise UsageProblem("--thresholds goes with --sweep; give one --threshold for a plan")
    if threshold is None:
        raise UsageProblem("--threshold is required (or --sweep)")
    path = os.path.abspath(out)
    if os.path.isdir(path):
        raise UsageProblem(f"--out {path} is a directory; give the plan's file name (or use --sweep)")
    if os.path.exists(path) and not force:
        raise UsageProblem(f"--out {path} exists; pass --force to replace it")
    parent = os.path.dirname(path)
    run = open_run(run_dir)
    plan = pruning_plan(run, criterion, threshold, layers=layer_spec, steps=steps,
                        max_active_fraction=max_active_fraction)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UsageProblem(f"cannot create the directory of --out {path}: {e.strerror}") from None
    write_plan(plan, path, overwrite=force)
    if as_json:
        echo(json.dumps({"plan": path, "expected_sparsity": plan["expected_sparsity"],
                               "layers": [{k: e[k] for k in ("layer", "layer_id", "sparsity")}
                                          | ({"units": len(e["units"])} if "units" in e else {})
                                          for e in plan["layers"]], "notes": plan["notes"]}))
        return
    echo(plan_table(plan))
    for n in plan["notes"]:
        echo(f"note: {n}", err=True)
    echo(f"plan: {path}")


def _check_plan(run_dir: str, path: str, as_json: bool) -> None:
    """``--check``: the plan file validated (format, version, fields) and its fingerprint compared with
    the parameters recorded in ``run_dir``; one line on stderr and exit 2 when either fails."""
    from ..pruning import param_list
    from ..trace.plans import fingerprint_difference, load_plan
    plan = load_plan(path)                    # a newer or unknown version: PlanError, one line
    run = open_run(run_dir)
    diff = fingerprint_difference(plan["model_fingerprint"]["params"], param_list(run))
    if diff is not None:
        raise UsageProblem(f"the plan {path} does not fit the model recorded in {run_dir}: {diff}")
    if as_json:
        echo(json.dumps({"plan": os.path.abspath(path), "version": plan["version"], "fits": True,
                         "expected_sparsity": plan["expected_sparsity"]}))
        return
    echo(plan_table(plan))
    echo(f"plan {path}: version {plan['version']}, fits the model recorded in {run_dir}")
