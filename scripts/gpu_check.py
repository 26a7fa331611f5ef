"""GPU check of the recorder's hot path: no device synchronisation, overhead, pinned memory.

Run wherever a CUDA GPU is available (a few minutes; one call)::

    PYTHONPATH=. python scripts/gpu_check.py --out /tmp/gpu-check --json result.json

For each model: a ResNet-50-sized CNN (torchvision's resnet50 if importable, else a local bottleneck
ResNet of the same widths; about 25.6 M parameters), batch 64, 224x224; and the GPT-2-style decoder
of issue 14 (6 blocks, d=512, 8 heads, 16 x 64 tokens, next-token loss); SGD with momentum:

1. calls ``rec.step()`` (and the forward, where activation hooks run) under
   ``torch.cuda.set_sync_debug_mode("error")``: any synchronising CUDA call on the training thread
   raises, so "ok" means the hot path never synchronised (the steps include ones where raw tensors
   are copied);
2. measures step time without the recorder (twice: ``baseline`` and ``baseline_2``, the A/A control)
   and with it, interleaved in rounds with the order rotated: default settings (gradient statistics
   on the device every step, raw gradients and weights every 50 steps); ``raw_grads_every_step``
   (``grads_every=1``: the disk's limit); ``grad_stats_only`` (``grads_every=0, weights_every=0``);
   ``activations`` (default plus ``activations=True``). Each block ends with
   ``torch.cuda.synchronize()`` and, for the recorder, the writer's drain (queued writer work is paid
   inside the timed region). Ratios: mean over blocks (issue 14's targets: default <= 1.03,
   activations <= 1.10), the median block, and the median over rounds of the block time against
   the mean of both baselines in the same round with a 95% bootstrap interval. Also the host time
   spent inside ``rec.step()``;
3. checks the gradient statistics computed on the GPU against float64 torch on the same gradients
   (one step: L2 norm, max |g|, mean per parameter; max relative difference);
4. reports peak pinned (page-locked) host memory from the caching host allocator and the disk's
   sequential write bandwidth, the physical limit when every step writes ~100 MB of gradients;
5. counts the kernel launches the activation statistics add per site and step (torch.profiler:
   launches issued inside the statistics calls and the step's hand-over,
   :func:`bbdecoder.recorder.fused_ops.site_ops`), fused pass and its uncompiled fallback, on both
   models; target: at most 3 per site (``--ops-only``: this part alone, a minute).

Prints the results as JSON, then a markdown table for the README. ``--cpu-smoke`` runs parts 1-3 on
the CPU with small models (tests/recorder/test_gpu_check_smoke.py), so that the script is known to
work before a GPU session's short device time is spent on it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bbdecoder.recorder import Recorder  # noqa: E402


def resnet50_like() -> nn.Module:
    try:
        import torchvision
        return torchvision.models.resnet50(weights=None)
    except Exception:
        pass

    class Bottleneck(nn.Module):
        def __init__(self, cin, mid, stride):
            super().__init__()
            cout = mid * 4
            self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
            self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
            self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = torch.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    layers, cin = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for mid, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(n):
            layers.append(Bottleneck(cin, mid, stride if i == 0 else 1))
            cin = mid * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers)


def host_pinned_peak() -> int | None:
    for name in ("host_memory_stats",):
        fn = getattr(torch.cuda, name, None) or getattr(torch.cuda.memory, name, None)
        if fn is not None:
            try:
                st = fn()
                for k in ("allocated_bytes.current.peak", "allocated_bytes.peak", "reserved_bytes.peak"):
                    if k in st:
                        return int(st[k])
                peaks = {k: v for k, v in st.items() if "peak" in k and "bytes" in k}
                if peaks:
                    return int(max(peaks.values()))
            except Exception:
                pass
    return None


def disk_write_bandwidth(d: str, nbytes: int = 1 << 30) -> float:
    a = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
    p = os.path.join(d, "bw.bin")
    t = time.perf_counter()
    with open(p, "wb") as f:
        a.tofile(f)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    os.unlink(p)
    return nbytes / dt


def site_ops_table(dev, batch: int = 64) -> list:
    """Part 5: operations per site and step that the activation statistics add (the fused pass and
    the same statistics uncompiled, the fallback; ResNet-50 and a GPT-2-style decoder), printed as a
    table and returned as rows."""
    from bbdecoder.recorder.demo import make_tiny_gpt2
    from bbdecoder.recorder.fused_ops import site_ops
    x = torch.randn(batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    ids = torch.randint(0, 512, (16, 64), device=dev)
    models = {"resnet50": (resnet50_like, lambda i: x, lambda o, i: nn.functional.cross_entropy(o, y)),
              "gpt2-6x512": (lambda: make_tiny_gpt2(d=512, layers=6, heads=8), lambda i: ids,
                             lambda o, i: nn.functional.cross_entropy(o[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))}
    rows = []
    for name, (build, batch_of, loss_of) in models.items():
        for path in ("fused", "eager"):
            torch.manual_seed(0)
            try:
                r = site_ops(build().to(dev), batch_of, loss_of, fused=path == "fused")
            except Exception as e:   # report, do not lose the rest of the check
                r = {"error": f"{type(e).__name__}: {e}"}
            rows.append(dict(model=name, path=path, **r))
    print(f"{'model':<12} {'path':<10} {'sites':>5} {'calls':>5} {'per call':>8} {'per site/step':>13}  unit")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<12} {r['path']:<10} error: {r['error']}")
        else:
            print(f"{r['model']:<12} {r['path']:<10} {r['sites']:>5} {r['calls']:>5} {r['per_call']:>8.1f} "
                  f"{r['per_site_step']:>13.1f}  {r['unit']} (target <= 3)")
    return rows


def workloads(dev, batch: int, smoke: bool) -> dict:
    """name -> (build model, input, loss of output): the ResNet-50 (batch ``batch``, 224x224, 1000
    classes) and the GPT-2-style decoder of the issue (6 blocks, d=512, 8 heads, 16 x 64 tokens,
    next-token loss). ``smoke``: small sizes, to exercise this script on a CPU."""
    from bbdecoder.recorder.demo import make_tiny_gpt2
    side, n_tok = (64, 4) if smoke else (224, 16)
    x = torch.randn(batch, 3, side, side, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    ids = torch.randint(0, 512, (n_tok, 64), device=dev)
    d, L, h = (64, 2, 4) if smoke else (512, 6, 8)
    return {"resnet50": (resnet50_like, x, lambda o: nn.functional.cross_entropy(o, y)),
            f"gpt2-{L}x{d}": (lambda: make_tiny_gpt2(d=d, layers=L, heads=h), ids,
                              lambda o: nn.functional.cross_entropy(o[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))}


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _sync_debug(dev, mode) -> None:
    if dev.type == "cuda":
        torch.cuda.set_sync_debug_mode(mode)


def median_ci(x, n_boot: int = 4000) -> tuple[float, float, float]:
    """(median of x, 2.5th and 97.5th percentile of the median over bootstrap resamples)."""
    x = np.asarray(x, np.float64)
    meds = np.median(x[np.random.default_rng(0).integers(0, len(x), (n_boot, len(x)))], axis=1)
    return float(np.median(x)), float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))


def time_model(name: str, build, x, loss_of, dev, base: str, rounds: int, steps: int) -> dict:
    """Parts 1-3 for one model: the hot path under sync debug mode "error", the interleaved timing of
    every setting (each block synchronised and, for the recorder, drained), the gradient statistics
    against float64 torch. Returns the model's results."""
    res: dict = {}
    settings = {"baseline": None, "default": {}, "grad_stats_only": dict(grads_every=0, weights_every=0),
                "raw_grads_every_step": dict(grads_every=1), "activations": dict(activations=True),
                "baseline_2": None}
    state = {}
    for sname, kw in settings.items():
        torch.manual_seed(0)
        m = build().to(dev)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        rec = None if kw is None else Recorder(m, os.path.join(base, name, sname), overwrite=True, **kw)
        state[sname] = (m, opt, rec)
    res["n_params"] = sum(p.numel() for p in state["baseline"][0].parameters())
    step_host = {k: [] for k in settings}
    ref = {}

    def run_steps(sname, n, sync_debug=False, keep_ref=False):
        m, opt, rec = state[sname]
        for _ in range(n):
            if sync_debug:   # the forward too: activation hooks run there
                _sync_debug(dev, "error")
            try:
                loss = loss_of(m(x))
            finally:
                _sync_debug(dev, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if rec is not None:
                if keep_ref:
                    ref[rec.step_index] = {pn: (p.grad.double().norm().item(), p.grad.abs().max().item(),
                                                p.grad.double().mean().item(), p.numel())
                                           for pn, p in m.named_parameters() if p.grad is not None}
                if sync_debug:
                    _sync_debug(dev, "error")
                t0 = time.perf_counter()
                try:
                    rec.step(loss=loss)
                finally:
                    step_host[sname].append(time.perf_counter() - t0)
                    if sync_debug:
                        _sync_debug(dev, 0)
            opt.step()

    # 1. the hot path under sync debug mode "error" from the first step (step 0 copies raw
    # gradients, weights and activation samples; later steps only statistics), then warm-up
    sync = {}
    for sname in settings:   # cuDNN picks its algorithms (it synchronises) in unrecorded passes first
        m, opt, _ = state[sname]
        for _ in range(2):
            loss_of(m(x)).backward()
        opt.zero_grad(set_to_none=True)
    _sync(dev)
    for sname in settings:
        if settings[sname] is None:
            run_steps(sname, 3)
            continue
        try:
            run_steps(sname, 3, sync_debug=True)
            _sync(dev)
            sync[sname] = "ok"
        except Exception as e:  # any synchronising call raises here
            sync[sname] = f"{type(e).__name__}: {e}"
            _sync_debug(dev, 0)
    run_steps("default", 1, keep_ref=True)
    _sync(dev)
    res["sync_debug_error_mode"] = sync
    res["sync_debug_error_mode_ok"] = all(v == "ok" for v in sync.values())
    for sname in settings:
        if state[sname][2] is not None:
            state[sname][2].flush()
    for k in step_host:
        step_host[k].clear()

    # 2. interleaved timing, the order rotated every round
    times = {k: [] for k in settings}
    order = list(settings)
    for r in range(rounds):
        for sname in order[r % len(order):] + order[:r % len(order)]:
            _sync(dev)
            t = time.perf_counter()
            run_steps(sname, steps)
            _sync(dev)
            if state[sname][2] is not None:   # what a running job pays: everything queued written
                state[sname][2]._writer.drain()
            times[sname].append((time.perf_counter() - t) / steps)
    # the mean over blocks: raw tensors every 50 steps fall into some blocks only
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    both = (np.array(times["baseline"]) + np.array(times["baseline_2"])) / 2
    res["ms_per_step"] = {k: round(v * 1e3, 2) for k, v in mean.items()}
    res["ratio_vs_baseline"] = {k: round(v / mean["baseline"], 3) for k, v in mean.items()}
    res["ratio_vs_baseline_median_block"] = {k: round(v / med["baseline"], 3) for k, v in med.items()}
    res["ratio_vs_both_baselines_paired"] = {k: [round(v, 3) for v in median_ci(np.array(times[k]) / both)]
                                             for k in settings if settings[k] is not None}
    res["rec_step_host_ms"] = {k: round(statistics.median(v) * 1e3, 3) for k, v in step_host.items() if v}
    for sname, (m, opt, rec) in state.items():
        if rec is not None:
            rec.close()
    # 3. the gradient statistics computed on the device against float64 torch
    from bbdecoder import analyzer
    for sname in settings:
        if settings[sname] is not None:
            run = analyzer.open(os.path.join(base, name, sname))
            res.setdefault("mb_per_step", {})[sname] = round(run.nbytes / max(1, len(run.steps)) / 1e6, 2)
            res.setdefault("status", {})[sname] = run.status
            if sname == "default":
                df = run.grad_stats()
                worst = 0.0
                for st, per in ref.items():
                    sub = df[df["step"] == st]
                    got = {(f"{lay}.{par}" if lay else par): (l2, mx, mn) for lay, par, l2, mx, mn in
                           zip(sub["layer"], sub["param"], sub["l2"], sub["max_abs"], sub["mean"])}
                    assert got.keys() == per.keys(), (sorted(got)[:3], sorted(per)[:3])
                    for k, (l2, mx, mn, n) in per.items():
                        g = got[k]   # the mean relative to the root mean square (a mean may be ~0)
                        worst = max(worst, abs(g[0] - l2) / max(l2, 1e-30), abs(g[1] - mx) / max(mx, 1e-30),
                                    abs(g[2] - mn) / max(l2 / np.sqrt(n), 1e-30))
                res["grad_stats_vs_torch_max_rel_diff"] = worst
    return res


def summary(res: dict) -> list[str]:
    """Markdown rows: model, setting, ms/step, mean ratio, median block, paired (95% interval), target."""
    targets = {"default": 1.03, "activations": 1.10}
    lines = ["| model | setting | ms/step | ratio (mean over blocks) | median block | paired vs both baselines "
             "(95% interval) | host ms in rec.step | target |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, r in res["models"].items():
        for k, ms in r["ms_per_step"].items():
            p = r["ratio_vs_both_baselines_paired"].get(k)
            t = targets.get(k)
            lines.append(f"| {model} | {k} | {ms} | {r['ratio_vs_baseline'][k]} | "
                         f"{r['ratio_vs_baseline_median_block'][k]} | "
                         + (f"{p[0]} ({p[1]}-{p[2]})" if p else "") + f" | {r['rec_step_host_ms'].get(k, '')} | "
                         + ("" if t is None else f"{t} {'met' if r['ratio_vs_baseline'][k] <= t else 'NOT met'}")
                         + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="directory for the runs (default: a temp dir)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--models", default="resnet50,gpt2", help="comma-separated: resnet50, gpt2 (default both)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--ops-only", action="store_true", help="only part 5 (kernel launches per site and step)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run every part but 4-5 on the CPU with small models (checks this script, no figures)")
    args = ap.parse_args()
    smoke = args.cpu_smoke
    if not smoke:
        assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cpu" if smoke else "cuda")
    name = "cpu (smoke run)" if smoke else torch.cuda.get_device_name()
    if args.ops_only:
        res = {"device": name, "torch": torch.__version__, "activation_ops": site_ops_table(dev)}
        print(json.dumps(res, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    base = args.out or tempfile.mkdtemp(prefix="bbd-gpu-")
    os.makedirs(base, exist_ok=True)
    res: dict = {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "models": {}}
    if not smoke:
        torch.backends.cudnn.benchmark = True
    want = [m.strip() for m in args.models.split(",") if m.strip()]
    for model, (build, x, loss_of) in workloads(dev, args.batch, smoke).items():
        if model.split("-")[0] in want:
            print(f"timing {model} ...", flush=True)
            res["models"][model] = time_model(model, build, x, loss_of, dev, base, args.rounds, args.steps)
    if not smoke:
        res["pinned_host_peak_bytes"] = host_pinned_peak()
        res["cuda_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        res["activation_ops"] = site_ops_table(dev, args.batch)
        bw = disk_write_bandwidth(base)
        res["disk_write_GBps"] = round(bw / 1e9, 2)
        if "resnet50" in res["models"]:
            res["write_limit_ms_per_step_raw_grads"] = round(res["models"]["resnet50"]["n_params"] * 4 / bw * 1e3, 2)
    print(json.dumps(res, indent=1))
    print("\n".join(summary(res)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if not args.out:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
