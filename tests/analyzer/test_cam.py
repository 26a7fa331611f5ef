"""Grad-CAM family in numpy (analyzer.cam) against each method's formula computed directly, and the
numpy bilinear resize against torch.nn.functional.interpolate."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bbdecoder.analyzer import cam as C


def _data(seed=0, N=3, K=5, h=4, w=6):
    r = np.random.default_rng(seed)
    A = np.maximum(r.normal(size=(N, K, h, w)), 0)       # post-ReLU activations
    G = r.normal(size=(N, K, h, w))
    G[0, 0, 0, 0] = 0.0                                   # Grad-CAM++: alpha = 0 where G == 0
    return A, G


def _post(cam):
    cam = np.maximum(cam, 0)
    cam = cam - cam.min(axis=(1, 2), keepdims=True)
    return cam / (1e-7 + cam.max(axis=(1, 2), keepdims=True))


def _direct(method, A, G):
    N, K, h, w = A.shape
    out = np.zeros((N, h, w))
    for n in range(N):
        a, g = A[n], G[n]
        if method == "gradcam":
            wk = [g[k].mean() for k in range(K)]
            out[n] = sum(wk[k] * a[k] for k in range(K))
        elif method == "gradcam++":
            wk = []
            for k in range(K):
                s = a[k].sum()
                tot = 0.0
                for i in range(h):
                    for j in range(w):
                        gg = g[k, i, j]
                        alpha = gg ** 2 / (2 * gg ** 2 + s * gg ** 3 + 1e-6) if gg != 0 else 0.0
                        tot += max(gg, 0.0) * alpha
                wk.append(tot)
            out[n] = sum(wk[k] * a[k] for k in range(K))
        elif method == "xgradcam":
            wk = [(g[k] * a[k]).sum() / (a[k].sum() + 1e-7) for k in range(K)]
            out[n] = sum(wk[k] * a[k] for k in range(K))
        elif method == "hirescam":
            out[n] = (g * a).sum(0)
        elif method == "layercam":
            out[n] = (np.maximum(g, 0) * a).sum(0)
        elif method == "elementwise":
            out[n] = np.maximum(g * a, 0).sum(0)
        elif method in ("eigencam", "eigengradcam"):
            X = a if method == "eigencam" else g * a
            R = X.reshape(K, -1).T
            R = R - R.mean(0)
            _, _, vt = np.linalg.svd(R, full_matrices=True)
            v = vt[0] if vt[0].sum() >= 0 else -vt[0]
            out[n] = (R @ v).reshape(h, w)
    return _post(out)


@pytest.mark.parametrize("method", list(C.METHODS))
def test_each_method_matches_its_formula(method):
    A, G = _data()
    got = C.get_cam(method)(A, G)
    assert got.dtype == np.float32 and got.shape == (3, 4, 6)
    np.testing.assert_allclose(got, _direct(method, A, G), atol=2e-6)
    assert got.min() >= 0 and got.max() <= 1 and np.allclose(got.max(axis=(1, 2)), 1, atol=1e-5)


def test_methods_differ_and_eigen_sign_is_fixed():
    A, G = _data(1)
    maps = {m: C.get_cam(m)(A, G) for m in C.METHODS}
    assert not np.allclose(maps["gradcam"], maps["layercam"])
    # flipping the sign of all activations' centred projection must not change Eigen-CAM's output sign rule
    p = C.projection_2d(A)
    N, K = A.shape[:2]
    R = A.reshape(N, K, -1).transpose(0, 2, 1) - A.reshape(N, K, -1).transpose(0, 2, 1).mean(1, keepdims=True)
    v = np.linalg.lstsq(R[0], p[0].reshape(-1), rcond=None)[0]
    assert v.sum() >= 0


@pytest.mark.parametrize("src,dst", [((4, 6), (16, 24)), ((7, 7), (32, 32)), ((5, 3), (11, 13)),
                                     ((32, 32), (7, 9)), ((8, 8), (8, 8)), ((1, 5), (4, 10))])
def test_resize_matches_torch_interpolate(src, dst):
    x = np.random.default_rng(2).random((2, 3, *src)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=False).numpy()
    got = C.resize_bilinear(x, dst)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_pipeline_with_size_matches_torch():
    A, G = _data(3)
    got = C.get_cam("gradcam")(A, G, size=(17, 29))
    raw = torch.from_numpy(_direct("gradcam", A, G))[:, None]
    up = F.relu(F.interpolate(raw, size=(17, 29), mode="bilinear", align_corners=False))[:, 0].numpy()
    up = up - up.min(axis=(1, 2), keepdims=True)
    up = up / (1e-7 + up.max(axis=(1, 2), keepdims=True))
    np.testing.assert_allclose(got, up, atol=1e-5)


def test_bad_input():
    A, G = _data()
    with pytest.raises(ValueError, match="unknown CAM method"):
        C.get_cam("scorecam")
    with pytest.raises(ValueError, match="differ in shape"):
        C.get_cam("gradcam")(A, G[:, :2])
    with pytest.raises(ValueError, match="needs gradients"):
        C.get_cam("hirescam")(A)
    assert C.get_cam("eigencam")(A).shape == (3, 4, 6)   # Eigen-CAM needs no gradients
