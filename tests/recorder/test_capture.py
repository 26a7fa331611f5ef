"""Attention captures (recorder.capture_attention, Recorder.capture_attention) and maps at image size
against a direct torch computation (hooks + autograd + the same pipeline) on a small CNN."""

import helpers
import os

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder import analyzer
from bbdecoder.analyzer.trace import captures as tc
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.recorder import Recorder, capture_attention


class Net(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        return self.head(self.drop(self.features(x).mean((2, 3))))


def _batches(n_batches=3, B=4, H=20, W=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(B, 3, H, W, generator=g)
        y = torch.randint(0, 3, (B,), generator=g)
        lm = torch.zeros(B, H, W, dtype=torch.long)
        lm[:, 5:15, 3:12] = 1
        out.append({"images": x, "labels": y, "masks": lm, "groups": torch.stack([y, y % 2], 1)})
    return out


def _torch_maps(model, batches, layer, target, method, size, multilabel=False):
    """The same maps computed directly with torch (eval mode)."""
    model.eval()
    store = {}
    h = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    maps = []
    try:
        for b in batches:
            z = model(b["images"])
            y = z[:, target].abs() if multilabel else z[:, target]
            (g,) = torch.autograd.grad(y.sum(), store["a"])
            A = store["a"].detach().double()
            g = g.double()
            if method == "gradcam":
                cam = (g.mean((2, 3), keepdim=True) * A).sum(1)
            elif method == "layercam":
                cam = (F.relu(g) * A).sum(1)
            elif method == "hirescam":
                cam = (g * A).sum(1)
            elif method == "xgradcam":
                w = (g * A).sum((2, 3)) / (A.sum((2, 3)) + 1e-7)
                cam = (w[:, :, None, None] * A).sum(1)
            cam = F.relu(cam)
            cam = cam - cam.amin((1, 2), keepdim=True)
            cam = cam / (1e-7 + cam.amax((1, 2), keepdim=True))
            cam = F.relu(F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False))[:, 0]
            cam = cam - cam.amin((1, 2), keepdim=True)
            cam = cam / (1e-7 + cam.amax((1, 2), keepdim=True))
            maps.append(cam.numpy())
    finally:
        h.remove()
    return np.concatenate(maps)


@pytest.mark.parametrize("method", ["gradcam", "layercam", "hirescam", "xgradcam"])
def test_maps_at_image_size_match_torch(tmp_path, method):
    torch.manual_seed(0)
    model = Net()
    batches = _batches()
    run = str(tmp_path / "run")
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    capture_attention(model, batches, run, "features.4", {"c1": 1, "c2": 2}, mask_names=["background", "object"])
    assert model.training and model.drop.training                       # mode restored
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())   # .grad untouched
    r = analyzer.open(run)
    got = r.attention_maps("c2", method=method, size="image")
    want = _torch_maps(model, batches, model.features[4], 2, method, (20, 20))
    assert got.shape == (12, 20, 20)
    np.testing.assert_allclose(got, want, atol=2e-5)
    caps = r.captures
    assert caps.loc[0, "n_images"] == 12 and caps.loc[0, "masks"] == "background,object"


def test_capture_contents_multilabel_callable_and_file_layout(tmp_path):
    torch.manual_seed(1)
    model = Net(4)
    batches = _batches(2)
    run = str(tmp_path / "run")
    path = capture_attention(model, batches, run, model.features[4], {"m": 3}, multilabel=True,
                             dtype="float16", mask_names=["bg", "obj"], group_names=["y", "odd"])
    assert os.path.basename(path) == "capture-000000.h5" and not os.path.exists(path + ".part")
    want = _torch_maps(model, batches, model.features[4], 3, "gradcam", (10, 10), multilabel=True)
    got = analyzer.open(run).attention_maps("m", size=(10, 10))
    np.testing.assert_allclose(got, want, atol=2e-3)                   # float16 storage
    with h5py.File(path) as f:
        assert f["activations"].dtype == np.float16 and f["activations"].shape == (8, 12, 10, 10)
        assert f["masks/obj"].dtype == np.uint8 and f["masks/obj"][0, 5, 3] == 1 and f["masks/bg"][0, 5, 3] == 0
        np.testing.assert_array_equal(f["groups"][:, 0], torch.cat([b["labels"] for b in batches]).numpy())
        np.testing.assert_array_equal(f["index"][()], np.arange(8))
        assert f.attrs["format_version"] == fmt.FORMAT_VERSION and f.attrs["kind"] == tc.CAPTURE_KIND
    # a callable target: y = z_0 - z_1 (its gradient is the difference of the two class gradients)
    p2 = capture_attention(model, batches, run, "features.4", {"d": lambda z: z[:, 0] - z[:, 1],
                                                               "a": 0, "b": 1, "top": None},
                           mask_names=["bg", "obj"])
    assert os.path.basename(p2) == "capture-000001.h5"
    with h5py.File(p2) as f:
        np.testing.assert_allclose(f["grads/d"][()], f["grads/a"][()] - f["grads/b"][()], atol=1e-6)
        z = f["logits"][()]
        pred = z.argmax(1)
        sel = pred <= 1
        gp = np.where((pred == 0)[:, None, None, None], f["grads/a"][()], f["grads/b"][()])
        np.testing.assert_allclose(f["grads/top"][()][sel], gp[sel], atol=1e-6)


def test_refusals_and_no_leftovers(tmp_path):
    model = Net()
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a bbdecoder run"):
        capture_attention(model, _batches(1), str(other), "features.4", {"a": 0})
    assert os.listdir(other) == ["keep.txt"]
    run = str(tmp_path / "run")
    with pytest.raises(ValueError, match="unknown target_layer"):
        capture_attention(model, _batches(1), run, "features.9", {"a": 0})
    with pytest.raises(ValueError, match="class index"):
        capture_attention(model, _batches(1), run, "features.4", {"a": "x"})
    with pytest.raises(ValueError, match="3 logits"):
        capture_attention(model, _batches(1), run, "features.4", {"a": 7})
    assert tc.list_captures(run) == [] and os.listdir(os.path.join(run, tc.CAPTURES_DIR)) == []
    assert [m.training for m in model.modules()] == [True] * len(list(model.modules()))


def test_frozen_model_reshape_and_batch_limit(tmp_path):
    """A frozen model still gets gradients (the layer output becomes a leaf); a (B, T, C) layer is reshaped."""
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 6, 4, stride=4)
            self.mix = nn.Linear(6, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)        # (B, 25, 6)
            return self.head(self.mix(t).relu().mean(1))

    torch.manual_seed(2)
    model = Tok().requires_grad_(False)
    run = str(tmp_path / "run")
    capture_attention(model, _batches(3), run, "mix", {"y": 1}, batch_limit=2, mask_names=["bg", "obj"],
                      reshape=lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], 5, 5))
    r = analyzer.open(run)
    assert r.captures.loc[0, "n_images"] == 8
    # direct: gradient of z_1 with respect to the token features, reshaped to (B, C, 5, 5)
    x = torch.cat([b["images"] for b in _batches(3)[:2]])
    t = model.embed(x).flatten(2).transpose(1, 2)
    m = model.mix(t).requires_grad_(True)
    z = model.head(m.relu().mean(1))
    (g,) = torch.autograd.grad(z[:, 1].sum(), m)
    to_img = lambda u: u.transpose(1, 2).reshape(8, 6, 5, 5).double()  # noqa: E731
    cam = F.relu((to_img(g).mean((2, 3), keepdim=True) * to_img(m.detach())).sum(1))
    cam = cam - cam.amin((1, 2), keepdim=True)
    cam = (cam / (1e-7 + cam.amax((1, 2), keepdim=True))).numpy()
    np.testing.assert_allclose(r.attention_maps("y"), cam, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*the trace has no weight snapshots")
def test_recorder_captures_over_training(tmp_path):
    torch.manual_seed(3)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe = _batches(1, B=6)
    run = str(tmp_path / "run")
    with Recorder(model, run, weights_every=0) as rec:
        for ep in range(3):
            for b in _batches(2, seed=ep + 10):
                loss = F.cross_entropy(model(b["images"]), b["labels"])
                opt.zero_grad()
                loss.backward()
                rec.step(loss)
            rec.capture_attention(probe, "features.4", {"c0": 0}, mask_names=["bg", "obj"])
            rec.epoch_end()
    r = analyzer.open(run)
    assert r.status == "complete" and list(r.captures["step"]) == [2, 4, 6]
    assert list(r.captures["epoch"]) == [0, 1, 2]
    df = r.attention_iou("c0", mask_group="obj", bootstrap=10, capture="all", by=None)
    assert list(df["step"].unique()) == [2, 4, 6] and len(df) == 9
    # each capture's score equals the direct score of that capture's maps
    from bbdecoder.analyzer.attention_iou import iou_score
    for pos in range(3):
        maps = r.attention_maps("c0", size="image", capture=pos)
        mask = (torch.cat([b["masks"] for b in probe]) == 1).numpy().astype(float)
        want = np.nanmean(iou_score(maps, mask))
        got = df[(df["capture"] == pos) & (df["split"] == "all")]["mean"].iloc[0]
        assert got == pytest.approx(want, rel=1e-6)
    # the report's attention section: scores per split (same numbers as the API), maps, overlays, over time
    import pandas as pd
    from bbdecoder.analyzer.report.sections.attention import REPORT_BOOTSTRAP
    from bbdecoder.analyzer.report import build_report
    out = tmp_path / "rep"
    out.mkdir()
    summ = build_report(r, str(out))
    figs = {f for f in summ["figures"] if "attention" in f}
    assert figs == {f"figures/attention_{n}.png" for n in ("scores", "average_maps", "overlays", "over_time")}
    tab = pd.read_csv(out / "tables" / "attention_iou.csv")
    api = r.attention_iou("c0", mask_group="bg", bootstrap=REPORT_BOOTSTRAP)
    np.testing.assert_allclose(tab[tab["reference"] == "bg"]["boot_std"].to_numpy(), api["boot_std"].to_numpy())
    assert "Attention-IoU" in (out / "index.html").read_text()
    assert summ["attention"]["captures"] == 3 and summ["attention"]["target"] == "c0"
    # overwrite removes the old captures with the run
    Recorder(model, run, overwrite=True).close()
    assert tc.list_captures(run) == []


def test_waterbirds_smoke(tmp_path):
    import importlib.util
    root = helpers.ROOT
    spec = importlib.util.spec_from_file_location("wb", os.path.join(root, "scripts", "attention_iou_waterbirds.py"))
    wb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wb)
    df = wb.main(["--out", str(tmp_path / "wb"), "--levels", "0.5,1.0", "--train", "256", "--test", "64",
                  "--epochs", "2", "--bootstrap", "50", "--size", "24", "--seeds", "1"])
    assert set(df["bias"]) == {0.5, 1.0} and set(df["mask"]) == {"background", "object"}
    assert ((df["mean"] >= 0) & (df["mean"] <= 1)).all() and (df["boot_std"] >= 0).all()
    assert os.path.isfile(tmp_path / "wb" / "waterbirds_attention_iou.png")
