"""Attention captures and feature captures: their file format in both directions (stdlib, numpy, h5py).

``RUN/captures/capture-NNNNNN.h5`` (recorder/attention.py; written as .part, then renamed; immutable):
root attributes format, format_version, kind="attention-capture", step, epoch, rank, target_layer,
targets (JSON [{name, key, kind, index}]), image_size [H, W], n_images, mask_names (JSON {key: name}),
group_names (JSON list); datasets activations (N,K,h,w), grads/<target key> (N,K,h,w), logits (N,C),
labels (N,...), index (N,) int64, optional groups (N,G) int64 and masks/<mask key> (N,Hm,Wm).

``RUN/features/features-NNNNNN.h5`` (recorder/features.py; likewise): root attributes format,
format_version, kind="feature-capture", layer (dotted module name), step, epoch, rank; dataset
values (N, ...) float32, the layer's output for the N probe inputs.

Writers (:class:`CaptureWriter`, :func:`write_feature_capture`) take numpy arrays and attributes;
readers (:class:`Capture`, :func:`read_feature_info`) validate what they open; a Capture is read in
blocks of images, so that thousands of captured images never sit in memory at once.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Callable, Iterator

import numpy as np

from . import files
from .format import (FORMAT_NAME, FORMAT_VERSION, LIVE_SUFFIX, SHARD_SUFFIX, TraceError, check_version,
                     is_safe_key)
from .h5safe import check_storage, hard_child, no_filter_plugins
from .hdf5 import abort_h5, attr_value, error_line

# --------------------------------------------------------------------------- attention captures: names
CAPTURES_DIR = "captures"
CAPTURE_KIND = "attention-capture"
CAPTURE_TARGET_KINDS = ("class", "predicted", "multilabel", "callable")
CAPTURE_DTYPES = ("float32", "float16")
_CAPTURE_RE = re.compile(r"^capture-(\d{6})\.h5\Z")
#: Largest number of elements of one image's activation map (K*h*w), of one mask (Hm*Wm) and of one
#: image (H*W) accepted on read: one image's map at float64 is then at most 128 MiB.
CAPTURE_MAX_ELEMENTS = 1 << 24
#: image_size (H*W) at most this many times the maps (h*w): a map is upsampled to the image size, so
#: an image_size attribute alone (no data behind it) cannot ask for unbounded work per image
#: (a 224x224 image over 7x7 maps is 1024; 65536 allows 512x512 over 2x2).
MAX_UPSAMPLING = 1 << 16
#: Bytes of activations + gradients read per block of images.
BLOCK_BYTES = 32 << 20


def capture_filename(index: int, live: bool = False) -> str:
    """File name of capture pass ``index`` (``capture-000000.h5``); ``live`` adds ``.part``."""
    name = f"capture-{int(index):06d}{SHARD_SUFFIX}"
    return name + LIVE_SUFFIX if live else name


def parse_capture_filename(name: str) -> int | None:
    """Index of a finished capture file name, or None if ``name`` is not one."""
    m = _CAPTURE_RE.match(name)
    return int(m.group(1)) if m else None


def list_captures(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """``(index, path)`` of every finished capture of a run, in index order (``.part`` files are ignored)."""
    d = os.path.join(os.fspath(run_dir), CAPTURES_DIR)
    try:
        names = os.listdir(d)
    except OSError:
        return []
    out = [(parse_capture_filename(n), os.path.join(d, n)) for n in names]
    return sorted((i, p) for i, p in out if i is not None)


def validate_capture(attrs: dict, shapes: dict, where: str) -> dict:
    """Check a capture file's root attributes and dataset shapes; returns the parsed description.

    Args:
        attrs: root attributes (bytes already decoded to str).
        shapes: dataset path -> shape tuple, e.g. ``{"activations": (N, K, h, w), "grads/bird": ...}``.
        where: file name for messages.

    Returns:
        dict with n, K, h, w, image_size (H, W), targets (list of dicts), mask_keys, mask_names,
        group_names, step, epoch, target_layer.

    Raises:
        TraceError: one line naming the first problem.
    """
    if attrs.get("format") != FORMAT_NAME or attrs.get("kind") != CAPTURE_KIND:
        raise TraceError(f"{where} is not a bbdecoder attention capture")
    check_version(attrs.get("format_version"), where)

    def _json(name, default):
        v = attrs.get(name)
        if v is None:
            return default
        try:
            return json.loads(v)
        except (TypeError, ValueError, RecursionError):
            raise TraceError(f"{where}: attribute {name!r} is not valid JSON") from None

    targets = _json("targets", None)
    if not isinstance(targets, list) or not targets:
        raise TraceError(f"{where}: 'targets' must be a non-empty JSON list")
    for t in targets:
        if not (isinstance(t, dict) and isinstance(t.get("name"), str) and is_safe_key(t.get("key"))
                and t.get("kind") in CAPTURE_TARGET_KINDS):
            raise TraceError(f"{where}: malformed target entry {t!r:.80}")
    act = shapes.get("activations")
    if act is None or len(act) != 4:
        raise TraceError(f"{where}: 'activations' must be a 4-d dataset (N, K, h, w)")
    n, K, h, w = (int(x) for x in act)
    if min(K, h, w) < 1 or K * h * w > CAPTURE_MAX_ELEMENTS:
        raise TraceError(f"{where}: activations of shape {tuple(act)} are not sane")
    for t in targets:
        g = shapes.get(f"grads/{t['key']}")
        if g is None or tuple(g) != tuple(act):
            raise TraceError(f"{where}: gradient of target {t['name']!r} has shape {g} but activations {tuple(act)}")
    for name in ("logits", "labels", "index"):
        s = shapes.get(name)
        if s is None or len(s) < 1 or int(s[0]) != n:
            raise TraceError(f"{where}: {name!r} is missing or does not have {n} rows")
    if len(shapes["logits"]) != 2:
        raise TraceError(f"{where}: 'logits' must be (N, C)")
    group_names = _json("group_names", [])
    if "groups" in shapes:
        s = shapes["groups"]
        if len(s) != 2 or int(s[0]) != n or not isinstance(group_names, list) or len(group_names) != int(s[1]):
            raise TraceError(f"{where}: 'groups' must be (N, G) with G group names")
    else:
        group_names = []
    mask_names = _json("mask_names", {})
    if not isinstance(mask_names, dict):
        raise TraceError(f"{where}: 'mask_names' must be a JSON object")
    mask_keys = sorted(k[len("masks/"):] for k in shapes if k.startswith("masks/"))
    for k in mask_keys:
        s = shapes[f"masks/{k}"]
        if not is_safe_key(k) or len(s) != 3 or int(s[0]) != n or min(s[1:]) < 1 \
                or int(s[1]) * int(s[2]) > CAPTURE_MAX_ELEMENTS:
            raise TraceError(f"{where}: mask {k!r} must be (N, H, W), not {tuple(s)}")
    size = _json("image_size", None) if isinstance(attrs.get("image_size"), str) else attrs.get("image_size")
    try:
        H, W = (int(x) for x in size)
    except (TypeError, ValueError, OverflowError):
        raise TraceError(f"{where}: 'image_size' must be [H, W]") from None
    if not (1 <= H < 1 << 16 and 1 <= W < 1 << 16) or H * W > CAPTURE_MAX_ELEMENTS:
        raise TraceError(f"{where}: image_size {size} is not sane")
    if H * W > MAX_UPSAMPLING * h * w:   # maps are upsampled to it: bounded work per stored byte
        raise TraceError(f"{where}: image_size {H}x{W} is more than {MAX_UPSAMPLING} times the maps' {h}x{w}")
    declared = attrs.get("n_images")
    if declared is not None and _int(declared, None) != n:
        raise TraceError(f"{where}: attribute n_images ({str(declared)[:40]}) does not match the {n} rows stored")
    step, epoch = _int(attrs.get("step", -1), None), _int(attrs.get("epoch", -1), None)
    if step is None or epoch is None:
        raise TraceError(f"{where}: attributes 'step' and 'epoch' must be integers")
    return {"n": n, "K": K, "h": h, "w": w, "image_size": (H, W), "targets": targets,
            "mask_keys": mask_keys, "mask_names": {k: str(mask_names.get(k, k)) for k in mask_keys},
            "group_names": [str(g) for g in group_names], "step": step,
            "epoch": epoch, "target_layer": str(attrs.get("target_layer", ""))}


def _int(v: Any, default: Any) -> Any:
    """``v`` as an int when it is an integer (or an integral float) within int64, else ``default``."""
    if isinstance(v, (bool, np.bool_)):
        return default
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v) or v != int(v):
            return default
        v = int(v)
    if not isinstance(v, (int, np.integer)) or not -(1 << 63) <= int(v) < 1 << 63:   # int64
        return default
    return int(v)


# --------------------------------------------------------------------------- feature captures: names
FEATURES_DIR = "features"
FEATURE_KIND = "feature-capture"
_FEATURE_RE = re.compile(r"^features-(\d{6})\.h5\Z")
#: Largest number of elements of one probe sample's output (C*H*W) accepted on read (64 MiB float32).
FEATURE_MAX_ELEMENTS = 1 << 24


def feature_filename(index: int, live: bool = False) -> str:
    """File name of feature capture ``index`` (``features-000000.h5``); ``live`` adds ``.part``."""
    name = f"features-{int(index):06d}{SHARD_SUFFIX}"
    return name + LIVE_SUFFIX if live else name


def list_features(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """``(index, path)`` of every finished feature capture, in index order (``.part`` files ignored)."""
    d = os.path.join(os.fspath(run_dir), FEATURES_DIR)
    try:
        names = os.listdir(d)
    except OSError:
        return []
    out = [(_FEATURE_RE.match(n), os.path.join(d, n)) for n in names]
    return sorted((int(m.group(1)), p) for m, p in out if m)


def validate_feature_capture(attrs: dict, shape: Any, where: str) -> dict:
    """Check a feature capture's root attributes and ``values`` shape.

    Returns:
        dict with layer (str), step, epoch (int) and shape (tuple, N first).

    Raises:
        TraceError: one line naming the first problem.
    """
    if attrs.get("format") != FORMAT_NAME or attrs.get("kind") != FEATURE_KIND:
        raise TraceError(f"{where} is not a bbdecoder feature capture")
    check_version(attrs.get("format_version"), where)
    layer = attrs.get("layer")
    if not isinstance(layer, str):
        raise TraceError(f"{where}: attribute 'layer' must be a string")
    step, epoch = _int(attrs.get("step"), None), _int(attrs.get("epoch"), None)
    if step is None or epoch is None:
        raise TraceError(f"{where}: attributes 'step' and 'epoch' must be integers")
    if shape is None or len(shape) < 2 or min(int(x) for x in shape) < 1:
        raise TraceError(f"{where}: 'values' must be a dataset of shape (N, C, ...), not {shape}")
    n = 1
    for x in shape[1:]:
        n *= int(x)
    if n > FEATURE_MAX_ELEMENTS:
        raise TraceError(f"{where}: values of shape {tuple(shape)} are not sane")
    return {"layer": layer, "step": step, "epoch": epoch, "shape": tuple(int(x) for x in shape)}


# --------------------------------------------------------------------------- writing
def _reserve(run_dir: str, folder: str, filename: Callable[..., str], listing: Callable) -> tuple[int, str]:
    """The next free index of ``RUN/<folder>/`` and its ``.part`` file, created exclusively (so that
    two writers never share a file)."""
    d = os.path.join(run_dir, folder)
    os.makedirs(d, exist_ok=True)
    i = max([k for k, _ in listing(run_dir)], default=-1) + 1
    while True:
        part = os.path.join(d, filename(i, live=True))
        if not os.path.exists(os.path.join(d, filename(i))):
            try:
                os.close(os.open(part, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return i, part
            except FileExistsError:
                pass
        i += 1


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:   # already gone
        pass


class CaptureWriter:
    """Writes one attention capture batch by batch. Constructing it reserves the next index of
    ``run_dir/captures/`` (an empty ``.part`` file); :meth:`open` creates the HDF5 file, :meth:`append`
    adds a batch, :meth:`finish` writes the root attributes and publishes the file (fsync, rename),
    :meth:`abort` closes and deletes an unfinished one (never raises; nothing to do after finish).

    Attributes:
        index: the capture index. part / path: the file while written / once finished. n: images so far.
    """

    def __init__(self, run_dir: str):
        self.index, self.part = _reserve(run_dir, CAPTURES_DIR, capture_filename, list_captures)
        self.path = self.part[: -len(LIVE_SUFFIX)]
        self.n = 0
        self._f = None
        self._ds: dict = {}
        self._done = False

    def open(self) -> None:
        """Create the HDF5 file (truncating the reserved ``.part``)."""
        import h5py
        self._f = h5py.File(self.part, "w")

    def append(self, rows: dict[str, np.ndarray], B: int, batch: int) -> None:
        """Append one batch of ``B`` images: ``rows`` maps dataset paths (activations, grads/<key>,
        logits, labels, index, masks/<key>, groups) to arrays of ``B`` rows each.

        Args:
            rows: the batch's arrays, in storage dtype; every batch carries the same datasets with the
                same row shapes. ``masks/*`` are stored with lzf compression.
            B: images in the batch.
            batch: the batch number (for messages).

        Raises:
            ValueError: a dataset appears after the first batch, changes row shape, or is missing.
        """
        f, ds, n = self._f, self._ds, self.n
        for key, v in rows.items():
            d = ds.get(key)
            if d is None:
                if n:
                    raise ValueError(f"{key} appears after the first batch")
                d = ds[key] = f.create_dataset(key, shape=(0, *v.shape[1:]), maxshape=(None, *v.shape[1:]),
                                               chunks=(max(1, min(B, (1 << 20) // max(1, v[0].nbytes))),
                                                       *v.shape[1:]), dtype=v.dtype,
                                               **({"compression": "lzf"} if key.startswith("masks/") else {}))
            if d.shape[1:] != v.shape[1:]:
                raise ValueError(f"{key}: batch of shape {v.shape[1:]} after {d.shape[1:]}")
            d.resize((n + B, *v.shape[1:]))
            d[n:n + B] = v
        missing = set(ds) - set(rows)
        if missing:
            raise ValueError(f"batch {batch} lacks {', '.join(sorted(missing))}")
        self.n = n + B

    def finish(self, *, step: int, epoch: int, rank: int, target_layer: str, image_size: list[int],
               dtype: str, targets: list[dict], mask_names: dict[str, str], group_names: list[str]) -> str:
        """Write the root attributes (format, version, kind, these, n_images, created); close; publish.

        Args:
            step / epoch / rank: when and where it was captured (-1: stand-alone).
            target_layer: dotted name of the captured layer. image_size: [H, W] of the inputs.
            dtype: storage dtype of activations and gradients (one of :data:`CAPTURE_DTYPES`).
            targets: [{name, key, kind, index}]. mask_names: {mask key: name}. group_names: column names.

        Returns:
            Path of the finished file ``RUN/captures/capture-NNNNNN.h5``.
        """
        f = self._f
        f.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                        "kind": CAPTURE_KIND, "step": int(step), "epoch": int(epoch), "rank": int(rank),
                        "target_layer": target_layer, "image_size": np.asarray(image_size, np.int64),
                        "n_images": self.n, "dtype": dtype, "created": time.time(),
                        "targets": json.dumps(targets), "mask_names": json.dumps(mask_names),
                        "group_names": json.dumps(group_names)})
        f.flush()   # a write error (ENOSPC, EFBIG) shows here, while the file can still be aborted
        f.close()
        self._f = None
        files.publish(self.part, self.path)
        self._done = True
        return self.path

    def abort(self) -> None:
        """Close an unfinished file without a crash at exit (a full disk) and delete it; never raises."""
        if self._f is not None:
            abort_h5(self._f)
            self._f = None
        if not self._done:
            _unlink(self.part)


def write_feature_capture(run_dir: str, values: np.ndarray, *, layer: str, step: int, epoch: int,
                          rank: int) -> str:
    """Write ``run_dir/features/features-NNNNNN.h5`` (as ``.part``, then published): ``values`` (N, C, ...),
    the layer output for N probe inputs, as float32; ``layer`` its dotted name; step / epoch / rank
    when and where it was captured. Returns the finished file's path; on an error the ``.part`` goes."""
    import h5py
    _, part = _reserve(run_dir, FEATURES_DIR, feature_filename, list_features)
    final = part[: -len(LIVE_SUFFIX)]
    ok = False
    try:
        f = h5py.File(part, "w")
        try:
            f.create_dataset("values", data=np.ascontiguousarray(values, dtype=np.float32))
            f.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                            "kind": FEATURE_KIND, "layer": layer, "step": int(step), "epoch": int(epoch),
                            "rank": int(rank), "created": time.time()})
            f.flush()   # a write error (ENOSPC, EFBIG) shows here, while the file can still be aborted
            f.close()
        except BaseException:   # an error while writing (a full disk): close without a crash at exit
            abort_h5(f)
            raise
        files.publish(part, final)
        ok = True
        return final
    finally:
        if not ok:
            _unlink(part)


# --------------------------------------------------------------------------- reading
class Capture:
    """One attention capture file: metadata on open, data by blocks of images.

    Attributes:
        index: capture index (from the file name). path: file path. n: number of images.
        K, h, w: channels and spatial size of the target layer. image_size: (H, W) of the inputs.
        targets: list of {name, key, kind, index}. mask_keys / mask_names: stored mask groups.
        group_names: names of the group columns. step, epoch: when it was captured (-1: stand-alone).
    """

    def __init__(self, path: str, index: int = -1):
        import h5py
        self.path = path
        self.index = index
        self.name = os.path.join(CAPTURES_DIR, os.path.basename(path))
        no_filter_plugins()
        try:
            with h5py.File(path, "r", locking=False) as f:
                attrs = {k: attr_value(v) for k, v in f.attrs.items()}
                shapes: dict = {}
                # visititems follows hard links only: a soft or external link is not a dataset here
                f.visititems(lambda k, o: shapes.__setitem__(k, o.shape) if isinstance(o, h5py.Dataset) else None)
                d = validate_capture(attrs, shapes, self.name)   # shapes agree before any layout is checked
                for k in shapes:   # declared sizes backed by stored bytes, chunks bounded, before any read
                    check_storage(f[k], f"capture {self.name}: dataset {k!r}")
        except TraceError:
            raise
        except Exception as e:  # truncated or random file
            raise TraceError(f"corrupt or unreadable capture {self.name}: {error_line(e)}") from None
        self.__dict__.update(d)
        self.mask_shapes = {k: tuple(shapes[f"masks/{k}"][1:]) for k in self.mask_keys}
        self.n_classes = int(shapes["logits"][1])
        self.label_shape = tuple(shapes["labels"][1:])
        self.has_groups = "groups" in shapes
        self._target = {t["name"]: t for t in self.targets}

    def target(self, name: str) -> dict:
        """The target entry called ``name``; TraceError listing the known ones otherwise."""
        t = self._target.get(name)
        if t is None:
            raise TraceError(f"unknown target {name!r} in {self.name} (captured: "
                             f"{', '.join(self._target)})")
        return t

    def mask_key(self, group: str) -> str:
        """Dataset key of the mask group called ``group`` (by name or key)."""
        for k, nm in self.mask_names.items():
            if group in (k, nm):
                return k
        known = ", ".join(self.mask_names.values()) or "none"
        raise TraceError(f"unknown mask group {group!r} in {self.name} (captured: {known})")

    def block_size(self, n_grads: int = 1) -> int:
        """Images per block so that activations and ``n_grads`` gradients, and the maps made of them at
        the image or mask size (a few float64 copies), take about BLOCK_BYTES."""
        out = max([self.image_size[0] * self.image_size[1]]
                  + [int(s[0]) * int(s[1]) for s in self.mask_shapes.values()])
        per = (1 + n_grads) * self.K * self.h * self.w * 8 + 4 * out * 8
        return int(max(1, min(self.n, BLOCK_BYTES // max(per, 1))))

    def read(self, names: list[str], start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Datasets ``names`` (e.g. "activations", "grads/bird", "masks/background") for images [start, stop)."""
        import h5py
        stop = self.n if stop is None else min(stop, self.n)
        out = {}
        try:
            with h5py.File(self.path, "r", locking=False) as f:
                for k in names:
                    out[k] = f[k][start:stop]
        except Exception as e:
            raise TraceError(f"corrupt or truncated capture {self.name}: {error_line(e)}") from None
        return out

    def blocks(self, names: list[str], block: int | None = None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(start, {name: array})`` for consecutive blocks of images, the file kept open."""
        import h5py
        block = block or self.block_size(sum(1 for k in names if k.startswith("grads/")))
        try:
            f = h5py.File(self.path, "r", locking=False)
        except Exception as e:
            raise TraceError(f"corrupt or unreadable capture {self.name}: {error_line(e)}") from None
        with f:
            for s in range(0, self.n, block):
                try:
                    d = {k: f[k][s:s + block] for k in names}
                except Exception as e:
                    raise TraceError(f"corrupt or truncated capture {self.name}: {error_line(e)}") from None
                yield s, d

    def correct(self, target: str) -> np.ndarray:
        """(N,) bool: is the model's prediction right for ``target``? Single-label targets: argmax of the
        logits equals the label; multi-label: (z_t > 0) equals labels[:, t]. False where undefined."""
        t = self.target(target)
        d = self.read(["logits", "labels"])
        z, y = d["logits"], d["labels"]
        if t["kind"] == "multilabel":
            if y.ndim != 2 or t["index"] >= y.shape[1]:
                raise TraceError(f"{self.name}: multi-label target {target!r} needs (N, L) labels")
            return (z[:, t["index"]] > 0) == (y[:, t["index"]] > 0.5)
        if y.ndim != 1:
            return np.zeros(self.n, bool)
        return z.argmax(1) == y

    def group_labels(self) -> np.ndarray | None:
        """Group labels (N, G), one column per name of :attr:`group_names`; None when none were captured."""
        if not self.has_groups:
            return None
        return self.read(["groups"])["groups"]


def open_captures(run_dir: str, problems: list[str] | None = None) -> list[Capture]:
    """Every finished capture of a run, opened and validated, in index order.

    Args:
        run_dir: the run. problems: None: a malformed capture raises. A list: a malformed capture is
            left out and its one-line reason appended here (a report skips it with a note).

    Raises:
        TraceError: a malformed capture (``problems`` None).
    """
    out = []
    for i, p in list_captures(run_dir):
        try:
            out.append(Capture(files.check_trace_file(p, run_dir, "capture"), i))
        except TraceError as e:
            if problems is None:
                raise
            problems.append(str(e))
    return out


def pick(captures: list[Capture], capture: int, run_dir: str) -> Capture:
    """The capture at position ``capture`` (Python indexing: -1 is the latest)."""
    if not captures:
        raise TraceError(f"no attention captures in {run_dir} (record one with recorder.capture_attention "
                         "or Recorder.capture_attention)")
    try:
        return captures[int(capture)]
    except (IndexError, ValueError, TypeError):
        raise TraceError(f"capture {capture!r} out of range: {run_dir} holds {len(captures)} capture(s)") from None


def read_feature_info(path: str) -> dict:
    """Open one feature capture and validate it: dict with layer (str), step, epoch (int) and shape
    (tuple, N first). Raises TraceError (one line) for a malformed or unreadable file."""
    import h5py
    no_filter_plugins()
    where = os.path.basename(path)
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = {k: attr_value(v) for k, v in f.attrs.items()}
            ds = hard_child(f, "values")
            shape = ds.shape if isinstance(ds, h5py.Dataset) else None
            info = validate_feature_capture(attrs, shape, where)   # shape and attributes first
            check_storage(ds, f"feature capture {where}: values")  # then declared against stored bytes
    except TraceError as e:
        msg = str(e)
        raise TraceError(msg if msg.startswith("feature capture") else f"feature capture {msg}"
                         if msg.startswith(where) else f"feature capture {where}: {msg}") from None
    except Exception as e:   # truncated, random or unreadable
        raise TraceError(f"cannot read feature capture {where}: {error_line(e)}") from None
    return info


def read_feature_sample(path: str, sample: int) -> np.ndarray:
    """Row ``sample`` of a feature capture's ``values`` as float32 (C, ...)."""
    import h5py
    try:
        with h5py.File(path, "r", locking=False) as f:
            return np.asarray(hard_child(f, "values")[int(sample)], dtype=np.float32)
    except TraceError:
        raise
    except Exception as e:   # changed or truncated since it was validated
        raise TraceError(f"corrupt or truncated feature capture {os.path.basename(path)}: {error_line(e)}") from None
