"""Feature evolution: probe captures equal the model's layer output at those steps; grid, GIF, bad input."""

import os

import h5py
import numpy as np
import pytest
import torch

from bbdecoder import analyzer
from bbdecoder.analyzer.features import feature_maps, parse_channels, slice_similarity
from helpers import Tiny, run_cli
from bbdecoder.recorder import Recorder
from bbdecoder.recorder.schedules import every


def _layer_out(model, x, name):
    """The layer output computed directly with a forward hook, in eval mode, as numpy."""
    box = {}
    mod = dict(model.named_modules())[name]
    h = mod.register_forward_hook(lambda m, a, o: box.setdefault("o", o.detach().clone()))
    was = model.training
    model.eval()
    with torch.no_grad():
        model(x)
    model.train(was)
    h.remove()
    return box["o"].numpy()


def _train(run, probe_every, epochs=2, steps=3):
    torch.manual_seed(0)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    probe = torch.randn(2, 3, 4, 4)
    sched = every(probe_every) if isinstance(probe_every, int) else None
    want, s = {}, 0
    with Recorder(model, run, probe=(probe, "body.1"), probe_every=probe_every, grads_every=0,
                  weights_every=0) as rec:
        for ep in range(epochs):
            for _ in range(steps):
                loss = model(torch.randn(4, 3, 4, 4)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                rec.step(loss)
                if sched is not None and sched(s):
                    want[s] = _layer_out(model, probe, "body.1")
                opt.step()
                s += 1
            if sched is None:
                want[s] = _layer_out(model, probe, "body.1")
            rec.epoch_end()
    return want


def test_probe_every_n_steps_equals_layer_output(tmp_path):
    run = str(tmp_path / "run")
    want = _train(run, 2)
    r = analyzer.open(run)
    maps, steps = r.feature_maps("body.1")
    assert list(steps) == sorted(want) == [0, 2, 4]
    assert maps.shape == (3, 6, 4, 4) and maps.dtype == np.float32
    for t, s in enumerate(steps):
        np.testing.assert_allclose(maps[t], want[s][0], rtol=1e-6, atol=1e-7)
    m1, st1, ep1 = feature_maps(run, "body.1", sample=1)
    np.testing.assert_allclose(m1[1], want[2][1], rtol=1e-6, atol=1e-7)
    assert list(ep1) == [0, 0, 1]
    # the maps change as the model trains
    assert not np.allclose(maps[0], maps[-1])


def test_probe_every_epoch(tmp_path):
    run = str(tmp_path / "run")
    want = _train(run, "epoch")
    r = analyzer.open(run)
    maps, steps = r.feature_maps("body.1")
    assert list(steps) == [3, 6] == sorted(want)
    for t, s in enumerate(steps):
        np.testing.assert_allclose(maps[t], want[s][0], rtol=1e-6, atol=1e-7)
    caps = r.feature_captures
    assert list(caps["epoch"]) == [0, 1] and list(caps["layer"]) == ["body.1", "body.1"]


def test_capture_features_linear_layer_and_errors(tmp_path):
    torch.manual_seed(0)
    model = Tiny()
    run = str(tmp_path / "run")
    x = torch.randn(3, 3, 4, 4)
    with Recorder(model, run, grads_every=0, weights_every=0) as rec:
        rec.capture_features(x, "head")
        with pytest.raises(ValueError, match="unknown target_layer"):
            rec.capture_features(x, "nope")
    maps, steps = analyzer.open(run).feature_maps("head", sample=2)
    assert maps.shape == (1, 5, 1, 1) and list(steps) == [0]
    np.testing.assert_allclose(maps[0, :, 0, 0], _layer_out(model, x, "head")[2], rtol=1e-6, atol=1e-7)
    with pytest.raises(analyzer.TraceError, match="captured: head"):
        analyzer.open(run).feature_maps("conv")
    with pytest.raises(ValueError, match="sample"):
        analyzer.open(run).feature_maps("head", sample=3)
    with pytest.raises(ValueError, match="probe must be"):
        Recorder(model, str(tmp_path / "r2"), probe=x)
    # overwrite=True removes the old run's feature captures and graph with it
    with Recorder(model, run, grads_every=0, weights_every=0, graph=True, overwrite=True) as rec:
        assert not os.path.exists(os.path.join(run, "features"))
        rec.record_graph(x)
    with Recorder(model, run, grads_every=0, weights_every=0, overwrite=True):
        assert not os.path.exists(os.path.join(run, "graph.json"))


def test_parse_channels():
    assert parse_channels(None, 3) == [0, 1, 2] and parse_channels("0:2", 6) == [0, 1]
    assert parse_channels("5,1", 6) == [5, 1]
    with pytest.raises(ValueError, match="out of range"):
        parse_channels("6", 6)
    with pytest.raises(ValueError, match="like 0,1,2"):
        parse_channels("a", 6)


def test_cli_features_grid_gif_and_bad_input(tmp_path, capsys):
    run = str(tmp_path / "run")
    _train(run, 2)
    out = str(tmp_path / "out")
    code, o, err = run_cli(["features", run, "--layer", "body.1", "--channels", "0,2,5", "--out", out], capsys)
    assert code == 0, err
    from PIL import Image
    gif = Image.open(os.path.join(out, "features-body.1.gif"))
    assert gif.n_frames == 3
    png = Image.open(os.path.join(out, "features-body.1.png"))
    assert png.size[0] > 100 and "steps 0, 2, 4" in o
    for argv, msg in [(["--layer", "nope"], "no feature captures"), (["--layer", "body.1", "--channels", "9"],
                                                                     "out of range"),
                      (["--layer", "body.1", "--channels", "x"], "like 0,1,2")]:
        o2 = str(tmp_path / f"o{len(msg)}")
        code, _, err = run_cli(["features", run, *argv, "--out", o2], capsys)
        assert code == 2 and msg in err and err.count("\n") == 1, err
        assert not os.path.exists(o2)
    code, _, err = run_cli(["features", run, "--layer", "body.1", "--out", out], capsys)
    assert code == 2 and "--force" in err
    # a corrupt capture: one line, exit 2
    path = analyzer.open(run).feature_captures["path"].iloc[0]
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 42
    code, _, err = run_cli(["features", run, "--layer", "body.1", "--out", str(tmp_path / "o9")], capsys)
    assert code == 2 and "not supported" in err and err.count("\n") == 1


def test_slice_similarity_against_torch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 3))
    t = torch.from_numpy(x)
    s = t.transpose(0, 1).reshape(5, -1)
    cos = torch.nn.functional.cosine_similarity(s[:, None], s[None], dim=-1)
    want = (cos.sum() - cos.diagonal().sum()) / 20
    assert slice_similarity(x, 1, "cosine") == pytest.approx(float(want), rel=1e-10)
    logp = torch.log_softmax(s, 1)
    kl = torch.stack([torch.stack([torch.nn.functional.kl_div(logp[j], logp[i], log_target=True, reduction="sum")
                                   for j in range(5)]) for i in range(5)])
    assert slice_similarity(x, 1, "kl_divergence") == pytest.approx(float(kl.sum() / 20), rel=1e-10)
