"""Synthetic Waterbirds: does Attention-IoU see a model's background bias grow with the training-set bias?

Images: a foreground object (class 0: a disc, class 1: a square; random grey level, size and place) on
one of two background textures ("land": green, horizontal stripes; "water": blue, vertical stripes).
For each bias level p, a training set where object class and background agree a fraction p of the time;
--seeds small CNNs are trained on CPU (scores are averaged over them, as the paper averages 20 models);
an attention capture (recorder.capture_attention) is taken on a balanced test set (every class x
background combination equally often) with object and background masks; the mask scores (Attention-IoU
of the Grad-CAM map of the predicted class against each mask) are computed offline with bootstrap.
The object (small, noisy, grey) is a harder cue than the background texture. As in the paper, the
background score should rise and the object score fall as the bias rises.

    python scripts/attention_iou_waterbirds.py --out wb-out          # table on stdout, figure in wb-out/
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


def make_images(n: int, agree: float, size: int, rng: np.random.Generator, balanced: bool = False):
    """(x (n,3,S,S) float32, y (n,), background (n,), object mask (n,S,S) bool)."""
    y = rng.integers(0, 2, n)
    if balanced:
        combo = np.arange(n) % 4
        y, bg = combo // 2, combo % 2
    else:
        bg = np.where(rng.random(n) < agree, y, 1 - y)
    S = size
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    period = rng.uniform(3.0, 5.0, (n, 1, 1))
    horiz = 0.5 + 0.5 * np.sin(2 * np.pi * yy[None] / period + phase)
    vert = 0.5 + 0.5 * np.sin(2 * np.pi * xx[None] / period + phase)
    tex = np.where(bg[:, None, None] == 0, horiz, vert)
    land = np.array([0.25, 0.55, 0.2], np.float32)[None, :, None, None]
    water = np.array([0.15, 0.3, 0.65], np.float32)[None, :, None, None]
    base = np.where(bg[:, None, None, None] == 0, land, water)
    x = base * (0.6 + 0.4 * tex[:, None]) + rng.normal(0, 0.08, (n, 3, S, S)).astype(np.float32)
    r = rng.uniform(0.13, 0.20, n) * S
    cy = rng.uniform(0.3, 0.7, n) * S
    cx = rng.uniform(0.3, 0.7, n) * S
    dy, dx = yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]
    disc = dy ** 2 + dx ** 2 <= r[:, None, None] ** 2
    square = (np.abs(dy) <= 0.85 * r[:, None, None]) & (np.abs(dx) <= 0.85 * r[:, None, None])
    mask = np.where(y[:, None, None] == 0, disc, square)
    grey = rng.uniform(0.45, 0.85, n).astype(np.float32)[:, None, None, None]
    x = np.where(mask[:, None], grey + rng.normal(0, 0.10, (n, 3, S, S)).astype(np.float32), x)
    return x.astype(np.float32), y.astype(np.int64), bg.astype(np.int64), mask


def build_model():
    import torch.nn as nn

    class SmallCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.block1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
            self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2))
            self.block3 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.head = nn.Linear(32, 2)

        def forward(self, x):
            return self.head(self.block3(self.block2(self.block1(x))).mean((2, 3)))

    return SmallCNN()


def train(x, y, epochs: int, seed: int, batch: int = 64):
    import torch
    import torch.nn.functional as F
    torch.manual_seed(seed)
    model = build_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def run_level(level: float, args, out: str, test, seed: int) -> list[dict]:
    import torch

    from bbdecoder import analyzer
    from bbdecoder.recorder import capture_attention
    rng = np.random.default_rng(seed * 7919 + int(level * 1000))
    x, y, _, _ = make_images(args.train, level, args.size, rng)
    model = train(x, y, args.epochs, seed)
    xt, yt, bgt, mt = test
    loader = [{"images": torch.from_numpy(xt[i:i + 128]), "labels": torch.from_numpy(yt[i:i + 128]),
               "masks": {"object": torch.from_numpy(mt[i:i + 128]), "background": torch.from_numpy(~mt[i:i + 128])},
               "groups": {"bird": torch.from_numpy(yt[i:i + 128]), "place": torch.from_numpy(bgt[i:i + 128])}}
              for i in range(0, len(xt), 128)]
    run_dir = os.path.join(out, f"run-bias{int(round(level * 100)):03d}-seed{seed}")
    if os.path.isdir(run_dir):
        import shutil
        shutil.rmtree(run_dir)      # our own previous output (this script created it)
    capture_attention(model, loader, run_dir, "block3", {"bird": None})
    run = analyzer.open(run_dir)
    rows = []
    for mask in ("background", "object"):
        df = run.attention_iou("bird", mask_group=mask, bootstrap=args.bootstrap, seed=args.seed, by=["bird", "place"])
        al = df[df["split"] == "all"].iloc[0]
        rows.append({"bias": level, "seed": seed, "mask": mask, "mean": al["mean"], "boot_mean": al["boot_mean"],
                     "boot_std": al["boot_std"], "n": int(al["n"])})
    cap = run.catalog.captures()[-1]
    ok = cap.correct("bird")
    acc = float(ok.mean())
    worst = min(float(ok[(yt == a) & (bgt == b)].mean()) for a in (0, 1) for b in (0, 1))
    for r in rows:
        r.update(test_acc=acc, worst_group_acc=worst)
    return rows


def figure(df, path: str) -> str:
    from bbdecoder.analyzer.report import plots
    fig, ax = plots.new_figure(6.5, 4.2)
    ax = ax[0, 0]
    for mask, color in (("background", "tab:blue"), ("object", "tab:orange")):
        d = df[df["mask"] == mask].sort_values("bias")
        ax.errorbar(d["bias"] * 100, d["mean"], yerr=np.hypot(d["boot_std"], d["model_std"]), marker="o",
                    capsize=3, color=color, label=mask)
    ax.set_xlabel("training-set bias (% of images where class and background agree)")
    ax.set_ylabel("mask score (Attention-IoU, Grad-CAM)\nmean over models; bars: bootstrap and model std")
    ax.set_title("Synthetic Waterbirds")
    ax.legend(frameon=False)
    return plots.save(fig, path)


def main(argv=None):
    """Train one CNN per bias level, score it, print the table, save the figure; returns the DataFrame."""
    import pandas as pd
    import torch
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="Directory for the runs and the figure.")
    p.add_argument("--levels", default="0.5,0.75,0.95,1.0", help="Comma-separated training-set agreement levels.")
    p.add_argument("--train", type=int, default=2000, help="Training images per level.")
    p.add_argument("--test", type=int, default=400, help="Balanced test images.")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="Image side in pixels.")
    p.add_argument("--bootstrap", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0, help="First seed (models use seed, seed+1, ...).")
    p.add_argument("--seeds", type=int, default=3, help="Models trained per bias level (scores are averaged).")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = [float(v) for v in args.levels.split(",") if v.strip()]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    test = make_images(args.test, 0.5, args.size, np.random.default_rng(args.seed + 99), balanced=True)
    rows = []
    for lv in levels:
        for sd in range(args.seed, args.seed + args.seeds):
            rows += run_level(lv, args, out, test, sd)
    per_model = pd.DataFrame(rows)
    # as in the paper: the mean over models of each model's mean mask score; spread = std over models,
    # boot_std = mean over models of the bootstrap std of the images' mean
    df = per_model.groupby(["bias", "mask"], sort=True).agg(
        mean=("mean", "mean"), model_std=("mean", "std"), boot_std=("boot_std", "mean"), n=("n", "first"),
        test_acc=("test_acc", "mean"), worst_group_acc=("worst_group_acc", "mean"),
        models=("seed", "nunique")).reset_index()
    df["model_std"] = df["model_std"].fillna(0.0)
    lines = [f"{'bias':>5}  {'background':^26}  {'object':^26}  {'test acc':>8}  {'worst grp':>9}",
             f"{'':5}  {' mean  boot std  model std':>26}  {' mean  boot std  model std':>26}"]
    for lv in levels:
        d = df[df["bias"] == lv].set_index("mask")
        cell = lambda m: f"{d.loc[m, 'mean']:.3f}  {d.loc[m, 'boot_std']:8.3f}  {d.loc[m, 'model_std']:9.3f}"  # noqa: E731
        lines.append(f"{lv * 100:4.0f}%  {cell('background'):>26}  {cell('object'):>26}"
                     f"  {d.loc['object', 'test_acc']:8.3f}  {d.loc['object', 'worst_group_acc']:9.3f}")
    print("\n".join(lines))
    png = figure(df, os.path.join(out, "waterbirds_attention_iou.png"))
    df.to_csv(os.path.join(out, "waterbirds_attention_iou.csv"), index=False)
    per_model.to_csv(os.path.join(out, "waterbirds_attention_iou_per_model.csv"), index=False)
    print(f"figure: {png}  ({time.time() - t0:.0f} s, {args.seeds} model(s) per level, {args.bootstrap} bootstrap "
          f"resamples, {args.train} training / {args.test} test images of {args.size}px, {args.epochs} epochs)")
    return df


if __name__ == "__main__":
    main()
