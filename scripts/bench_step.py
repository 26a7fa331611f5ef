#!/usr/bin/env python
"""Host time of ``Recorder.step()`` alone (default settings, CPU), against a no-op A/A control.

The per-step cost on the training thread of the gradient statistics (and the step's hand-off to the
writer), for a model of many small parameter tensors (``--model many``: 150 tensors, the default),
the reference CNN (10 tensors) or the tiny GPT-2 / BERT of ``bbdecoder.recorder.demo``.

Method: every parameter gets a fresh gradient tensor before each call (as after ``zero_grad()`` and
``backward()``; two pre-generated sets alternate, not timed). Three settings run in blocks of
``--calls`` calls, in an order rotated each round: ``rec.step`` (a default ``Recorder``) and two
identical no-op callables (``noop-A``, ``noop-B``: the A/A control of the timer and the machine).
Each call is timed with ``time.perf_counter``; a setting's figure is the median over all its calls;
the paired figure is the median over rounds of (rec.step's block median - noop-A's block median).
The writer thread is drained between blocks (not timed); its CPU time per step (pthread CPU clock)
is reported too.

Usage::

    .venv/bin/python scripts/bench_step.py [--model many|cnn|gpt2|bert] [--rounds 15] [--calls 40]
                                           [--threads 1] [--tensors 150]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from bbdecoder.recorder import Recorder
from bbdecoder.recorder.demo import make_many_tensor_mlp, make_reference_cnn, make_tiny_bert, make_tiny_gpt2

TARGET_MS = 1.0   # target for rec.step on the 150-tensor model


def _noop():
    return None


def _writer_cpu(rec):
    th = getattr(getattr(rec, "_writer", None), "_thread", None)   # benchmark instrumentation only
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(th.ident))
    except (AttributeError, OSError, TypeError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("many", "cnn", "gpt2", "bert"), default="many")
    ap.add_argument("--tensors", type=int, default=150, help="parameter tensors of --model many (default 150)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=40, help="calls per block (default 40)")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = {"many": lambda: make_many_tensor_mlp(args.tensors), "cnn": make_reference_cnn,
             "gpt2": make_tiny_gpt2, "bert": make_tiny_bert}[args.model]()
    params = list(model.parameters())
    sets = [[torch.randn_like(p) for p in params] for _ in range(2)]
    n_el = sum(p.numel() for p in params)
    print(f"--model {args.model}: {len(params)} parameter tensors, {n_el:,} elements; torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads; {args.rounds} rounds x {args.calls} calls per setting",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bbd-step-") as tmp:
        rec = Recorder(model, f"{tmp}/run")
        i = [0]

        def grads():
            i[0] += 1
            for p, g in zip(params, sets[i[0] % 2]):
                p.grad = g   # another tensor object than at the last step, as after backward()

        settings = {"rec.step": rec.step, "noop-A": _noop, "noop-B": _noop}
        times = {k: [] for k in settings}
        block_meds = {k: [] for k in settings}
        wcpu, nsteps = 0.0, 0
        perf = time.perf_counter
        for _ in range(args.warmup):
            grads()
            rec.step()
        rec._writer.drain()
        names = list(settings)
        for r in range(args.rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                fn, ts = settings[name], []
                w0 = _writer_cpu(rec) if name == "rec.step" else None
                for _ in range(args.calls):
                    grads()
                    t = perf()
                    fn()
                    ts.append(perf() - t)
                if name == "rec.step":
                    rec._writer.drain()
                    w1 = _writer_cpu(rec)
                    if w0 is not None and w1 is not None:
                        wcpu += w1 - w0
                        nsteps += args.calls
                times[name] += ts
                block_meds[name].append(statistics.median(ts))
        rec.close()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    paired = statistics.median(a - b for a, b in zip(block_meds["rec.step"], block_meds["noop-A"])) * 1e3
    aa = statistics.median(a - b for a, b in zip(block_meds["noop-B"], block_meds["noop-A"])) * 1e3
    mean = statistics.fmean(times["rec.step"]) * 1e3   # with the snapshot steps (grads/weights every 50)
    print(f"rec.step: median {med['rec.step']:.3f} ms per call (mean {mean:.3f} ms, with the raw snapshot "
          f"steps); paired (minus noop-A, per round) "
          f"{paired:.3f} ms; A/A control noop-B - noop-A {aa * 1e3:+.1f} us (noop medians "
          f"{med['noop-A'] * 1e3:.2f} / {med['noop-B'] * 1e3:.2f} us)")
    if nsteps:
        print(f"writer thread CPU: {wcpu / nsteps * 1e3:.3f} ms per step")
    if args.model == "many":
        print(f"target <= {TARGET_MS:.1f} ms on the {len(params)}-tensor model: "
              f"{'OK' if paired <= TARGET_MS else 'ABOVE TARGET'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
