#!/usr/bin/env python
"""Report speed on a transformer trace (issue 17, item 3): ``bbdecoder report`` on a 12-block GPT-2-style
trace of 200 steps, target under 15 s on 2 cores.

1. Records the trace once (``--run``, kept; skipped when it exists): the pure-torch GPT-2-style decoder of
   ``bbdecoder.recorder.demo`` (``--blocks`` blocks, d=64, 4 heads, context 64), AdamW, ``--steps``
   steps of batch 16 on synthetic tokens, default recorder settings plus ``weights_every=10`` and
   activation statistics (``activations=True``).
2. Times ``bbdecoder report RUN --out OUT --force`` in a child process (the command users run: start-up,
   statistics, figures, HTML), ``--repeat`` times, and prints each wall time, the median, the number
   of figures and the target. With ``--check-browser`` the report is then checked in headless Chromium
   (scripts/check_report_browser.py --screenshot: screenshots under OUT/screenshots/).

Usage::

    .venv/bin/python scripts/bench_report.py --run /tmp/gpt2-12 --out /tmp/gpt2-12-report
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def record(run: str, blocks: int, steps: int) -> None:
    import torch
    from torch import nn

    from bbdecoder import Recorder
    from bbdecoder.recorder.demo import make_tiny_gpt2, synthetic_tokens
    torch.manual_seed(0)
    m = make_tiny_gpt2(layers=blocks)
    ids, nxt, _ = synthetic_tokens(16 * steps)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    per_epoch = max(1, steps // 4)
    with Recorder(m, run, activations=True, weights_every=10) as rec:
        for s in range(steps):
            logits = m(ids[16 * s:16 * s + 16])
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), nxt[16 * s:16 * s + 16].flatten())
            opt.zero_grad()
            loss.backward()
            rec.step(loss=loss)
            opt.step()
            if (s + 1) % per_epoch == 0:
                rec.epoch_end()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="trace directory (recorded when absent)")
    ap.add_argument("--out", required=True, help="report directory")
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--check-browser", action="store_true")
    a = ap.parse_args()
    if not os.path.exists(os.path.join(a.run, "manifest.json")):
        t = time.perf_counter()
        record(a.run, a.blocks, a.steps)
        print(f"recorded {a.steps} steps of a {a.blocks}-block GPT-2-style model in {time.perf_counter() - t:.1f} s")
    exe = os.path.join(os.path.dirname(sys.executable), "bbdecoder")
    times = []
    for i in range(a.repeat):
        t = time.perf_counter()
        p = subprocess.run([exe, "report", a.run, "--out", a.out, "--force"], capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if p.returncode:
            print(p.stderr, file=sys.stderr)
            return 1
        print(f"run {i + 1}: {times[-1]:.2f} s")
    s = json.load(open(os.path.join(a.out, "summary.json")))
    med = statistics.median(times)
    print(f"bbdecoder report: median {med:.2f} s over {a.repeat} runs ({len(s['figures'])} figures, "
          f"{len(s['layers'])} layers, {s['steps']} steps, {os.cpu_count()} CPUs); target < 15 s: "
          f"{'OK' if med < 15 else 'MISSED'}")
    if a.check_browser:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run([sys.executable, os.path.join(here, "check_report_browser.py"), a.out,
                               "--screenshot"]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
