"""Attention-IoU scores, bootstrap and the bbdecoder attention-iou command against direct computations."""

import helpers
import json
import os

import h5py
import numpy as np
import pytest

from bbdecoder.analyzer import attention_iou as AI
from bbdecoder.analyzer.trace import files
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.captures import CAPTURE_KIND, Capture
from bbdecoder.analyzer.cli import main


def test_iou_identity_uniform_fraction_and_empty_mask():
    r = np.random.default_rng(0)
    A = r.random((4, 9, 7))
    np.testing.assert_allclose(AI.iou_score(A, A), 1.0, rtol=1e-12)
    np.testing.assert_allclose(AI.iou_score(A, 3.0 * A), 1.0, rtol=1e-12)   # scale invariant
    for f_pix in (1, 5, 16, 40, 64):
        M = np.zeros((8, 8))
        M.reshape(-1)[:f_pix] = 1
        f = f_pix / 64
        assert AI.iou_score(np.ones((8, 8)), M)[0] == pytest.approx(4 * f / (3 * f + 1), rel=1e-12)
    assert AI.iou_score(A[:1], np.zeros((1, 9, 7)))[0] == 0.0
    assert np.isnan(AI.iou_score(np.zeros((9, 7)), A[0])[0])
    with pytest.raises(ValueError):
        AI.iou_score(A, -A)


def _direct_scores(A, M):
    out = {"iou": [], "l1": [], "pointing": [], "topk": []}
    for a_, m_ in zip(A, M):
        a, m = a_.ravel() / a_.sum(), m_.ravel() / m_.sum()
        out["iou"].append(np.dot(a, m) / np.sum(((a + m) / 2) ** 2))
        out["l1"].append(1 - 0.5 * np.abs(a - m).sum())
        mm = m_.ravel() / m_.max()
        out["pointing"].append(mm[int(np.argmax(a_.ravel()))])
        sel = set(np.flatnonzero(mm > 0.5))
        k = len(sel)
        top = set(sorted(range(a.size), key=lambda i: (-a_.ravel()[i], i))[:k])
        out["topk"].append(len(top & sel) / len(top | sel))
    return {k: np.array(v) for k, v in out.items()}


def test_scores_against_direct_formulas():
    r = np.random.default_rng(1)
    A = r.random((5, 6, 6))
    M = (r.random((5, 6, 6)) > 0.6).astype(float) * r.uniform(0.7, 1.0, (5, 6, 6))
    want = _direct_scores(A, M)
    for name, fn in AI.SCORE_FUNCS.items():
        np.testing.assert_allclose(fn(A, M), want[name], rtol=1e-12, err_msg=name)


def test_bootstrap_against_direct_loop():
    x = np.array([0.1, 0.5, np.nan, 0.9, 0.3, 0.7, 0.2])
    got = AI.bootstrap(x, n_boot=200, seed=7)
    v = x[np.isfinite(x)]
    rng = np.random.default_rng(7)
    means = []
    for _ in range(200):
        idx = rng.integers(0, len(v), size=len(v))
        means.append(sum(v[i] for i in idx) / len(v))
    assert got["n"] == 6 and got["mean"] == pytest.approx(v.mean())
    assert got["boot_mean"] == pytest.approx(np.mean(means), rel=1e-12)
    assert got["boot_std"] == pytest.approx(np.std(means), rel=1e-12)
    assert got["ci_low"] == pytest.approx(np.percentile(means, 2.5))
    # chunked draws (tiny BOOT_CHUNK) give the same resamples
    old = AI.BOOT_CHUNK
    try:
        AI.BOOT_CHUNK = 13
        assert AI.bootstrap(x, n_boot=200, seed=7)["boot_std"] == pytest.approx(got["boot_std"], rel=1e-12)
    finally:
        AI.BOOT_CHUNK = old
    assert np.isnan(AI.bootstrap(x, 0)["boot_std"]) and AI.bootstrap([np.nan], 10)["n"] == 0


def test_downsample_mask_matches_resize_and_max_normalises():
    M = np.zeros((2, 16, 16))
    M[0, 4:12, 2:10] = 1
    d = AI.downsample_mask(M, (4, 4))
    assert d.shape == (2, 4, 4) and d[0].max() == pytest.approx(1) and (d[1] == 0).all()


def write_capture(path, n=6, K=3, h=4, w=4, H=16, W=16, seed=0, **over):
    """A hand-made capture file (no torch): random A, G; known masks, logits, labels and groups."""
    r = np.random.default_rng(seed)
    A = np.maximum(r.normal(size=(n, K, h, w)), 0).astype(np.float32)
    G = r.normal(size=(n, K, h, w)).astype(np.float32)
    M = np.zeros((n, H, W), np.uint8)
    M[:, 4:12, 4:12] = 1
    logits = r.normal(size=(n, 2)).astype(np.float32)
    labels = np.arange(n) % 2
    groups = np.stack([labels, (np.arange(n) // 2) % 2], 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with h5py.File(path, "w") as f:
        attrs = {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "kind": CAPTURE_KIND,
                 "step": 3, "epoch": 1, "target_layer": "conv", "image_size": np.array([H, W]),
                 "targets": json.dumps([{"name": "bird", "key": "bird", "kind": "class", "index": 1}]),
                 "mask_names": json.dumps({"object": "object"}), "group_names": json.dumps(["y", "place"])}
        attrs.update(over)
        for k, v in attrs.items():
            f.attrs[k] = v
        f["activations"], f["grads/bird"], f["masks/object"] = A, G, M
        f["logits"], f["labels"], f["index"], f["groups"] = logits, labels, np.arange(n), groups
    return A, G, M, logits, labels, groups


def _run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    files.write_json_atomic(run / fmt.MANIFEST, {"format": fmt.FORMAT_NAME, "format_version": 1, "layers": [],
                                               "status": "complete"})
    return run


def test_attention_iou_table_against_direct(tmp_path):
    from bbdecoder import analyzer
    from bbdecoder.analyzer.cam import get_cam
    run = _run(tmp_path)
    A, G, M, logits, labels, groups = write_capture(str(run / "captures" / "capture-000000.h5"))
    from bbdecoder.analyzer.cam_notes import AttentionWarning
    with pytest.warns(AttentionWarning, match="0 everywhere for 1 of 6 images"):
        df = analyzer.open(run).attention_iou("bird", mask_group="object", bootstrap=50, seed=1,
                                              scores=("iou", "topk"))
    maps = get_cam("gradcam")(A, G, size=(16, 16))
    per = AI.iou_score(maps, M.astype(float))
    zero = ~(get_cam("gradcam")(A, G) > 0).any(axis=(1, 2))   # maps 0 everywhere: told in the notes
    assert zero.sum() == 1 and df.attrs["notes"][0].startswith(
        "gradcam maps of target 'bird' at layer 'conv' (captures/capture-000000.h5) are 0 everywhere for 1 of 6")
    ok = logits.argmax(1) == labels
    want = {"all": per, "correct": per[ok], "incorrect": per[~ok]}
    for y in (0, 1):
        for p in (0, 1):
            want[f"y={y},place={p}"] = per[(groups[:, 0] == y) & (groups[:, 1] == p)]
    d = df[df["score"] == "iou"].set_index("split")
    assert set(d.index) == set(want)
    for k, v in want.items():
        assert d.loc[k, "n"] == np.isfinite(v).sum()      # an all-zero map (NaN) is skipped
        if np.isfinite(v).any():
            assert d.loc[k, "mean"] == pytest.approx(np.nanmean(v), rel=1e-6)
            assert d.loc[k, "boot_std"] == pytest.approx(AI.bootstrap(v, 50, 1)["boot_std"], rel=1e-6)
    # map resolution: masks downsampled to 4x4 and max-normalised
    with pytest.warns(AttentionWarning, match="1 of 6"):
        dm = analyzer.open(run).attention_iou("bird", mask_group="object", bootstrap=0, resolution="map", by=None)
    want_m = AI.iou_score(get_cam("gradcam")(A, G), AI.downsample_mask(M, (4, 4)))
    assert dm.set_index("split").loc["all", "mean"] == pytest.approx(np.nanmean(want_m), rel=1e-6)
    assert list(dm["split"]) == ["all", "correct", "incorrect"]
    mp = analyzer.open(run).attention_maps("bird", method="layercam", size=(8, 8))
    np.testing.assert_allclose(mp, get_cam("layercam")(A, G, size=(8, 8)))


def test_cli_output_and_bad_input(tmp_path, capsys):
    run = _run(tmp_path)
    write_capture(str(run / "captures" / "capture-000000.h5"))
    try:
        main(["attention-iou", str(run), "--target", "bird", "--mask-group", "object", "--bootstrap", "20",
              "--json", "--by", "none"])
    except SystemExit as e:
        assert e.code in (0, None)
    recs = json.loads(capsys.readouterr().out)
    assert [r["split"] for r in recs] == ["all", "correct", "incorrect"] and recs[0]["n"] >= 5
    cases = [
        ["--target", "nope", "--mask-group", "object"],
        ["--target", "bird", "--mask-group", "sky"],
        ["--target", "bird"],
        ["--target", "bird", "--mask-group", "object", "--protected", "bird"],
        ["--target", "bird", "--mask-group", "object", "--capture", "3"],
        ["--target", "bird", "--mask-group", "object", "--capture", "x"],
        ["--target", "bird", "--mask-group", "object", "--score", "foo"],
        ["--target", "bird", "--mask-group", "object", "--by", "colour"],
        ["--target", "bird", "--mask-group", "object", "--method", "scorecam"],
    ]
    for extra in cases:
        code, _, err = helpers.run_cli(["attention-iou", str(run)] + extra, capsys)
        assert code == 2, (extra, err)
        assert err.startswith("bbdecoder: error:") and err.count("\n") == 1, (extra, err)
        assert "Traceback" not in err
    code, _, err = helpers.run_cli(["attention-iou", str(tmp_path / "none"), "--target", "bird", "--mask-group",
                                    "object"], capsys)
    assert code == 2
    empty = tmp_path / "empty_run"
    empty.mkdir()
    files.write_json_atomic(empty / fmt.MANIFEST, {"format": fmt.FORMAT_NAME, "format_version": 1, "layers": []})
    code, _, err = helpers.run_cli(["attention-iou", str(empty), "--target", "bird", "--mask-group", "object"], capsys)
    assert code == 2 and "no attention captures" in err


@pytest.mark.parametrize("what", ["garbage", "shape", "version", "targets"])
def test_corrupt_capture_is_one_line_error(tmp_path, capsys, what):
    run = _run(tmp_path)
    p = str(run / "captures" / "capture-000000.h5")
    if what == "garbage":
        os.makedirs(os.path.dirname(p))
        open(p, "wb").write(b"\x89HDF not really" * 10)
    elif what == "shape":
        write_capture(p)
        with h5py.File(p, "a") as f:
            del f["grads/bird"]
            f["grads/bird"] = np.zeros((6, 3, 4, 5), np.float32)
    elif what == "version":
        write_capture(p, format_version=99)
    else:
        write_capture(p, targets=json.dumps([{"name": "x", "key": "../x", "kind": "class"}]))
    with pytest.raises(fmt.TraceError):
        Capture(p)
    code, _, err = helpers.run_cli(["attention-iou", str(run), "--target", "bird", "--mask-group", "object"], capsys)
    assert code == 2 and err.count("\n") == 1


def test_attention_iou_without_torch(tmp_path):
    """The attention modules and command run with torch blocked and give the same numbers."""
    import subprocess
    import sys
    run = _run(tmp_path)
    write_capture(str(run / "captures" / "capture-000000.h5"))
    root = helpers.ROOT
    code = (f"import sys; sys.modules['torch'] = None; sys.path.insert(0, {root!r})\n"
            "from bbdecoder.analyzer.cli import main\n"
            f"main(['attention-iou', {str(run)!r}, '--target', 'bird', '--mask-group', 'object', '--json',"
            " '--bootstrap', '30', '--by', 'none', '--method', 'eigengradcam'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    from bbdecoder import analyzer
    want = analyzer.open(run).attention_iou("bird", mask_group="object", bootstrap=30, by=None, method="eigengradcam")
    got = json.loads(r.stdout)
    np.testing.assert_allclose([g["boot_mean"] for g in got], want["boot_mean"].to_numpy(), rtol=1e-12)
