#!/usr/bin/env python
"""Out-of-core benchmark (issue 5, section 4): the full report of a trace larger than a memory budget.

1. Generates a trace of about ``--gb`` GB of shards directly with the storage layer (torch-free:
   analyzer.trace.series.ShardSeriesWriter and the analyzer.trace.format manifest contract): a
   ResNet-like layer table (convolutions, batch norms, a linear head) whose width is chosen so that
   ``--steps`` steps give ``--gb``; random float32 gradients every step with their gradient
   statistics (packed, every step: the recorder's default ``grad_stats_every=1``, so the gradient
   findings run), weight snapshots every ``--weights-every`` steps, and per-unit activation
   statistics (ReLU sites after every convolution) every step, computed with numpy from small random
   activation batches.
2. Measures raw sequential h5py read throughput of the same files: every ``values`` dataset read in
   chunk-aligned blocks of about analyzer.engine.BLOCK_BYTES, in file order (bytes of shards / seconds).
3. Runs ``bbdecoder report RUN --out OUT`` in a child process (the code path users run) and measures
   its wall time and its peak resident set size (ru_maxrss of that child, from os.wait4: measured
   by the kernel, not estimated; and the summed PSS of its process tree, sampled every 50 ms).
4. Runs the report's data passes alone (the same Run / activation calls, no figures, no HTML) in
   another child process, to separate the streaming statistics from the figure drawing.
5. Runs ``bbdecoder check RUN`` (issue 18: under 10 s).
6. Prints a table, each figure beside its target: peak memory against 600 MB, report throughput
   (bytes of shards / wall seconds of the report process, start-up and figures included) as a
   fraction of the raw read throughput against 0.4, the data passes alone against 0.6, check's
   seconds against 10, and the load average (the figures are noisy on a shared machine).

Page cache: ``--cache cold`` (default) drops the shards' pages (fsync, then
os.posix_fadvise(POSIX_FADV_DONTNEED) on every shard file) before each measurement, so both read
from the disk (or whatever caches the host keeps below this VM); ``--cache warm`` reads every shard
once before each measurement so that both read from the page cache. The raw read is measured
before and after the report and the faster of the two is used (the conservative choice for the
ratio).

The generated trace is removed at the end unless ``--keep``; ``--reuse DIR`` measures a kept one
again, ``--repeat N`` measures raw read, report and passes N times, interleaved, and reports the
medians (the raw read: the fastest). Usage::

    .venv/bin/python scripts/bench_outofcore.py              # 2 GB
    .venv/bin/python scripts/bench_outofcore.py --gb 0.1     # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bbdecoder.analyzer.trace import files  # noqa: E402
from bbdecoder.analyzer.trace import format as fmt  # noqa: E402
from bbdecoder.analyzer.engine import BLOCK_BYTES  # noqa: E402
from bbdecoder.analyzer.trace.hdf5 import HDF5Backend  # noqa: E402
from bbdecoder.analyzer.trace.packed import FlatLayout  # noqa: E402
from bbdecoder.analyzer.trace.series import ShardSeriesWriter, StepRecord  # noqa: E402

RSS_TARGET_MB = 600
RATIO_TARGET = 0.4           # issue 17 item 3: the report at least 0.4 of a raw h5py read
PASSES_RATIO_TARGET = 0.6    # issue 17 item 3: the statistics passes at least 0.6
CHECK_S_TARGET = 10.0        # issue 18 item 6: `bbdecoder check` on this trace in under 10 s
BASE_CHANNELS = (16, 32, 64, 128, 256)
ACT_STATS = ("sum", "sum_abs", "sumsq", "min", "max", "n_pos", "count", "nonfinite")
RELU_SAMPLES = 64          # activation values per unit and step behind the synthetic statistics


def layer_specs(width: float) -> list[tuple[str, str, list[tuple[str, tuple[int, ...]]]]]:
    """A ResNet-like layer table: (name, type, [(param, shape)]) with channels scaled by ``width``."""
    ch = [max(4, int(round(c * width))) for c in BASE_CHANNELS]
    specs = [("stem.conv", "Conv2d", [("weight", (ch[0], 3, 3, 3))]),
             ("stem.bn", "BatchNorm2d", [("weight", (ch[0],)), ("bias", (ch[0],))])]
    cin = ch[0]
    for i, c in enumerate(ch):
        for j in range(2):
            pre = f"layer{i + 1}.{j}"
            specs.append((f"{pre}.conv1", "Conv2d", [("weight", (c, cin, 3, 3))]))
            specs.append((f"{pre}.bn1", "BatchNorm2d", [("weight", (c,)), ("bias", (c,))]))
            specs.append((f"{pre}.conv2", "Conv2d", [("weight", (c, c, 3, 3))]))
            specs.append((f"{pre}.bn2", "BatchNorm2d", [("weight", (c,)), ("bias", (c,))]))
            cin = c
    specs.append(("fc", "Linear", [("weight", (100, cin)), ("bias", (100,))]))
    return specs


def n_params(specs) -> int:
    return int(sum(np.prod(s) for _, _, ps in specs for _, s in ps))


def pick_width(target_params: int) -> float:
    """Largest width multiplier whose layer table has at most ``target_params`` parameters."""
    lo, hi = 0.05, 64.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if n_params(layer_specs(mid)) <= target_params:
            lo = mid
        else:
            hi = mid
    return lo


def make_manifest(specs) -> tuple[dict, list[dict]]:
    """Manifest (format contract) and the activation site records (ReLU after every convolution)."""
    table = []
    for (name, typ, ps), key in zip(specs, fmt.assign_keys([s[0] for s in specs])):
        pkeys = fmt.assign_keys([p for p, _ in ps])
        table.append({"id": len(table), "name": name, "type": typ, "key": key,
                      "params": [{"name": p, "key": k, "shape": list(s), "dtype": "float32",
                                  "numel": int(np.prod(s)), "requires_grad": True}
                                 for (p, s), k in zip(ps, pkeys)],
                      "n_params": int(sum(np.prod(s) for _, s in ps)), "selected": True})
    sites = []
    for L in table:
        if L["type"] != "Conv2d":
            continue
        U = L["params"][0]["shape"][0]
        name = L["name"].replace("conv", "relu")
        sites.append({"name": name, "key": fmt.sanitize(name), "kind": "relu", "source": "module",
                      "module": name, "unit_axis": 1, "units": U, "sample_shape": [U, 8, 8],
                      "bounds": None, "softmax_dim": None, "hist_edges": None, "family": "relu",
                      "stats": {**{k: [U] for k in ("sum", "sum_abs", "sumsq", "min", "max", "n_pos")},
                                "count": [], "nonfinite": []}})
    manifest = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "created": time.time(),
                "status": fmt.STATUS_RECORDING, "world_size": 1, "host": "bench_outofcore",
                "model": {"class": "bench_outofcore.ResNetLike", "n_params": n_params(specs)},
                "config": {"generator": "scripts/bench_outofcore.py"}, "layers": table, "sites": sites}
    return manifest, sites


def generate(run_dir: str, gb: float, steps: int, epochs: int, weights_every: int, seed: int = 0,
             layout: str = "flat") -> dict:
    """Write the trace; returns a description (layers, parameters, bytes, seconds).

    ``layout``: ``"flat"`` hands raw gradients and weights over as the recorder does (one flat row of
    all tensors per step and kind, :class:`analyzer.trace.packed.FlatLayout`); ``"per-tensor"`` one
    payload per tensor, as the recorder did before flat snapshots (both layouts are read)."""
    t0 = time.perf_counter()
    per_step_rows = 1.0 + 1.0 / weights_every
    width = pick_width(int(gb * 1e9 / (4 * steps * per_step_rows)))
    specs = layer_specs(width)
    manifest, sites = make_manifest(specs)
    os.makedirs(run_dir)
    files.write_json_atomic(os.path.join(run_dir, fmt.MANIFEST), manifest)
    rng = np.random.default_rng(seed)
    P = n_params(specs)
    pool = rng.standard_normal(P + (1 << 20), dtype=np.float32)   # slices at random offsets, scaled
    w0 = {}
    off = 0
    for L in manifest["layers"]:
        for q in L["params"]:
            n = q["numel"]
            w0[(L["key"], q["key"])] = (pool[off:off + n] * (1.0 / np.sqrt(max(1, n // q["shape"][0])))
                                        ).reshape(q["shape"])
            off += n
    keys = tuple((L["key"], q["key"]) for L in manifest["layers"] for q in L["params"])
    attrs = [{"layer": L["name"], "layer_id": L["id"], "param": q["name"]}
             for L in manifest["layers"] for q in L["params"]]
    entries = []   # the flat row's layout: (layer_key, param_key, start, numel, shape, attrs)
    for L in manifest["layers"]:
        for q in L["params"]:
            start = entries[-1][2] + entries[-1][3] if entries else 0
            entries.append((L["key"], q["key"], start, q["numel"], tuple(q["shape"]),
                            {"layer_id": L["id"], "layer": L["name"], "param": q["name"]}))
    flat = FlatLayout(entries)
    act_entries = []   # the activation statistics' flat row: per site every statistic of ACT_STATS
    for S in sites:
        for k in ACT_STATS:
            shape = (S["units"],) if k in ("sum", "sum_abs", "sumsq", "min", "max", "n_pos") else ()
            start = act_entries[-1][2] + act_entries[-1][3] if act_entries else 0
            act_entries.append((S["key"], k, start, int(np.prod(shape, dtype=np.int64)), shape, None))
    act_flat = FlatLayout(act_entries)
    per_epoch = max(1, steps // epochs)
    rows_per_shard = max(2, min(100, int((256 << 20) // max(1, 4 * P))))   # shards of ~256 MB
    series = ShardSeriesWriter(os.path.join(run_dir, fmt.rank_dirname(0)), 0, flush_steps=rows_per_shard,
                               flush_secs=1e9, max_shard_bytes=1 << 40, backend=HDF5Backend())
    t_wall = time.time()
    for step in range(steps):
        depth_scale = 1.0 / (1.0 + step / steps)
        payloads, grow, wrow = [], [], []
        gstats = np.empty((len(keys), len(fmt.GRAD_STAT_FIELDS)), np.float64)
        j = 0
        for i, L in enumerate(manifest["layers"]):
            for q in L["params"]:
                n = q["numel"]
                o = int(rng.integers(0, len(pool) - n))
                g = (pool[o:o + n] * np.float32(1e-3 * depth_scale * (0.7 ** (len(specs) - i) + 0.05)))
                grow.append(g)
                if layout == "per-tensor":
                    payloads.append((fmt.KIND_GRADS, L["key"], q["key"], g.reshape(q["shape"]), {}))
                g64 = g.astype(np.float64)     # the recorder's gradient statistics (float64 sums), every step
                gstats[j] = (n, 0.0, g64.sum(), np.dot(g64, g64), np.abs(g64).sum(), np.abs(g64).max())
                j += 1
                if step % weights_every == 0:
                    w = w0[(L["key"], q["key"])] * np.float32(1.0 + 0.01 * step / steps)
                    wrow.append(w.reshape(-1))
                    if layout == "per-tensor":
                        payloads.append((fmt.KIND_WEIGHTS, L["key"], q["key"], w, {}))
        if layout == "flat":   # as recorder.packing hands raw snapshots over: one flat row per kind
            payloads.append((fmt.KIND_GRADS, None, flat, np.concatenate(grow), None))
            if wrow:
                payloads.append((fmt.KIND_WEIGHTS, None, flat, np.concatenate(wrow), None))
        payloads.append((fmt.KIND_GRAD_STATS, None, keys, gstats, attrs))   # packed, as the recorder hands it
        arow = []
        for j, S in enumerate(sites):
            U = S["units"]
            a = np.maximum(rng.standard_normal((RELU_SAMPLES, U), dtype=np.float32) + np.float32(0.5 - j * 0.05),
                           0, dtype=np.float32).astype(np.float64)
            a[:, : max(1, U // 10)] = 0.0                                   # a tenth of the units is dead
            st = {"sum": a.sum(0), "sum_abs": np.abs(a).sum(0), "sumsq": (a * a).sum(0), "min": a.min(0),
                  "max": a.max(0), "n_pos": (a > 0).sum(0).astype(np.float64),
                  "count": np.float64(RELU_SAMPLES), "nonfinite": np.float64(0)}
            arow += [np.asarray(st[k], np.float64).reshape(-1) for k in ACT_STATS]
        if layout == "flat":   # float64, one flat row per step, as recorder.packing hands the statistics over
            payloads.append((fmt.KIND_ACT_STATS, None, act_flat, np.concatenate(arow), None))
        else:
            for (lk, pk, _, _, shape, _), v in zip(act_flat.entries, arow):
                payloads.append((fmt.KIND_ACT_STATS, lk, pk, v.reshape(shape), {}))
        loss = float(2.5 * np.exp(-3.0 * step / steps) + 0.05 * rng.random())
        series.write([StepRecord(step=step, epoch=min(epochs - 1, step // per_epoch), loss=loss,
                                 time=t_wall + 0.1 * step, payloads=payloads)])
    series.close()
    manifest.update(status=fmt.STATUS_COMPLETE, ended=time.time(), steps=steps, epochs=epochs)
    files.write_json_atomic(os.path.join(run_dir, fmt.MANIFEST), manifest)
    shards = shard_files(run_dir)
    return {"layers": len(specs), "params": P, "layout": layout, "sites": len(sites), "steps": steps, "epochs": epochs,
            "weights_every": weights_every, "shards": len(shards), "bytes": sum(os.path.getsize(f) for f in shards),
            "seconds": time.perf_counter() - t0}


def shard_files(run_dir: str) -> list[str]:
    out = []
    for _, rdir in fmt.iter_rank_dirs(run_dir):
        out += [p for _, p in fmt.list_shards(rdir)[0]]
    return out


def prepare_cache(files: list[str], mode: str) -> None:
    """cold: fsync and drop every shard's pages from the page cache; warm: read every shard once."""
    for p in files:
        if mode == "cold":
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        else:
            with open(p, "rb") as f:
                while f.read(16 << 20):
                    pass


def raw_read(files: list[str]) -> tuple[float, int]:
    """Read every ``values`` dataset of every shard in chunk-aligned blocks with h5py.

    Returns:
        (seconds, bytes of values read).
    """
    import h5py
    nread = 0
    t0 = time.perf_counter()
    for p in files:
        with h5py.File(p, "r") as f:
            dsets = []
            f.visititems(lambda name, o: dsets.append(o) if isinstance(o, h5py.Dataset)
                         and name.endswith("/values") else None)
            for ds in dsets:
                rows = ds.shape[0]
                if not rows:
                    continue
                row_bytes = max(1, ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64)))
                chunk = ds.chunks[0] if ds.chunks else rows
                per = max(1, BLOCK_BYTES // row_bytes)
                if per >= chunk:
                    per -= per % chunk
                for a in range(0, rows, per):
                    nread += ds[a:min(rows, a + per)].nbytes
    return time.perf_counter() - t0, nread


#: The report's streaming passes without its figures and HTML: what `bbdecoder report` reads and computes.
PASSES = r"""
import sys
from bbdecoder.analyzer import activations as A, open as open_run
run = open_run(sys.argv[1], engine=sys.argv[2])
with run.keep_open():      # as the report does
    ids = run.select(None)
    run.grad_stats(layers=ids); run.grad_stats(per="epoch", layers=ids); run.grad_stats(by="layer", layers=ids)
    run.weight_stats(layers=ids)
    for L in run.layers.itertuples(index=False):
        run.weight_histograms(int(L.id), bins=64)
    A.dead_units(run, "strict", 0.0, 0.0, layer_share=0.5); A.dead_per_step(run, "strict", 0.0, 0.0)
    A.saturation(run, 0.03); A.saturation_layers(run, 0.03, unit_fraction=0.5, layer_share=0.5)
    A.activation_stats(run, per="epoch")
"""


def tree_pss_mb(root: int) -> float | None:
    """Proportional set size (MB) of process ``root`` and all its descendants, summed (Linux:
    /proc/PID/smaps_rollup; pages shared by forked processes are split between them, so the sum
    is the memory the tree really holds). None where /proc does not tell."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, todo = {root}, [root]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p and c not in tree:
                tree.add(c)
                todo.append(c)
    total, seen = 0, False
    for p in tree:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        seen = True
                        break
        except OSError:
            pass
    return total / 1024 if seen else None


def run_child(args: list[str]) -> tuple[float, float, int, str]:
    """``python args...`` in a child process (stdout discarded).

    Returns:
        (wall seconds, peak RSS of the child in MB (ru_maxrss from os.wait4: the largest single
        process of its tree, figure workers included), exit status, stderr tail). The peak of the
        whole tree's summed PSS, sampled every 50 ms, is stored in ``run_child.peak_pss_mb``.
    """
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), MPLBACKEND="Agg")
    err = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable] + args, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)
    peak = [None]
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            v = tree_pss_mb(p.pid)
            if v is not None and (peak[0] is None or v > peak[0]):
                peak[0] = v
    th = threading.Thread(target=sample, daemon=True)
    if os.path.exists("/proc/self/smaps_rollup"):
        th.start()
    _, status, ru = os.wait4(p.pid, 0)
    done.set()
    if th.is_alive():
        th.join()
    run_child.peak_pss_mb = peak[0]
    run_child.cpu_s = ru.ru_utime + ru.ru_stime     # CPU seconds of the child and its reaped workers
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    tail = err.read().decode(errors="replace")[-2000:]
    scale = 1 if sys.platform == "darwin" else 1024          # ru_maxrss: bytes on macOS, KiB on Linux
    return wall, ru.ru_maxrss * scale / 1e6, p.returncode, tail


def run_report(run_dir: str, out_dir: str, engine: str) -> tuple[float, float, int, str]:
    """``bbdecoder report RUN --out OUT --engine ENGINE`` in a child process (see :func:`run_child`)."""
    code = "import sys; from bbdecoder.analyzer.cli import main; main(sys.argv[1:])"
    return run_child(["-c", code, "report", run_dir, "--out", out_dir, "--engine", engine])


def run_passes(run_dir: str, engine: str) -> tuple[float, float, int, str]:
    """The report's data passes only (:data:`PASSES`) in a child process (see :func:`run_child`)."""
    return run_child(["-c", PASSES, run_dir, engine])


def floor_line(cpu: float, pcpu: float, raw: float, ncpu: int) -> str:
    """The least wall time the measured CPU work can take on ``ncpu`` CPUs (all of them busy, no
    wait for the disk) beside the wall time each ratio target allows at the raw read of ``raw`` s."""
    def one(name: str, cpu_s: float, ratio: float) -> str:
        floor, allowed = cpu_s / ncpu, raw / ratio
        verdict = "reachable" if floor <= allowed else "out of reach on these CPUs"
        return f"{name} {cpu_s:.1f} CPU s / {ncpu} = {floor:.2f} s (target {ratio} allows {allowed:.2f} s: {verdict})"
    return f"{one('report', cpu, RATIO_TARGET)}; {one('passes', pcpu, PASSES_RATIO_TARGET)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=2.0, help="size of the generated shards in GB (1e9 bytes)")
    ap.add_argument("--steps", type=int, default=200, help="recorded steps (gradients every step)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--weights-every", type=int, default=10)
    ap.add_argument("--layout", choices=["flat", "per-tensor"], default="flat",
                    help="raw gradients and weights as the recorder writes them (flat rows) or one payload per "
                         "tensor (the recorder's layout before flat snapshots)")
    ap.add_argument("--dir", default=None, help="where to create the trace (default: the temp directory)")
    ap.add_argument("--cache", choices=["cold", "warm"], default="cold")
    ap.add_argument("--engine", default="local", choices=["local", "dask"], help="`bbdecoder report --engine`")
    ap.add_argument("--keep", action="store_true", help="keep the generated trace and report")
    ap.add_argument("--reuse", default=None, metavar="DIR",
                    help="measure the trace kept in DIR by an earlier --keep (no generation; DIR is kept)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure raw read, report and passes this many times, interleaved; medians reported")
    ap.add_argument("--json", dest="as_json", action="store_true", help="also print the results as JSON")
    a = ap.parse_args(argv)
    if not (a.gb > 0 and a.steps >= a.epochs >= 1 and a.weights_every >= 1):
        ap.error("need --gb > 0, --steps >= --epochs >= 1 and --weights-every >= 1")
    if a.repeat < 1:
        ap.error("need --repeat >= 1")
    base = a.dir or tempfile.gettempdir()
    if a.reuse is not None:
        return measure(a, a.reuse, json.load(open(os.path.join(a.reuse, "bench.json"))), keep=True)
    if not os.path.isdir(base):
        print(f"bench_outofcore: --dir {base} is not an existing directory", file=sys.stderr)
        return 2
    free = shutil.disk_usage(base).free
    if free < 1.3 * a.gb * 1e9 + (200 << 20):
        print(f"bench_outofcore: only {free / 1e9:.1f} GB free in {base}, need about {1.3 * a.gb:.1f} GB",
              file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="bbdecoder-outofcore-", dir=base)
    try:
        run_dir = os.path.join(work, "run")
        print(f"generating ~{a.gb:g} GB in {run_dir} ...", file=sys.stderr, flush=True)
        g = generate(run_dir, a.gb, a.steps, a.epochs, a.weights_every, layout=a.layout)
        with open(os.path.join(work, "bench.json"), "w") as f:
            json.dump(g, f)
        return measure(a, work, g, a.keep)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(a, work: str, g: dict, keep: bool) -> int:
    """Measure the trace in ``work``/run (generated as ``g`` describes) and print the table."""
    run_dir, out_dir = os.path.join(work, "run"), os.path.join(work, "report")
    try:
        files = shard_files(run_dir)
        raws, reps, passes = [], [], []
        for _ in range(a.repeat):   # interleaved: raw, report, passes, raw, ...
            prepare_cache(files, a.cache)
            raws.append(raw_read(files))
            prepare_cache(files, a.cache)
            print("running bbdecoder report ...", file=sys.stderr, flush=True)
            shutil.rmtree(out_dir, ignore_errors=True)
            r = run_report(run_dir, out_dir, a.engine)
            if r[2] != 0:
                print(f"bench_outofcore: bbdecoder report failed (exit {r[2]}):\n{r[3]}", file=sys.stderr)
                return 1
            reps.append(r[:2] + (run_child.peak_pss_mb, run_child.cpu_s))
            prepare_cache(files, a.cache)
            print("running the report's data passes alone ...", file=sys.stderr, flush=True)
            r = run_passes(run_dir, a.engine)
            if r[2] != 0:
                print(f"bench_outofcore: the data passes failed (exit {r[2]}):\n{r[3]}", file=sys.stderr)
                return 1
            passes.append(r[:2] + (run_child.cpu_s,))
        med = lambda xs: sorted(xs)[len(xs) // 2]   # noqa: E731 - the median run (upper for even counts)
        nvals = raws[0][1]
        wall = med([x[0] for x in reps])
        rss = max(x[1] for x in reps)
        pss = max((x[2] for x in reps if x[2] is not None), default=None)
        cpu = med([x[3] for x in reps])
        pwall, prss, pcpu = med([x[0] for x in passes]), max(x[1] for x in passes), med([x[2] for x in passes])
        prepare_cache(files, a.cache)
        print("running bbdecoder check ...", file=sys.stderr, flush=True)
        code = "import sys; from bbdecoder.analyzer.cli import main; main(sys.argv[1:])"
        cwall, crss, crc, ctail = run_child(["-c", code, "check", run_dir])
        if crc not in (0, 1):     # 1: findings (a CI gate's "unhealthy"), not a failure
            print(f"bench_outofcore: bbdecoder check failed (exit {crc}):\n{ctail}", file=sys.stderr)
            return 1
        prepare_cache(files, a.cache)
        raw2, _ = raw_read(files)
        raw = min(min(x[0] for x in raws), raw2)
        B = g["bytes"]
        raw_tp, rep_tp, pass_tp = B / raw, B / wall, B / pwall
        res = {**g, "cache": a.cache, "engine": a.engine, "values_bytes": nvals, "repeat": a.repeat,
               "raw_read_s": [round(x[0], 3) for x in raws] + [round(raw2, 3)],
               "report_runs_s": [round(x[0], 3) for x in reps], "passes_runs_s": [round(x[0], 3) for x in passes], "raw_MBps": raw_tp / 1e6,
               "report_s": wall, "report_MBps": rep_tp / 1e6, "ratio": rep_tp / raw_tp, "peak_rss_MB": rss,
               "peak_tree_pss_MB": pss,
               "report_cpu_s": cpu, "passes_cpu_s": pcpu, "passes_s": pwall, "passes_MBps": pass_tp / 1e6, "passes_ratio": pass_tp / raw_tp,
               "passes_peak_rss_MB": prss, "check_s": cwall, "check_peak_rss_MB": crss, "check_exit": crc,
               "load_avg": os.getloadavg(), "figures": len(os.listdir(os.path.join(out_dir, "figures")))}
        ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        res.update(cpus=ncpu, report_floor_s=cpu / ncpu, passes_floor_s=pcpu / ncpu,
                   report_target_s=raw / RATIO_TARGET, passes_target_s=raw / PASSES_RATIO_TARGET)
        ok_rss, ok_ratio = max(rss, pss or 0) <= RSS_TARGET_MB, res["ratio"] >= RATIO_TARGET
        met = lambda b: "met" if b else "NOT met"   # noqa: E731
        rows = [
            ("trace", f"{B / 1e9:.3f} GB in {g['shards']} shards; {g['layers']} layers, {g['params']:,} parameters, "
                      f"{g['sites']} ReLU sites; raw snapshots {g['layout']}; {g['steps']} steps, {g['epochs']} epochs, weights every "
                      f"{g['weights_every']} (generated in {g['seconds']:.1f} s)"),
            ("page cache", f"{a.cache} before every measurement"),
            ("raw h5py read", f"{raw:.2f} s  ->  {raw_tp / 1e6:,.0f} MB/s   (fastest of the runs: "
                              f"{', '.join(f'{x:.2f}' for x in res['raw_read_s'])} s; {nvals / 1e9:.3f} GB of values)"),
            ("bbdecoder report", f"{wall:.2f} s  ->  {rep_tp / 1e6:,.0f} MB/s   (median of "
                                 f"{', '.join(f'{x:.2f}' for x in res['report_runs_s'])} s; engine {res['engine']}, "
                                 f"{res['figures']} figures; {cpu:.1f} CPU s, workers included)"),
            ("throughput ratio", f"{res['ratio']:.3f}   (target >= {RATIO_TARGET}: {met(ok_ratio)})"),
            ("peak RSS (report)", f"{rss:,.0f} MB, largest process; all its processes together (PSS, sampled "
                                  f"every 50 ms): {'n/a' if pss is None else f'{pss:,.0f} MB'}   "
                                  f"(target <= {RSS_TARGET_MB} MB: {'met' if ok_rss else 'NOT met'})"),
            ("data passes alone", f"{pwall:.2f} s  ->  {pass_tp / 1e6:,.0f} MB/s (median of "
                                  f"{', '.join(f'{x:.2f}' for x in res['passes_runs_s'])} s), peak RSS {prss:,.0f} MB, "
                                  f"{pcpu:.1f} CPU s   (the report without figures and HTML; split across "
                                  f"the CPUs available)"),
            ("passes ratio", f"{res['passes_ratio']:.3f}   (target >= {PASSES_RATIO_TARGET}: "
                             f"{met(res['passes_ratio'] >= PASSES_RATIO_TARGET)})"),
            ("bbdecoder check", f"{cwall:.2f} s, peak RSS {crss:,.0f} MB, exit {crc}   (target < {CHECK_S_TARGET:g} s: "
                                f"{met(cwall < CHECK_S_TARGET)})"),
            ("load average", f"{res['load_avg'][0]:.2f} (1 min) at the end, {os.cpu_count()} CPUs"),
            ("figures + HTML", f"about {max(0.0, wall - pwall):.1f} s of the report's {wall:.1f} s"),
            ("CPU floor", floor_line(cpu, pcpu, raw, ncpu)),
        ]
        w = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
        if a.as_json:
            print(json.dumps(res, indent=1))
        return 0 if ok_rss else 1
    finally:
        if keep:
            print(f"kept {work} (measure it again with --reuse {work})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
