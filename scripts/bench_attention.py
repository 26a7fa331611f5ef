"""Rescoring captured images offline versus running the model again.

Captures N images once (recorder.capture_attention), then times, for the same maps and scores:

- offline: ``Run.attention_iou`` with another CAM method and another mask group, from the trace
  (numpy, no model, no torch);
- rerun:   the model again over the N images with a forward and a backward pass per batch for the
  target's gradient, the same CAM method in torch, and the same scoring.

    python scripts/bench_attention.py --images 2000 --out /tmp/bench-att
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def build_model(width: int):
    import torch.nn as nn

    def block(i, o, stride):
        return nn.Sequential(nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            self.layer1 = block(width, width, 1)
            self.layer2 = block(width, 2 * width, 2)
            self.layer3 = block(2 * width, 4 * width, 2)
            self.layer4 = block(4 * width, 8 * width, 2)
            self.head = nn.Linear(8 * width, 10)

        def forward(self, x):
            x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
            return self.head(x.mean((2, 3)))

    return Net()


def main(argv=None):
    import torch
    import torch.nn.functional as F

    from bbdecoder import analyzer
    from bbdecoder.analyzer.attention_iou import bootstrap, iou_score
    from bbdecoder.recorder import capture_attention
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, help="Directory for the benchmark's run (created; replaced if ours).")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.width).eval()
    S, N, B = args.size, args.images, args.batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 3, S, S, generator=g)
    y = torch.randint(0, 10, (N,), generator=g)
    obj = torch.zeros(N, S, S, dtype=torch.bool)
    obj[:, S // 4: 3 * S // 4, S // 4: 3 * S // 4] = True
    batches = [{"images": x[i:i + B], "labels": y[i:i + B],
                "masks": {"object": obj[i:i + B], "background": ~obj[i:i + B]}} for i in range(0, N, B)]
    run_dir = os.path.join(os.path.abspath(args.out), "run")
    if os.path.isdir(run_dir):
        import shutil
        if not os.path.isfile(os.path.join(run_dir, "manifest.json")):
            sys.exit(f"{run_dir} exists and is not a bbdecoder run")
        shutil.rmtree(run_dir)
    t = time.perf_counter()
    path = capture_attention(model, batches, run_dir, "layer4", {"cls": None})
    t_capture = time.perf_counter() - t
    mb = os.path.getsize(path) / 2 ** 20

    run = analyzer.open(run_dir)
    t = time.perf_counter()
    off = run.attention_iou("cls", mask_group="background", method="gradcam++", bootstrap=args.bootstrap, by=None)
    t_off = time.perf_counter() - t

    # rerun: forward + backward for the target's gradient, Grad-CAM++ in torch, same scoring
    t = time.perf_counter()
    store = {}
    h = model.layer4.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    per = []
    try:
        with torch.enable_grad():
            for b in batches:
                z = model(b["images"])
                yv = z.gather(1, z.argmax(1, keepdim=True)).squeeze(1)
                (gr,) = torch.autograd.grad(yv.sum(), store["a"])
                A, G = store["a"].detach().double(), gr.double()
                g2, g3 = G ** 2, G ** 3
                alpha = torch.where(G != 0, g2 / (2 * g2 + A.sum((2, 3), keepdim=True) * g3 + 1e-6), 0.0)
                w = (F.relu(G) * alpha).sum((2, 3), keepdim=True)
                cam = F.relu((w * A).sum(1))
                cam = cam - cam.amin((1, 2), keepdim=True)
                cam = cam / (1e-7 + cam.amax((1, 2), keepdim=True))
                cam = F.relu(F.interpolate(cam[:, None], size=(S, S), mode="bilinear", align_corners=False))[:, 0]
                cam = cam - cam.amin((1, 2), keepdim=True)
                cam = cam / (1e-7 + cam.amax((1, 2), keepdim=True))
                per.append(iou_score(cam.numpy(), b["masks"]["background"].numpy().astype(np.float64)))
    finally:
        h.remove()
    per = np.concatenate(per)
    rer = bootstrap(per, args.bootstrap, 0)
    t_rerun = time.perf_counter() - t
    d = off.set_index("split").loc["all"]
    print(f"{N} images of {S}x{S}, target layer layer4 {tuple(run.catalog.captures()[-1].__dict__[k] for k in ('K', 'h', 'w'))}, "
          f"{args.threads} threads, capture file {mb:.1f} MiB (written once in {t_capture:.2f} s)")
    print(f"{'':30} {'seconds':>8}  {'mean S':>8}  {'boot std':>8}")
    print(f"{'offline rescoring (trace)':30} {t_off:8.2f}  {d['mean']:8.4f}  {d['boot_std']:8.4f}")
    print(f"{'rerun model fwd+bwd (torch)':30} {t_rerun:8.2f}  {rer['mean']:8.4f}  {rer['boot_std']:8.4f}")
    print(f"speed-up of offline rescoring: {t_rerun / t_off:.1f}x  (same mean: {abs(rer['mean'] - d['mean']) < 1e-4})")
    return t_rerun / t_off


if __name__ == "__main__":
    main()
