"""GPU check of the recorder's hot path: no device synchronisation, overhead, pinned memory.

Run wherever a CUDA GPU is available::

    PYTHONPATH=. python scripts/gpu_check.py --out /tmp/gpu-check --json result.json

What it does, on a ResNet-50-sized model (torchvision's resnet50 if importable, else a local
bottleneck ResNet of the same widths; about 25.6 M parameters), batch 64, 224x224, SGD:
1. calls ``rec.step()`` under ``torch.cuda.set_sync_debug_mode("error")``: any synchronising CUDA
   call on the training thread raises, so "ok" means the hot path never synchronised;
   (for every recorder setting below, the steps include ones where raw tensors are copied);
2. measures step time without the recorder and with it, interleaved in rounds: default settings
   (gradient statistics on the device every step, raw gradients and weights every 50 steps);
   ``raw_grads_every_step`` (``grads_every=1``: ~100 MB of raw gradients per step, the disk's
   limit); ``grad_stats_only`` (``grads_every=0, weights_every=0``); ``activations`` (default plus
   ``activations=True``: per-unit activation statistics every step, raw samples every 50). Each
   block ends with ``torch.cuda.synchronize()`` and, for the recorder, the writer's drain (queued
   writer work is paid for inside the timed region); ratios are means over blocks (medians
   beside them). Also the host time spent inside ``rec.step()`` (the training thread's cost);
3. checks the gradient statistics computed on the GPU against float64 torch on the same gradients
   (one step: L2 norm, max |g|, mean per parameter; max relative difference);
4. reports peak pinned (page-locked) host memory from the caching host allocator and the disk's
   sequential write bandwidth, the physical limit when every step writes ~100 MB of gradients;
5. counts the kernel launches the activation statistics add per site and step (torch.profiler:
   launches issued inside the statistics calls and the step's hand-over,
   :func:`bbdecoder.recorder.fused_ops.site_ops`), fused pass and its uncompiled fallback, on the
   ResNet-50 and on a GPT-2-style decoder (6 blocks, d=512); target: at most 3 per site. Printed as a
   table (``--ops-only``: this part alone, a minute).
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="directory for the runs (default: a temp dir)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default=None)
    ap.add_argument("--ops-only", action="store_true", help="only part 5 (kernel launches per site and step)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
    if args.ops_only:
        res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "activation_ops": site_ops_table(dev)}
        print(json.dumps(res, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        return
    base = args.out or tempfile.mkdtemp(prefix="bbd-gpu-")
    os.makedirs(base, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    torch.backends.cudnn.benchmark = True
    x = torch.randn(args.batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (args.batch,), device=dev)

    def make():
        torch.manual_seed(0)
        m = resnet50_like().to(dev)
        return m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

    settings = {"baseline": None, "default": {}, "grad_stats_only": dict(grads_every=0, weights_every=0),
                "raw_grads_every_step": dict(grads_every=1), "activations": dict(activations=True)}
    state = {}
    for name, kw in settings.items():
        m, opt = make()
        rec = None if kw is None else Recorder(m, os.path.join(base, name), overwrite=True, **kw)
        state[name] = (m, opt, rec)
    res["n_params"] = sum(p.numel() for p in state["baseline"][0].parameters())

    step_host = {k: [] for k in settings}
    ref = {}

    def run_steps(name, n, sync_debug=False, keep_ref=False):
        m, opt, rec = state[name]
        for _ in range(n):
            if sync_debug:   # the forward too: activation hooks run there
                torch.cuda.set_sync_debug_mode("error")
            try:
                loss = nn.functional.cross_entropy(m(x), y)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if rec is not None:
                if keep_ref:
                    ref[rec.step_index] = {pn: (p.grad.double().norm().item(), p.grad.abs().max().item(),
                                                p.grad.double().mean().item(), p.numel())
                                           for pn, p in m.named_parameters() if p.grad is not None}
                if sync_debug:
                    torch.cuda.set_sync_debug_mode("error")
                t0 = time.perf_counter()
                try:
                    rec.step(loss=loss)
                finally:
                    step_host[name].append(time.perf_counter() - t0)
                    if sync_debug:
                        torch.cuda.set_sync_debug_mode(0)
            opt.step()

    # 1. the hot path under sync debug mode "error" from the first step (step 0 copies raw
    # gradients, weights and activation samples; later steps only statistics), then warm-up
    sync = {}
    for name in settings:   # cuDNN picks its algorithms (it synchronises) in unrecorded passes first
        m, opt, _ = state[name]
        for _ in range(2):
            nn.functional.cross_entropy(m(x), y).backward()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    for name in settings:
        if settings[name] is None:
            run_steps(name, 3)
            continue
        try:
            run_steps(name, 3, sync_debug=True)
            torch.cuda.synchronize()
            sync[name] = "ok"
        except Exception as e:  # any synchronising call raises here
            sync[name] = f"{type(e).__name__}: {e}"
            torch.cuda.set_sync_debug_mode(0)
    run_steps("default", 1, keep_ref=True)
    torch.cuda.synchronize()
    res["sync_debug_error_mode"] = sync
    res["sync_debug_error_mode_ok"] = all(v == "ok" for v in sync.values())
    for name in settings:
        if state[name][2] is not None:
            state[name][2].flush()
    for k in step_host:
        step_host[k].clear()

    # 2. interleaved timing
    times = {k: [] for k in settings}
    order = list(settings)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            torch.cuda.synchronize()
            t = time.perf_counter()
            run_steps(name, args.steps)
            torch.cuda.synchronize()
            if state[name][2] is not None:   # what a running job pays: everything queued written
                state[name][2]._writer.drain()
            times[name].append((time.perf_counter() - t) / args.steps)
    # the mean over blocks: raw tensors every 50 steps fall into some blocks only
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    res["ms_per_step"] = {k: round(v * 1e3, 2) for k, v in mean.items()}
    res["ratio_vs_baseline"] = {k: round(v / mean["baseline"], 3) for k, v in mean.items()}
    res["ratio_vs_baseline_median_block"] = {k: round(v / med["baseline"], 3) for k, v in med.items()}
    res["rec_step_host_ms"] = {k: round(statistics.median(v) * 1e3, 3) for k, v in step_host.items() if v}
    res["pinned_host_peak_bytes"] = host_pinned_peak()
    res["cuda_max_memory_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    for name, (m, opt, rec) in state.items():
        if rec is not None:
            rec.close()
    from bbdecoder import analyzer
    for name in settings:
        if settings[name] is not None:
            run = analyzer.open(os.path.join(base, name))
            res.setdefault("mb_per_step", {})[name] = round(run.nbytes / max(1, len(run.steps)) / 1e6, 2)
            res.setdefault("status", {})[name] = run.status
            if name == "default":   # statistics computed on the GPU against float64 torch
                df = run.grad_stats()
                worst = 0.0
                for s, per in ref.items():
                    sub = df[df["step"] == s]
                    got = {(f"{lay}.{par}" if lay else par): (l2, mx, mean) for lay, par, l2, mx, mean in
                           zip(sub["layer"], sub["param"], sub["l2"], sub["max_abs"], sub["mean"])}
                    assert got.keys() == per.keys(), (sorted(got)[:3], sorted(per)[:3])
                    for k, (l2, mx, mean, n) in per.items():
                        g = got[k]   # the mean relative to the root mean square (a mean may be ~0)
                        worst = max(worst, abs(g[0] - l2) / max(l2, 1e-30), abs(g[1] - mx) / max(mx, 1e-30),
                                    abs(g[2] - mean) / max(l2 / np.sqrt(n), 1e-30))
                res["grad_stats_vs_torch_max_rel_diff"] = worst
                res["grad_stats_steps"] = int(run.recorded()["grad_stats"]["steps"])
                res["raw_grad_steps"] = int(run.recorded()["grads"]["steps"])
    res["activation_ops"] = site_ops_table(dev, args.batch)
    bw = disk_write_bandwidth(base)
    res["disk_write_GBps"] = round(bw / 1e9, 2)
    grad_bytes = res["n_params"] * 4
    res["write_limit_ms_per_step_raw_grads"] = round(grad_bytes / bw * 1e3, 2)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if not args.out:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
