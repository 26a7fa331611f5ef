"""The Grad-CAM family in numpy, computed offline from recorded activations A and gradients G = dy/dA.

One small base class owns the pipeline of the pytorch-grad-cam library; each method is a tiny subclass
that supplies channel weights or its own map::

    cam = sum_k w_k A_k  (or the method's map)  ->  ReLU  ->  per-image min-max (eps 1e-7)
        ->  bilinear resize (= torch F.interpolate(mode="bilinear", align_corners=False))  ->  min-max

    maps = get_cam("gradcam")(A, G, size=(224, 224))     # (N, 224, 224) float32 in [0, 1]

Score-CAM, Ablation-CAM and FullGrad need extra forward passes and are not computable offline.
Never imports torch.
"""

from __future__ import annotations

import numpy as np

#: eps of the per-image min-max normalisation (x -= min; x /= eps + max).
MINMAX_EPS = 1e-7


def minmax(x: np.ndarray, eps: float = MINMAX_EPS) -> np.ndarray:
    """Per-image min-max over the last two axes: ``(x - min) / (eps + max(x - min))``, same shape."""
    x = x - x.min(axis=(-2, -1), keepdims=True)
    return x / (eps + x.max(axis=(-2, -1), keepdims=True))


def _axis_weights(n_in: int, n_out: int):
    """Source indices and weights of 1-d linear interpolation with align_corners=False (torch's rule)."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    return i0, i1, lam


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes to ``size`` = (H, W), equal to
    ``torch.nn.functional.interpolate(x, size, mode="bilinear", align_corners=False)`` (no antialias).

    Args:
        x: (..., h, w) array.
        size: output (H, W).

    Returns:
        (..., H, W) array in x's floating dtype (float32 for integer input).
    """
    H, W = int(size[0]), int(size[1])
    h, w = x.shape[-2:]
    dt = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
    if (h, w) == (H, W):
        return x.astype(dt, copy=True)
    y0, y1, ly = _axis_weights(h, H)
    x0, x1, lx = _axis_weights(w, W)
    xf = x.astype(np.float64, copy=False)
    rows = xf[..., y0, :] * (1.0 - ly)[:, None] + xf[..., y1, :] * ly[:, None]       # (..., H, w)
    out = rows[..., x0] * (1.0 - lx) + rows[..., x1] * lx                             # (..., H, W)
    return out.astype(dt)


class BaseCAM:
    """Pipeline of a class-activation-map method; subclasses define :meth:`weights` or :meth:`cam_image`.

    Calling an instance: ``cam(A, G, size=None)`` with A, G of shape (N, K, h, w) returns the
    normalised maps, (N, h, w) without ``size`` or (N, H, W) resized, float32 in [0, 1].
    """

    name = "base"
    needs_grads = True

    def weights(self, A: np.ndarray, G: np.ndarray) -> np.ndarray:
        """Channel weights (N, K)."""
        raise NotImplementedError

    def cam_image(self, A: np.ndarray, G: np.ndarray) -> np.ndarray:
        """The raw map (N, h, w) before ReLU: sum_k w_k A_k by default."""
        w = self.weights(A, G)
        return np.einsum("nk,nkhw->nhw", w, A)

    def __call__(self, A: np.ndarray, G: np.ndarray | None = None, size: tuple[int, int] | None = None
                 ) -> np.ndarray:
        A = np.asarray(A, dtype=np.float64)
        if A.ndim != 4:
            raise ValueError(f"activations must be (N, K, h, w), not {A.shape}")
        if self.needs_grads:
            if G is None:
                raise ValueError(f"{self.name} needs gradients")
            G = np.asarray(G, dtype=np.float64)
            if G.shape != A.shape:
                raise ValueError(f"gradients {G.shape} and activations {A.shape} differ in shape")
        cam = np.maximum(self.cam_image(A, G), 0.0)
        cam = minmax(cam)
        if size is not None:
            cam = minmax(np.maximum(resize_bilinear(cam, size), 0.0))
        return np.clip(cam, 0.0, 1.0).astype(np.float32)


class GradCAM(BaseCAM):
    """Grad-CAM: w_k = mean_ij G_kij."""
    name = "gradcam"

    def weights(self, A, G):
        return G.mean(axis=(2, 3))


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++: alpha = G^2 / (2 G^2 + sum_ij A_k * G^3 + 1e-6) (0 where G == 0), w_k = sum_ij relu(G) alpha."""
    name = "gradcam++"

    def weights(self, A, G):
        g2, g3 = G ** 2, G ** 3
        s = A.sum(axis=(2, 3))[:, :, None, None]
        alpha = g2 / (2 * g2 + s * g3 + 1e-6)
        alpha = np.where(G != 0, alpha, 0.0)
        return (np.maximum(G, 0) * alpha).sum(axis=(2, 3))


class XGradCAM(BaseCAM):
    """XGrad-CAM: w_k = sum_ij(G A) / (sum_ij A + 1e-7)."""
    name = "xgradcam"

    def weights(self, A, G):
        s = A.sum(axis=(2, 3))
        return (G * A).sum(axis=(2, 3)) / (s + 1e-7)


class HiResCAM(BaseCAM):
    """HiResCAM: cam = sum_k G_k * A_k."""
    name = "hirescam"

    def cam_image(self, A, G):
        return (G * A).sum(axis=1)


class LayerCAM(BaseCAM):
    """LayerCAM: cam = sum_k relu(G_k) * A_k."""
    name = "layercam"

    def cam_image(self, A, G):
        return (np.maximum(G, 0) * A).sum(axis=1)


class GradCAMElementWise(BaseCAM):
    """Element-wise Grad-CAM: cam = sum_k relu(G_k * A_k)."""
    name = "elementwise"

    def cam_image(self, A, G):
        return np.maximum(G * A, 0).sum(axis=1)


def projection_2d(X: np.ndarray) -> np.ndarray:
    """Projection of mean-centred (hw x K) features on their first right singular vector, per image.

    pytorch-grad-cam's get_2d_projection, batched. The singular vector's sign is arbitrary in SVD;
    here it is fixed so that the vector's components sum to >= 0 (deterministic across LAPACKs).

    Args:
        X: (N, K, h, w).

    Returns:
        (N, h, w) projections.
    """
    N, K, h, w = X.shape
    X = np.nan_to_num(X, nan=0.0)
    R = X.reshape(N, K, h * w).transpose(0, 2, 1)                  # (N, hw, K)
    R = R - R.mean(axis=1, keepdims=True)
    _, _, VT = np.linalg.svd(R, full_matrices=False)
    v = VT[:, 0, :]                                                 # (N, K)
    v = v * np.where(v.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    return np.einsum("npk,nk->np", R, v).reshape(N, h, w)


class EigenCAM(BaseCAM):
    """Eigen-CAM: first principal component of the activations (no gradients)."""
    name = "eigencam"
    needs_grads = False

    def cam_image(self, A, G):
        return projection_2d(A)


class EigenGradCAM(BaseCAM):
    """Eigen-Grad-CAM: first principal component of G * A."""
    name = "eigengradcam"

    def cam_image(self, A, G):
        return projection_2d(G * A)


#: method name -> class.
METHODS: dict[str, type[BaseCAM]] = {c.name: c for c in (GradCAM, GradCAMPlusPlus, XGradCAM, HiResCAM, LayerCAM,
                                                          GradCAMElementWise, EigenCAM, EigenGradCAM)}


def get_cam(method: str) -> BaseCAM:
    """An instance of the CAM method called ``method`` (one of :data:`METHODS`). Raises ValueError."""
    try:
        return METHODS[str(method).lower()]()
    except KeyError:
        raise ValueError(f"unknown CAM method {method!r} (choose from {', '.join(METHODS)})") from None


__all__ = ["BaseCAM", "METHODS", "get_cam", "minmax", "resize_bilinear", "projection_2d"] + \
    [c.__name__ for c in METHODS.values()]
