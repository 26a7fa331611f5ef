#!/usr/bin/env python3
"""Compare two report directories made from the same workload (e.g. `bbdecoder demo` before and
after a refactor): every number in summary.json and tables/*.csv must agree to a relative
tolerance, everything else must be identical, times and paths aside.

    python scripts/compare_reports.py BEFORE/report AFTER/report [--rtol 1e-12]

What is compared:
- summary.json: the same keys and list lengths; numbers to ``rtol`` (relative, with an absolute floor
  of 1e-300); strings and booleans equal. Ignored: ``seconds``, ``created``, ``run.path`` and
  ``parameters.run`` / ``parameters.out_dir`` (where the two reports were written).
- tables/*.csv: the same files, headers and row counts; numeric cells to ``rtol``; other cells
  equal. Ignored: the ``time`` and ``wall`` columns of steps.csv (wall-clock times of the run).
- figures/: the same file names.
- index.html: equal after the two runs' directories and ISO timestamps are masked and whitespace
  is collapsed.

Prints one line per difference and a summary; exits 0 when the reports agree, 1 otherwise.
Two demo runs of the same code differ by up to ~1e-14 relative (threaded float reductions in training).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys

IGNORED_SUMMARY = {("seconds",), ("created",), ("run", "path"), ("parameters", "run"), ("parameters", "out_dir")}
IGNORED_COLUMNS = {"steps.csv": {"time", "wall"}}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?")


def _close(a: float, b: float, rtol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-300)


def _num(s: str):
    try:
        return float(s)
    except ValueError:
        return None


def compare_json(a, b, rtol: float, path: tuple = ()) -> list[str]:
    """Differences between two JSON values, one line each."""
    if path in IGNORED_SUMMARY:
        return []
    where = "/".join(map(str, path)) or "(root)"
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"summary {where}: key {k!r} only in {'before' if k in a else 'after'}"
               for k in sorted(set(a) ^ set(b)) if path + (k,) not in IGNORED_SUMMARY]
        for k in sorted(set(a) & set(b)):
            out += compare_json(a[k], b[k], rtol, path + (k,))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"summary {where}: {len(a)} items before, {len(b)} after"]
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += compare_json(x, y, rtol, path + (i,))
        return out
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return [] if a == b else [f"summary {where}: {a!r} before, {b!r} after"]
    return [] if _close(float(a), float(b), rtol) else [f"summary {where}: {a!r} before, {b!r} after"]


def compare_csv(pa: str, pb: str, rtol: float) -> list[str]:
    """Differences between two CSV tables, one line each (at most 20 cells reported)."""
    name = os.path.basename(pa)
    with open(pa, newline="", encoding="utf-8") as f:
        ra = list(csv.reader(f))
    with open(pb, newline="", encoding="utf-8") as f:
        rb = list(csv.reader(f))
    if not ra or not rb or ra[0] != rb[0]:
        return [f"{name}: headers differ ({ra[:1]} / {rb[:1]})"]
    if len(ra) != len(rb):
        return [f"{name}: {len(ra) - 1} rows before, {len(rb) - 1} after"]
    skip = {i for i, c in enumerate(ra[0]) if c in IGNORED_COLUMNS.get(name, ())}
    out = []
    for r, (x, y) in enumerate(zip(ra[1:], rb[1:]), 1):
        for c, (u, v) in enumerate(zip(x, y)):
            if c in skip or u == v:
                continue
            nu, nv = _num(u), _num(v)
            if nu is None or nv is None or not _close(nu, nv, rtol):
                out.append(f"{name} row {r} column {ra[0][c]}: {u!r} before, {v!r} after")
    return out[:20] + ([f"{name}: {len(out) - 20} more cells differ"] if len(out) > 20 else [])


def _masked_html(path: str, run_dirs: list[str]) -> str:
    with open(path, encoding="utf-8") as f:
        s = f.read()
    for d in sorted(run_dirs, key=len, reverse=True):
        if d:
            s = s.replace(d, "<dir>")
    s = TIMESTAMP.sub("<time>", s)
    return " ".join(s.split())


def compare(before: str, after: str, rtol: float = 1e-12) -> tuple[list[str], dict]:
    """All differences between two report directories, and counts of what was compared."""
    diffs: list[str] = []
    with open(os.path.join(before, "summary.json"), encoding="utf-8") as f:
        sa = json.load(f)
    with open(os.path.join(after, "summary.json"), encoding="utf-8") as f:
        sb = json.load(f)
    diffs += compare_json(sa, sb, rtol)
    ta = sorted(os.listdir(os.path.join(before, "tables")))
    tb = sorted(os.listdir(os.path.join(after, "tables")))
    if ta != tb:
        diffs.append(f"tables differ: {sorted(set(ta) ^ set(tb))}")
    cells = 0
    for t in sorted(set(ta) & set(tb)):
        diffs += compare_csv(os.path.join(before, "tables", t), os.path.join(after, "tables", t), rtol)
        with open(os.path.join(before, "tables", t), encoding="utf-8") as f:
            cells += sum(len(line.split(",")) for line in f)
    fa = sorted(os.listdir(os.path.join(before, "figures")))
    fb = sorted(os.listdir(os.path.join(after, "figures")))
    if fa != fb:
        diffs.append(f"figures differ: {sorted(set(fa) ^ set(fb))}")
    dirs = []
    for s in (sa, sb):
        dirs += [str(s.get("run", {}).get("path", "")), str(s.get("parameters", {}).get("out_dir", "")),
                 str(s.get("parameters", {}).get("run", ""))]
    ha = _masked_html(os.path.join(before, "index.html"), dirs)
    hb = _masked_html(os.path.join(after, "index.html"), dirs)
    if ha != hb:
        i = next((k for k, (x, y) in enumerate(zip(ha, hb)) if x != y), min(len(ha), len(hb)))
        diffs.append(f"index.html differs at character {i}: ...{ha[max(0, i - 60):i + 60]!r} before, "
                     f"...{hb[max(0, i - 60):i + 60]!r} after")
    return diffs, {"tables": len(ta), "cells": cells, "figures": len(fa)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rtol", type=float, default=1e-12)
    a = ap.parse_args(argv)
    for d in (a.before, a.after):
        if not os.path.isfile(os.path.join(d, "summary.json")):
            print(f"compare_reports: error: {d} is not a report directory (no summary.json)", file=sys.stderr)
            return 2
    diffs, n = compare(a.before, a.after, a.rtol)
    for d in diffs:
        print(d)
    print(f"{len(diffs)} difference(s); compared summary.json, {n['tables']} tables ({n['cells']} cells), "
          f"{n['figures']} figure names and index.html at rtol {a.rtol:g}")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
