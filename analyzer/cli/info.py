"""`bbdecoder info` and `bbdecoder layers`: what a run holds, as text or JSON."""

from __future__ import annotations

import json

import click

from ..values import json_safe
from .main import echo, open_run


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--nonfinite", "scan_nonfinite", is_flag=True,
              help="Also list where NaN/Inf values are (reads every recorded gradient and weight).")
def info(run_dir: str, as_json: bool, scan_nonfinite: bool = False) -> None:
    """Status, steps, epochs, layers, ranks, bytes and what was recorded in RUN_DIR."""
    run = open_run(run_dir)
    d = run.info()
    if scan_nonfinite:
        from ..report import nonfinite_findings
        d["nonfinite"] = nonfinite_findings(run, run.grad_stats(), run.weight_stats())
    from ..activations.sites import attention_note
    d["attention_note"] = attention_note(run)   # None unless attention ran in a fused kernel
    if as_json:
        echo(json.dumps(json_safe(d), indent=1, sort_keys=True, allow_nan=False))
        return
    rec = d["recorded"]
    lines = [
        f"run       {d['path']}",
        f"status    {d['status']}" + (f" ({d['status_reason']})" if d["status_reason"] else ""),
        f"steps     {d['steps']}" + (f" ({d['first_step']}..{d['last_step']})" if d["steps"] else ""),
        f"epochs    {d['epochs']}",
        f"layers    {d['layers']}, {d['params']:,} parameter(s)",
        f"ranks     {', '.join(map(str, d['ranks'])) or '-'} (world size {d['world_size']})",
        f"bytes     {d['bytes']:,} in {d['shards']} shard(s)",
        f"grads     {rec['grad_stats']['steps']} step(s) of statistics, {rec['grads']['steps']} of raw tensors, "
        f"{max(rec['grad_stats']['layers'], rec['grads']['layers'])} layer(s)",
        f"weights   {rec['weights']['steps']} snapshot(s), {rec['weights']['layers']} layer(s)",
        f"dropped   {d['dropped']}",
    ]
    lines[5:5] = [f"shared    {e['name']} = {', '.join(e['aliases'])}"
                  + (f" ({e['numel']:,} parameters, recorded and counted once)" if e["kind"] == "param" else
                     " (one module, recorded once)") for e in d["shared"]]
    lines[5 + len(d["shared"]) + 1:5 + len(d["shared"]) + 1] = _rank_lines(d)   # under the "ranks" line
    for e in d["errors"]:
        lines.append(f"error     {e}")
    for p in d["problems"]:
        lines.append(f"problem   {p}")
    lines += _nonfinite_lines(d.get("nonfinite"))
    if d["attention_note"]:
        lines.append(f"note      {d['attention_note']}")
    echo("\n".join(lines))


def _rank_lines(d: dict) -> list[str]:
    """`info` under torch.distributed: one line per rank (status, shards, steps, what it recorded)."""
    rt = d.get("rank_table") or []
    if len(rt) <= 1 and d.get("world_size", 1) <= 1:
        return []
    out = []
    for r in rt:
        what = [k for k in ("grads", "weights", "activations") if r[k]]
        span = f" ({r['first_step']}..{r['last_step']})" if r["steps"] else ""
        out.append(f"  rank {r['rank']:<3} {r['status']}, {r['shards']} shard(s)"
                   + (f" + {r['live']} unfinished" if r["live"] else "")
                   + f", {r['steps']} step(s){span}, {r['bytes']:,} bytes, records {', '.join(what) or 'steps only'}")
    return out


def _nonfinite_lines(nf: dict | None) -> list[str]:
    """`info --nonfinite`: a headline, then one line per (kind, layer or site, param) with NaN/Inf."""
    if nf is None:
        return []
    if not nf["found"]:
        return ["nonfinite none (gradients, weights and activation statistics scanned)"]
    out = [f"nonfinite NaN/Inf first at step {nf['first_step']} in {len(nf['layers'])} layer(s) or site(s)"]
    for e in nf["entries"]:
        what = f"{e['layer'] or '(model)'}" + (f" ({e['param']})" if e["param"] else "")
        out.append(f"nonfinite   {e['kind']} of {what}: first at step {e['first_step']}, {e['count']:,} "
                   f"value(s) in {e['steps']} step(s)")
    return out


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def layers(run_dir: str, as_json: bool) -> None:
    """The layer table of RUN_DIR: id, name, type, parameter count."""
    run = open_run(run_dir)
    df = run.layers[["id", "name", "type", "n_params", "selected"]]
    if as_json:
        echo(df.to_json(orient="records"))
    else:
        echo(df.to_string(index=False))
