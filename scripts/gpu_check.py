"""GPU check of the recorder's hot path: no device synchronisation, overhead, pinned memory.

Run wherever a CUDA GPU is available::

    PYTHONPATH=. python scripts/gpu_check.py --out /tmp/gpu-check --json result.json

What it does, on a ResNet-50-sized model (torchvision's resnet50 if importable, else a local
bottleneck ResNet of the same widths; about 25.6 M parameters), batch 64, 224x224, SGD:
1. calls ``rec.step()`` under ``torch.cuda.set_sync_debug_mode("error")``: any synchronising CUDA
   call on the training thread raises, so "ok" means the hot path never synchronised;
2. measures step time without the recorder and with it (default settings: raw gradients every
   step, weights every 50 steps; and a sparser schedule, gradients every 10 steps), interleaved in
   rounds; each round ends with ``torch.cuda.synchronize()`` and, for the recorder, ``rec.flush()``
   (so queued writer work is paid for inside the timed region);
3. reports peak pinned (page-locked) host memory from the caching host allocator and the disk's
   sequential write bandwidth, the physical limit when every step writes ~100 MB of gradients.
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
from recorder import Recorder  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="directory for the runs (default: a temp dir)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "no CUDA device"
    dev = torch.device("cuda")
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

    settings = {"baseline": None, "default": dict(grads_every=1, weights_every=50),
                "grads_every_10": dict(grads_every=10, weights_every=50)}
    state = {}
    for name, kw in settings.items():
        m, opt = make()
        rec = None if kw is None else Recorder(m, os.path.join(base, name), overwrite=True, **kw)
        state[name] = (m, opt, rec)
    res["n_params"] = sum(p.numel() for p in state["baseline"][0].parameters())

    def run_steps(name, n, sync_debug=False):
        m, opt, rec = state[name]
        for _ in range(n):
            loss = nn.functional.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if rec is not None:
                if sync_debug:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    rec.step(loss=loss)
                finally:
                    if sync_debug:
                        torch.cuda.set_sync_debug_mode(0)
            opt.step()

    # 1. warm-up, then the hot path under sync debug mode "error"
    for name in settings:
        run_steps(name, 3)
    torch.cuda.synchronize()
    sync_ok, sync_err = True, None
    try:
        run_steps("default", 5, sync_debug=True)
        torch.cuda.synchronize()
    except Exception as e:  # any synchronising call raises here
        sync_ok, sync_err = False, f"{type(e).__name__}: {e}"
    res["sync_debug_error_mode_ok"] = sync_ok
    res["sync_debug_error"] = sync_err
    for name in settings:
        if state[name][2] is not None:
            state[name][2].flush()

    # 2. interleaved timing
    times = {k: [] for k in settings}
    order = list(settings)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            torch.cuda.synchronize()
            t = time.perf_counter()
            run_steps(name, args.steps)
            torch.cuda.synchronize()
            if state[name][2] is not None:
                state[name][2].flush()
            times[name].append((time.perf_counter() - t) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    res["ms_per_step"] = {k: round(v * 1e3, 2) for k, v in med.items()}
    res["ratio_vs_baseline"] = {k: round(v / med["baseline"], 3) for k, v in med.items()}
    res["pinned_host_peak_bytes"] = host_pinned_peak()
    for name, (m, opt, rec) in state.items():
        if rec is not None:
            rec.close()
    import analyzer
    for name in settings:
        if settings[name] is not None:
            run = analyzer.open(os.path.join(base, name))
            res.setdefault("mb_per_step", {})[name] = round(run.nbytes / max(1, len(run.steps)) / 1e6, 2)
            res.setdefault("status", {})[name] = run.status
    bw = disk_write_bandwidth(base)
    res["disk_write_GBps"] = round(bw / 1e9, 2)
    grad_bytes = res["n_params"] * 4
    res["write_limit_ms_per_step_default"] = round(grad_bytes / bw * 1e3, 2)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if not args.out:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
