#!/usr/bin/env python
"""The analyzer at 100,000 layers (issue 16): `bbdecoder report`, `info` and `check` on a trace of a
model with ``--layers`` layers, each measured in a child process.

1. Generates the trace torch-free with the recorder's own storage classes (analyzer.trace.series.
   ShardSeriesWriter + HDF5Backend, the payload forms the recorder hands them): a layer table of
   ``--layers`` Linear layers (weight (4, 4), bias (4,)) named like a deep stack of repeated blocks,
   ``blocks.<b>.mlp.<j>`` with ``--per-block`` layers per block; packed gradient statistics every step
   (the recorder's default, ``grad_stats_every=1``; one (P, 6) payload per step, as
   ``recorder.packing`` hands it over), with a gradient scale that falls with depth and a planted
   vanishing block; weight snapshots every ``--weights-every`` steps (0: none), one payload per
   parameter as the recorder writes them today.
2. Runs ``bbdecoder report RUN --out OUT``, ``bbdecoder info RUN`` and ``bbdecoder check RUN`` in child
   processes: wall seconds, peak memory (ru_maxrss of the child from os.wait4, and the summed PSS of its
   whole process tree sampled every 50 ms: figure workers included), exit status; then the size of
   index.html and of the whole report directory.
3. Prints one table: each figure beside its target (report < 60 s, peak memory <= 600 MB plus the
   data a command must keep, index.html < 2 MB, every exit status 0).

Usage::

    .venv/bin/python scripts/bench_many_layers.py                 # 100,000 layers
    .venv/bin/python scripts/bench_many_layers.py --layers 5000   # smoke run
    .venv/bin/python scripts/bench_many_layers.py --profile report   # + cProfile of the report (top 30)

The generated trace is removed at the end unless ``--keep`` (or ``--run DIR`` reuses one kept earlier).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bbdecoder.analyzer.trace import files  # noqa: E402
from bbdecoder.analyzer.trace import format as fmt  # noqa: E402
from bbdecoder.analyzer.trace.hdf5 import HDF5Backend  # noqa: E402
from bbdecoder.analyzer.trace.series import ShardSeriesWriter, StepRecord  # noqa: E402
from bench_outofcore import run_child  # noqa: E402

REPORT_S_TARGET = 60.0
RSS_BASE_MB = 600            # issue 16: about 600 MB plus the data a command must keep
HTML_MB_TARGET = 2.0
SHAPES = (("weight", (4, 4)), ("bias", (4,)))


def make_manifest(n_layers: int, per_block: int, steps: int, epochs: int) -> dict:
    """The manifest (format contract) of ``n_layers`` Linear layers in blocks of ``per_block``."""
    names = [f"blocks.{i // per_block}.mlp.{i % per_block}" for i in range(n_layers)]
    pkeys = fmt.assign_keys([p for p, _ in SHAPES])
    table = []
    for i, (name, key) in enumerate(zip(names, fmt.assign_keys(names))):
        table.append({"id": i, "name": name, "type": "Linear", "class": "torch.nn.modules.linear.Linear",
                      "key": key, "params": [{"name": p, "key": k, "shape": list(s), "dtype": "float32",
                                              "numel": int(np.prod(s)), "requires_grad": True}
                                             for (p, s), k in zip(SHAPES, pkeys)],
                      "n_params": 20, "selected": True})
    return {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "created": time.time(),
            "status": fmt.STATUS_RECORDING, "world_size": 1, "host": "bench_many_layers",
            "model": {"class": "bench_many_layers.DeepStack", "n_params": 20 * n_layers},
            "config": {"generator": "scripts/bench_many_layers.py", "grad_stats_every": "every(1)",
                       "selected_layers": list(range(n_layers))},
            "layers": table}


def generate(run_dir: str, n_layers: int, per_block: int, steps: int, epochs: int, weights_every: int,
             seed: int = 0) -> dict:
    """Write the trace; returns a description (layers, parameters, steps, bytes, seconds)."""
    t0 = time.perf_counter()
    manifest = make_manifest(n_layers, per_block, steps, epochs)
    os.makedirs(run_dir)
    files.write_json_atomic(os.path.join(run_dir, fmt.MANIFEST), manifest)
    rng = np.random.default_rng(seed)
    keys = tuple((L["key"], q["key"]) for L in manifest["layers"] for q in L["params"])
    attrs = [{"layer": L["name"], "layer_id": L["id"], "param": q["name"]}
             for L in manifest["layers"] for q in L["params"]]
    numel = np.array([q["numel"] for L in manifest["layers"] for q in L["params"]], np.float64)
    depth = np.repeat(np.arange(n_layers), len(SHAPES)) / max(1, n_layers - 1)
    scale = 1e-2 * 10.0 ** (-2.0 * depth)                     # gradients fall 100x through the stack
    dead_block = (np.repeat(np.arange(n_layers), len(SHAPES)) // per_block) == (n_layers // per_block) // 2
    scale[dead_block] *= 1e-6                                 # one vanishing block in the middle
    w0 = rng.standard_normal(int(numel.sum())).astype(np.float32) * np.float32(0.5)
    offs = np.concatenate([[0], np.cumsum(numel).astype(np.int64)])
    per_epoch = max(1, steps // epochs)
    series = ShardSeriesWriter(os.path.join(run_dir, fmt.rank_dirname(0)), 0, flush_steps=100, flush_secs=1e9,
                               max_shard_bytes=1 << 40, backend=HDF5Backend())
    t_wall = time.time()
    for step in range(steps):
        g = scale * (1.0 + 0.1 * rng.standard_normal(len(keys)))
        s = np.empty((len(keys), len(fmt.GRAD_STAT_FIELDS)), np.float64)
        s[:, 0], s[:, 1] = numel, 0.0                          # count, nonfinite
        s[:, 2] = g * 0.01 * numel                             # sum
        s[:, 3] = g * g * numel                                # sumsq: ||g||^2 = numel * g^2
        s[:, 4] = np.abs(g) * 0.8 * numel                      # sum |g|
        s[:, 5] = np.abs(g) * 3.0                              # max |g|
        payloads = [(fmt.KIND_GRAD_STATS, None, keys, s, attrs)]
        if weights_every and step % weights_every == 0:
            w = w0 * np.float32(1.0 + 1e-3 * step)
            for j, (lk, pk) in enumerate(keys):
                payloads.append((fmt.KIND_WEIGHTS, lk, pk, w[offs[j]:offs[j + 1]].reshape(SHAPES[j % 2][1]),
                                 attrs[j]))
        loss = float(2.5 * np.exp(-3.0 * step / steps) + 0.05 * rng.random())
        series.write([StepRecord(step=step, epoch=min(epochs - 1, step // per_epoch), loss=loss,
                                 time=t_wall + 0.1 * step, payloads=payloads)])
    series.close()
    manifest.update(status=fmt.STATUS_COMPLETE, ended=time.time(), steps=steps, epochs=epochs)
    files.write_json_atomic(os.path.join(run_dir, fmt.MANIFEST), manifest)
    shards = [p for _, rdir in fmt.iter_rank_dirs(run_dir) for _, p in fmt.list_shards(rdir)[0]]
    return {"layers": n_layers, "params": len(keys), "per_block": per_block, "steps": steps, "epochs": epochs,
            "weights_every": weights_every, "shards": len(shards),
            "bytes": sum(os.path.getsize(f) for f in shards), "seconds": time.perf_counter() - t0}


CLI = "import sys; from bbdecoder.analyzer.cli import main; main(sys.argv[1:])"
PROFILE = ("import cProfile, os, sys; from bbdecoder.analyzer.cli import main; pr = cProfile.Profile(); "
           "pr.enable()\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
           "pr.disable(); pr.dump_stats(os.environ['BENCH_PROFILE_OUT'])")


def cli(args: list[str], profile: str | None = None) -> dict:
    """``bbdecoder args...`` in a child process: wall s, peak RSS MB (largest process), peak tree PSS MB,
    exit status. ``profile``: a path; the child runs under cProfile, and the top 40 functions by
    cumulative time are printed (stderr)."""
    if profile:
        os.environ["BENCH_PROFILE_OUT"] = profile
    wall, rss, rc, tail = run_child(["-c", PROFILE if profile else CLI] + args)
    if profile and os.path.exists(profile):
        import pstats
        pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    elif profile:
        print(f"no profile written (exit {rc}):\n{tail[-600:]}", file=sys.stderr)
    return {"s": wall, "rss_MB": rss, "pss_MB": run_child.peak_pss_mb, "rc": rc, "err": tail[-600:]}


def dir_bytes(d: str) -> int:
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(d) for f in fs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=100_000)
    ap.add_argument("--per-block", type=int, default=100, help="layers per repeated block")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--weights-every", type=int, default=0,
                    help="weight snapshots every N steps (0: none; one HDF5 dataset per parameter, slow to write)")
    ap.add_argument("--dir", default=None, help="where to create the trace (default: the temp directory)")
    ap.add_argument("--run", default=None, help="measure this existing trace instead of generating one")
    ap.add_argument("--profile", choices=["report", "info", "check"], default=None,
                    help="also run that command under cProfile (stderr: the top 40 by cumulative time)")
    ap.add_argument("--keep", action="store_true", help="keep the generated trace and report")
    ap.add_argument("--json", dest="as_json", action="store_true", help="also print the results as JSON")
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bbdecoder-manylayers-", dir=a.dir)
    run_dir, out_dir = a.run or os.path.join(work, "run"), os.path.join(work, "report")
    try:
        if a.run is None:
            print(f"generating {a.layers:,} layers in {run_dir} ...", file=sys.stderr, flush=True)
            g = generate(run_dir, a.layers, a.per_block, a.steps, a.epochs, a.weights_every)
        else:
            with open(os.path.join(run_dir, fmt.MANIFEST), encoding="utf-8") as f:
                m = json.load(f)
            shards = [p for _, rdir in fmt.iter_rank_dirs(run_dir) for _, p in fmt.list_shards(rdir)[0]]
            g = {"layers": len(m["layers"]), "params": sum(len(L["params"]) for L in m["layers"]),
                 "steps": m.get("steps", 0), "shards": len(shards), "seconds": 0.0,
                 "bytes": sum(os.path.getsize(p) for p in shards)}
        res = {"trace": g, "load": os.getloadavg()}
        for name, args in (("report", ["report", run_dir, "--out", out_dir]), ("info", ["info", run_dir]),
                           ("check", ["check", run_dir])):
            print(f"running bbdecoder {name} ...", file=sys.stderr, flush=True)
            res[name] = cli(args)
            if a.profile == name:
                cli(args[:3] + [os.path.join(work, "report-profile")] if name == "report" else args,
                    profile=os.path.join(work, f"{name}.prof"))
        html = os.path.join(out_dir, "index.html")
        res["index_html_bytes"] = os.path.getsize(html) if os.path.exists(html) else None
        res["report_dir_bytes"] = dir_bytes(out_dir) if os.path.isdir(out_dir) else None
        res["load_after"] = os.getloadavg()
        rep = res["report"]
        trace_mb = g["bytes"] / 1e6
        budget = RSS_BASE_MB + trace_mb   # generous: at most the whole trace kept beside the base
        mem = lambda r: max(r["rss_MB"], r["pss_MB"] or 0)   # noqa: E731
        ok = lambda b: "met" if b else "NOT met"   # noqa: E731
        rows = [("trace", f"{g['layers']:,} layers, {g['params']:,} parameters, {g['steps']} steps, "
                          f"{trace_mb:,.1f} MB in {g['shards']} shard(s) (generated in {g['seconds']:.1f} s)"),
                ("load average", f"{res['load'][0]:.2f} before, {res['load_after'][0]:.2f} after "
                                 f"({os.cpu_count()} CPUs)")]
        for name in ("report", "info", "check"):
            r = res[name]
            rows.append((f"bbdecoder {name}", f"{r['s']:.1f} s, peak {mem(r):,.0f} MB (largest process "
                                              f"{r['rss_MB']:,.0f} MB), exit {r['rc']}"))
        ok_exit = all(res[n]["rc"] in (0, 1) if n == "check" else res[n]["rc"] == 0
                      for n in ("report", "info", "check"))
        rows += [
            ("report time", f"{rep['s']:.1f} s   (target < {REPORT_S_TARGET:.0f} s: {ok(rep['s'] < REPORT_S_TARGET)})"),
            ("report memory", f"{mem(rep):,.0f} MB   (target <= {RSS_BASE_MB} MB + the trace's "
                              f"{trace_mb:,.0f} MB: {ok(mem(rep) <= budget)})"),
            ("index.html", f"{(res['index_html_bytes'] or 0) / 1e6:.2f} MB   (target < {HTML_MB_TARGET} MB: "
                           f"{ok((res['index_html_bytes'] or 1e12) < HTML_MB_TARGET * 1e6)})"),
            ("report directory", f"{(res['report_dir_bytes'] or 0) / 1e6:.2f} MB"),
            ("exit statuses", f"report {rep['rc']}, info {res['info']['rc']}, check {res['check']['rc']} "
                              f"(check: 1 = findings)   (target: no crash: {ok(ok_exit)})"),
        ]
        w = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
        for name in ("report", "info", "check"):
            if res[name]["rc"] not in (0, 1):
                print(f"--- {name} stderr tail:\n{res[name]['err']}", file=sys.stderr)
        if a.as_json:
            print(json.dumps(res, indent=1, default=str))
        return 0 if ok_exit else 1
    finally:
        if a.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
