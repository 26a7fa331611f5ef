"""BBDecoder 1.x API (recorder/compat.py): a 1.x training loop runs unchanged; its numbers equal direct
torch computation and the 2.x API's numbers; figures are written."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbdecoder import analyzer
from bbdecoder.recorder.compat import Master_analyzer


class Net1x(nn.Module):
    """Top-level children: 0 conv1, 1 act (no params), 2 block (two convs), 3 fc."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.block = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.block(self.act(self.conv1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _direct(model, ids):
    """Per 1.x layer: mean|g|, max|g|, L1, L2 of all its parameters' gradients (torch, float64)."""
    kids = list(model.children())
    out = {}
    for i in ids:
        g = torch.cat([p.grad.detach().double().reshape(-1) for p in kids[i].parameters()])
        out[i] = (g.abs().mean().item(), g.abs().max().item(), g.abs().sum().item(), g.norm().item())
    return out


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    torch.manual_seed(0)
    model = Net1x()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    data = [(torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))) for _ in range(3)]
    probe = torch.randn(2, 3, 8, 8)
    save = str(root / "out")
    figs = str(root / "figs")
    want, flows = {}, {}
    # ---- a BBDecoder 1.x script, unchanged
    analyzer_1x = Master_analyzer(model, save, (3, 8, 8), weights_every=1)
    it = 0
    for ep in range(2):
        for x, y in data:
            opt.zero_grad()
            out = analyzer_1x.forward_propagation(x)
            loss = crit(out, y)
            inds = [0, 2, 3] if it != 1 else [0]
            analyzer_1x.backward_propagation(loss, collect_grads=True, layer_inds=inds)
            want[it] = {i: v for i, v in _direct(model, inds).items()}
            snap = model.fc.weight.detach().clone()   # weights of this iteration's forward
            opt.step()
            it += 1
        analyzer_1x.get_inter_features(probe, [2])
        flows[ep] = analyzer_1x.save_collected_grads(ep, figs)
    analyzer_1x.visualize_weight_hist([0, 3], figs)
    return {"an": analyzer_1x, "model": model, "want": want, "flows": flows, "figs": figs, "save": save,
            "probe": probe, "snap": snap}


def test_grad_numbers_equal_torch_and_new_api(loop):
    an, want = loop["an"], loop["want"]
    df = an.grad_stats()
    assert sorted(set(df["iteration"])) == list(range(6))
    assert len(df) == sum(len(v) for v in want.values())   # only the collected layers
    for r in df.itertuples():
        m, mx, l1, l2 = want[r.iteration][r.layer_id]
        assert r.mean_abs == pytest.approx(m, rel=1e-5) and r.max_abs == pytest.approx(mx, rel=1e-6)
        assert r.l1 == pytest.approx(l1, rel=1e-5) and r.l2 == pytest.approx(l2, rel=1e-5)
    assert set(df.loc[df["iteration"] == 1, "layer_id"]) == {0}
    # 2.x API: layer 3 (fc) is one recorder layer -> the same numbers from Run.grad_stats(by="layer")
    run = analyzer.open(an.run_dir)
    new = run.grad_stats(by="layer")
    fc = new[new["layer"] == "fc"].set_index("step")
    old = df[df["layer_id"] == 3].set_index("iteration")
    for s in old.index:
        assert old.loc[s, "l2"] == pytest.approx(fc.loc[s, "l2"], rel=1e-12)
        assert old.loc[s, "mean_abs"] == pytest.approx(fc.loc[s, "abs_mean"], rel=1e-12)
    # layer 2 (block) pools block.0 and block.2
    assert an.layer_map[2] == [L.id for L in an.rec.layers if L.name.startswith("block.")] and an.layer_map[1] == []
    b = new[new["layer"].str.startswith("block.")].groupby("step")["l1"].sum()
    old2 = df[df["layer_id"] == 2].set_index("iteration")["l1"]
    np.testing.assert_allclose(old2.to_numpy(), b.loc[old2.index].to_numpy(), rtol=1e-12)
    # epochs end at save_collected_grads
    assert list(loop["flows"][0]["iteration"].unique()) == [0, 1, 2]
    assert list(loop["flows"][1]["iteration"].unique()) == [3, 4, 5]


def test_figures_written(loop):
    names = set(os.listdir(loop["figs"]))
    for ep in (0, 1):
        assert {f"gradient_flow_ep{ep}.png", f"grads_ep{ep}.csv", f"grad_variance_ep{ep}.png",
                f"grad_norms_conv1_ep{ep}.png", f"grad_norms_fc_ep{ep}.png"} <= names
    assert "weights_0_conv1.weight.png" in names and "weights_3_fc.bias.png" in names


def test_feature_evolution_and_costs(loop):
    an = loop["an"]
    gif = an.compile_feature_evolution(2, fps=4, save_folder=loop["figs"], channels="0:3")
    from PIL import Image
    assert Image.open(gif).n_frames == 2
    maps, steps = analyzer.open(an.run_dir).feature_maps("block")
    assert list(steps) == [3, 6]
    model = loop["model"]
    model.eval()
    with torch.no_grad():
        now = model.block(model.act(model.conv1(loop["probe"])))
    model.train()
    np.testing.assert_allclose(maps[-1], now[0].numpy(), rtol=1e-5, atol=1e-6)
    c = an.layer_costs().set_index("layer_id")
    N = 8
    assert c.loc[0, "flops"] == 2 * N * 3 * 6 * 9 * 64
    assert c.loc[2, "flops"] == 2 * N * 6 * 8 * 9 * 64 + 2 * N * 8 * 8 * 64
    assert c.loc[3, "flops"] == 2 * N * 8 * 4 and c.loc[1, "flops"] == 0
    assert (c["time_s"] > 0).all()


def test_get_sim_against_numpy(loop):
    an, model = loop["an"], loop["model"]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = model.conv1(x).numpy().astype(np.float64)
    sims = an.get_sim(x, [0], dim=1, sim_method="cosine")
    s = np.moveaxis(a, 1, 0).reshape(6, -1)
    u = s / np.linalg.norm(s, axis=1, keepdims=True)
    c = u @ u.T
    assert sims[0] == pytest.approx((c.sum() - np.trace(c)) / 30, rel=1e-6)
    kl = an.get_sim(x, [0], dim=1, sim_method="kl_divergence")[0]
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.mean([np.sum(p[i] * np.log(p[i] / p[j])) for i in range(6) for j in range(6) if i != j])
    assert kl == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="sim_method"):
        an.get_sim(x, [0], sim_method="euclid")
    with pytest.raises(ValueError, match="out of range"):
        an.get_sim(x, [7])


def test_gradcam_and_pruning(loop):
    an, model = loop["an"], loop["model"]
    x = torch.randn(2, 3, 8, 8)
    maps = an.GradCAM_run(2, x, 1, save_folder=loop["figs"])
    # direct Grad-CAM in torch: A = block output, w_k = mean_ij dy/dA, relu(sum_k w_k A_k), min-max
    box = {}
    h = model.block.register_forward_hook(lambda m, i, o: box.setdefault("a", o))
    model.eval()
    out = model(x)
    h.remove()
    model.train()
    (g,) = torch.autograd.grad(out[:, 1].sum(), box["a"])
    cam = torch.relu((g.mean((2, 3), keepdim=True) * box["a"]).sum(1)).detach().numpy()
    for b in range(2):
        c = cam[b]
        c = (c - c.min()) / (c.max() - c.min())
        np.testing.assert_allclose(maps[b], c, atol=1e-5)
    assert "gradcam_block_1.png" in os.listdir(loop["figs"])
    thr = float(loop["snap"].abs().median())
    res = an.threshold_pruning(thr, [3])
    assert os.path.isfile(res["plan"]) and res["snapshot_step"] == 5
    # the expected sparsity comes from the last snapshot (the weights of iteration 5's forward) ...
    assert res["expected"]["per_layer"]["fc"] == pytest.approx(float((loop["snap"].abs() <= thr).float().mean()))
    # ... the mask is applied to the current weights (one optimizer step later)
    live = dict(model.fc.named_parameters())["weight_orig"].detach()
    mask = dict(model.fc.named_buffers())["weight_mask"]
    assert torch.equal(mask.bool(), live.abs() > thr)
    assert res["layers"]["fc"]["masked"] == int((live.abs() <= thr).sum()) > 0
    assert (model.fc.weight[mask == 0] == 0).all()


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError):
        Master_analyzer("not a model", str(tmp_path / "a"), (3, 8, 8))
    m = Net1x()
    an = Master_analyzer(m, str(tmp_path / "b"), (3, 8, 8))
    c = an.layer_costs()     # no forward yet: recorded on zeros of input_size
    assert c.loc[c["layer"] == "fc", "flops"].item() == 2 * 8 * 4
    an.close()
    with pytest.raises(FileExistsError, match="overwrite"):
        Master_analyzer(m, str(tmp_path / "b"), (3, 8, 8))
    Master_analyzer(m, str(tmp_path / "b"), (3, 8, 8), overwrite=True).close()


def test_exact_1x_constructor_and_calls(tmp_path):
    """Only the 1.x names and arguments (Master_analyzer(model, save_path, input_size), positional):
    the gradient numbers equal torch's, and the figures appear where 1.x put them."""
    torch.manual_seed(1)
    model = Net1x()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    an = Master_analyzer(model, str(tmp_path / "out"), (3, 8, 8))
    want = {}
    for it in range(3):
        x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))
        opt.zero_grad()
        loss = crit(an.forward_propagation(x), y)
        an.backward_propagation(loss, True, [0, 3])
        want[it] = _direct(model, [0, 3])
        opt.step()
    flow = an.save_collected_grads(0, str(tmp_path / "figs"))
    assert list(flow["iteration"].unique()) == [0, 1, 2]
    df = an.grad_stats()
    assert len(df) == 6
    for r in df.itertuples():
        m, mx, l1, l2 = want[r.iteration][r.layer_id]
        assert r.mean_abs == pytest.approx(m, rel=1e-5) and r.max_abs == pytest.approx(mx, rel=1e-6)
        assert r.l1 == pytest.approx(l1, rel=1e-5) and r.l2 == pytest.approx(l2, rel=1e-5)
    an.visualize_weight_hist([0], str(tmp_path / "figs"))
    names = set(os.listdir(tmp_path / "figs"))
    assert {"gradient_flow_ep0.png", "grads_ep0.csv", "weights_0_conv1.weight.png"} <= names
    an.close()
