"""`bbdecoder check`: the health rules as a CI gate (exit 0: nothing at or above --fail-on; 1: findings;
2: usage or trace errors, one line on stderr)."""

from __future__ import annotations

import json
import sys

import click

from ..values import json_safe
from .main import echo, open_run


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--rules", "rules_file", default=None, type=click.Path(),
              help="TOML file of rule settings: one table per rule, e.g. [vanishing_gradient] relative = 1e-5, "
                   "severity = \"error\", enabled = false.")
@click.option("--set", "assignments", multiple=True, metavar="RULE.KEY=VALUE",
              help="One setting over the defaults and --rules (repeatable), e.g. --set gradient_spike.z=5.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@click.option("--each", is_flag=True, help="One line per finding (default: one line per rule and message, "
                                           "with the number of layers and the worst one).")
@click.option("--fail-on", default="error", show_default=True, type=click.Choice(["warning", "error"]),
              help="Exit 1 when a finding has this severity or a higher one.")
def check(run_dir: str, rules_file: str | None, assignments: tuple, as_json: bool, each: bool,
          fail_on: str) -> None:
    """Evaluate the health rules on RUN_DIR's statistics (see docs/findings.md); exit 1 on findings at or
    above --fail-on, 0 otherwise."""
    import pandas as pd

    from ..findings import fails, group, load_settings, parse_assignments
    settings = parse_assignments(assignments, load_settings(rules_file) if rules_file else {})
    run = open_run(run_dir)
    df = run.findings(**settings)
    failed = fails(df, fail_on)
    counts = {s: int((df["severity"] == s).sum()) for s in ("error", "warning", "info", "skipped")}
    if as_json:
        echo(json.dumps(json_safe({"run": run.path, "fail_on": fail_on, "failed": failed, "counts": counts,
                                   "findings": df.to_dict(orient="records")}), indent=1, allow_nan=False))
    else:
        if each:
            for r in df.itertuples(index=False):
                where = ".".join(str(x) for x in (r.layer, r.param) if x is not None) or "(model)"
                steps = "" if not r.n_steps else f" steps {r.first_step}-{r.last_step} ({r.n_steps})"
                echo(f"{r.severity.upper():8s}{r.rule} {where}{steps}: {r.message}")
        else:
            for g in group(df).itertuples(index=False):
                steps = "" if pd.isna(g.first_step) else f" steps {int(g.first_step)}-{int(g.last_step)}"
                more = "" if g.n == 1 else f" and {g.n - 1} more (worst first: {', '.join(g.where[1:4])}" \
                    f"{', ...' if g.n > 4 else ''})"
                echo(f"{g.severity.upper():8s}{g.rule} {g.worst_where}{more}{steps}: {g.message}")
            for r in df[df["severity"] == "skipped"].itertuples(index=False):
                echo(f"{'SKIPPED':8s}{r.rule}: {r.message}")
        echo(f"check: {counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info, "
             f"{counts['skipped']} rule(s) skipped; --fail-on {fail_on}: {'FAIL' if failed else 'pass'}")
    if failed:
        sys.exit(1)

