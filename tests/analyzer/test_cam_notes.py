"""No silent zeros (issue 15, item 6, first half): Grad-CAM at a ViT's last block gives maps that are 0
everywhere (only the CLS token reaches the classifier there); the library says so with the cause and a
suggestion, in ``attrs["notes"]`` and as an AttentionWarning, and ``bbdecoder attention-iou`` exits 1 with
one stderr line when nothing was scored."""

import warnings

import numpy as np
import pytest
import torch

import transformer_models as tm
from helpers import run_cli
from bbdecoder import analyzer
from bbdecoder.analyzer.cam_notes import AttentionWarning, zero_map_notes, zero_maps
from bbdecoder.recorder import RecorderWarning, capture_attention

LAST, NORM = "vit.layers.1", "vit.layers.1.layernorm_before"
N = 6


def _reshape(t):
    """(B, 1 + 16, C) tokens -> (B, C, 4, 4) patch maps (the CLS token dropped)."""
    B, T, C = t.shape
    return t[:, 1:].reshape(B, 4, 4, C).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    model = tm.hf_vit()
    x, y = tm.images(N)
    masks = torch.zeros(N, 32, 32)
    masks[:, 8:24, 8:24] = 1

    def loader():
        for i in range(0, N, 3):
            yield {"images": x[i:i + 3], "labels": y[i:i + 3], "masks": {"object": masks[i:i + 3]}}

    d = str(tmp_path_factory.mktemp("camnotes") / "vit")
    warned = []
    for layer in (LAST, NORM):   # capture 0: the last block; capture 1: its layernorm_before
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            capture_attention(model, loader(), d, target_layer=layer, targets={"c0": 0}, reshape=_reshape)
        warned.append([str(x.message) for x in w if issubclass(x.category, RecorderWarning)])
    # the hand computation: d logit_0 / d (block output) at the patch tokens, with torch
    model.eval()
    out = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o))
             for n in (LAST, NORM)]
    logits = model(x).logits
    for h in hooks:
        h.remove()
    g_last, g_norm = torch.autograd.grad(logits[:, 0].sum(), [out[LAST], out[NORM]])
    return {"run": d, "g_last": g_last.detach().numpy(), "g_norm": g_norm[:, 1:].detach().numpy(), "warned": warned}


def test_the_last_block_of_a_vit_gives_zero_maps_and_says_why(vit):
    g = vit["g_last"]   # torch: d logit_0 / d (last block's output) is non-zero at the CLS token only
    assert np.abs(g[:, 1:]).max() == 0 and (np.abs(g[:, 0]).max(1) > 0).all() and np.abs(vit["g_norm"]).max() > 0
    # the capture pass already says so, naming the reshape that drops the CLS token; not for the layernorm
    last, norm = vit["warned"]
    assert norm == [] and len(last) == 1 and "non-zero only at positions that reshape drops" in last[0]
    assert last[0].startswith("bbdecoder: capture_attention: the gradient of target 'c0' with respect to "
                              "'vit.layers.1''s output")
    run = analyzer.open(vit["run"])
    with pytest.warns(AttentionWarning, match=r"exactly 0 at every map position .* layernorm_before"):
        maps = run.attention_maps("c0", capture=0)
    assert maps.shape == (N, 4, 4) and zero_maps(maps).all() and not maps.any()
    with pytest.warns(AttentionWarning) as rec:
        df = run.attention_iou("c0", mask_group="object", capture=0, bootstrap=0)
    assert df["n"].tolist() == [0, 0, 0] and df["mean"].isna().all()
    note, = df.attrs["notes"]
    assert note.startswith(f"gradcam maps of target 'c0' at layer '{LAST}' (captures/capture-000000.h5) are 0 "
                           f"everywhere for all {N} images")
    assert "only the CLS token feeds the classifier" in note and "eigencam" in note
    assert [str(w.message) for w in rec.list if w.category is AttentionWarning] == [note]
    # the layernorm before it: every map has a positive value, every image is scored, no note, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", AttentionWarning)
        ok = run.attention_iou("c0", mask_group="object", capture=1, bootstrap=0)
        assert not zero_maps(run.attention_maps("c0", capture=1)).any()
    assert ok.loc[ok["split"] == "all", "n"].item() == N and ok.attrs["notes"] == []


def test_cli_exits_1_with_one_line_when_nothing_is_scored(vit, capsys):
    code, out, err = run_cli(["attention-iou", vit["run"], "--target", "c0", "--mask-group", "object",
                              "--capture", "0", "--bootstrap", "0"], capsys)
    assert code == 1 and out == ""
    line, = err.splitlines()
    assert line.startswith("bbdecoder: error: gradcam maps of target 'c0' at layer 'vit.layers.1'")
    assert "layernorm_before" in line and "Traceback" not in err
    # every capture: one is scored, so the table prints and the other's note is a warning on stderr
    code, out, err = run_cli(["attention-iou", vit["run"], "--target", "c0", "--mask-group", "object",
                              "--capture", "all", "--bootstrap", "0", "--json"], capsys)
    assert code == 0 and err.startswith("bbdecoder: warning: gradcam maps of target 'c0'")
    code, out, err = run_cli(["attention-iou", vit["run"], "--target", "c0", "--mask-group", "object",
                              "--capture", "1", "--bootstrap", "0"], capsys)
    assert code == 0 and err == "" and f"iou       all  {N}" in out


class FakeCapture:
    """Just what zero_map_notes reads: blocks of activations and gradients of one target."""

    name, target_layer = "captures/capture-000009.h5", "features.3"

    def __init__(self, A, G):
        self.d = {"activations": A, "grads/t": G}

    def target(self, name):
        return {"name": name, "key": "t"}

    def blocks(self, names):
        yield 0, {k: self.d[k] for k in names}


def test_each_cause_of_zero_maps_is_told_apart():
    rng = np.random.default_rng(0)
    A = rng.random((4, 3, 5, 5)) + 0.1                   # positive activations
    G = np.zeros_like(A)
    assert "exactly 0 at every map position" in zero_map_notes(FakeCapture(A, G), "t")[0]
    note, = zero_map_notes(FakeCapture(np.zeros_like(A), rng.random(A.shape)), "t")
    assert "activations are 0 everywhere" in note and "for all 4 images" in note
    note, = zero_map_notes(FakeCapture(A, -np.ones_like(A)), "t")   # weights < 0: the CAM is < 0 everywhere
    assert "<= 0 (or constant) everywhere" in note
    G = rng.random(A.shape)
    G[1] = 0                                              # one image of four
    note, = zero_map_notes(FakeCapture(A, G), "t")
    assert "for 1 of 4 images, which are not scored" in note
    assert zero_map_notes(FakeCapture(A, rng.random(A.shape)), "t") == []
    assert zero_map_notes(FakeCapture(A, np.zeros_like(A)), "t", method="eigencam") == []   # no gradients used


def test_empty_masks_and_zero_reference_maps_are_told():
    """A heatmap score against a target whose maps are 0 scores 0 (not NaN), and an empty mask gives an
    Attention-IoU of 0: neither is silent."""
    from bbdecoder.analyzer.attention_iou import attention_iou
    from bbdecoder.analyzer.cam_notes import empty_mask_notes

    class Cap(FakeCapture):
        n, index, step, epoch, mask_names = 4, 9, 3, 1, {"m": "object"}

        def __init__(self, A, G, M):
            super().__init__(A, G)
            self.d["masks/m"] = M
            self.d["grads/z"] = np.zeros_like(G)

        def target(self, name):
            return {"name": name, "key": "t" if name == "t" else "z"}

        def mask_key(self, group):
            return "m"

        def correct(self, target):
            return np.ones(self.n, bool)

        def group_labels(self):
            return None

    rng = np.random.default_rng(1)
    A = rng.random((4, 3, 5, 5)) + 0.1
    M = np.zeros((4, 5, 5), np.uint8)
    M[:2, 1:3, 1:3] = 1                                    # images 2 and 3: an empty mask
    cap = Cap(A, rng.random(A.shape), M)
    assert empty_mask_notes(cap, "object") == [
        "mask group 'object' is empty in 2 of 4 images of captures/capture-000009.h5: their Attention-IoU is 0 "
        "and their pointing and top-k scores are undefined. Check the masks the loader gave"]
    with pytest.warns(AttentionWarning, match="empty in 2 of 4 images"):
        df = attention_iou(cap, "t", mask_group="object", n_boot=0, by=None, resolution="map")
    assert df.loc[0, "n"] == 4 and len(df.attrs["notes"]) == 1
    with pytest.warns(AttentionWarning, match="target 'z' .* 0 everywhere for all 4 images"):
        df = attention_iou(cap, "t", protected="z", n_boot=0, by=None, resolution="map")
    assert df.loc[0, "mean"] == 0.0 and "gradient with respect to the layer's output is exactly 0" in \
        df.attrs["notes"][0]
