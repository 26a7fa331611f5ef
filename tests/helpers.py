"""Shared test helpers: small recorded runs with the raw tensors captured directly for comparison,
reference statistics, the in-process CLI runner, directory snapshots."""

import os as _os

#: the tests folder and the repository root
TESTS = _os.path.dirname(_os.path.abspath(__file__))
ROOT = _os.path.dirname(TESTS)

import numpy as np
import torch
from torch import nn

from bbdecoder.recorder import Recorder


class Tiny(nn.Module):
    """Conv + nested Sequential + Linear; about 1.4k parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.ReLU())
        self.head = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = self.body(self.conv(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.head(x.flatten(1))


def record_tiny(run_dir, epochs=2, steps_per_epoch=5, seed=0, nan_at=None, **rec_kwargs):
    """Train Tiny with a Recorder (raw gradients every step unless ``grads_every`` says otherwise;
    gradient statistics at the Recorder's default, every step); return captured raw tensors.

    Returns:
        dict with grads[(name, param)] -> {step: float32 array}, weights likewise, losses {step: float},
        epochs {step: epoch}.
    """
    torch.manual_seed(seed)
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cap = {"grads": {}, "weights": {}, "losses": {}, "epochs": {}}
    rec_kwargs.setdefault("grads_every", 1)   # raw gradients every step (the Recorder's default is every 50)
    gsched = rec_kwargs["grads_every"]
    wsched = rec_kwargs.get("weights_every", 50)
    step = 0
    with Recorder(model, run_dir, **rec_kwargs) as rec:
        for ep in range(epochs):
            for _ in range(steps_per_epoch):
                x = torch.randn(8, 3, 8, 8)
                y = torch.randint(0, 5, (8,))
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                saved = None
                if nan_at is not None and step == nan_at:
                    saved = model.head.weight.grad.clone()
                    with torch.no_grad():
                        model.head.weight.grad[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
                for mname, m in model.named_modules():
                    for pname, p in m.named_parameters(recurse=False):
                        if _fires(gsched, step) and p.grad is not None:
                            cap["grads"].setdefault((mname, pname), {})[step] = p.grad.detach().clone().numpy()
                        if _fires(wsched, step):
                            cap["weights"].setdefault((mname, pname), {})[step] = p.detach().clone().numpy()
                cap["losses"][step] = loss.item()
                cap["epochs"][step] = ep
                rec.step(loss=loss)
                if saved is not None:  # the trace keeps the NaN/Inf; training goes on unharmed
                    model.head.weight.grad.copy_(saved)
                opt.step()
                step += 1
            rec.epoch_end()
    return cap


def _fires(s, step):
    if callable(s):
        return s(step)
    return bool(s) and step % s == 0


def stats64(a):
    x = np.asarray(a, np.float64).ravel()
    f = x[np.isfinite(x)]
    return {"mean": f.mean(), "abs_mean": np.abs(f).mean(), "max_abs": np.abs(f).max(), "var": f.var(),
            "l1": np.abs(f).sum(), "l2": np.sqrt((f ** 2).sum()), "nonfinite": x.size - f.size,
            "std": f.std(), "min": f.min(), "max": f.max()}


def run_cli(argv, capsys):
    """Run ``bbdecoder argv`` in-process; returns (exit code, stdout, stderr)."""
    from bbdecoder.analyzer.cli import main
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)   # SystemExit() is success
    out, err = capsys.readouterr()
    return code, out, err


def tree_snapshot(root):
    """{relative path: (size, mtime_ns)} of every file and directory under ``root`` (symlinks not followed)."""
    import os
    out = {}
    for dp, dns, fs in os.walk(root):
        for n in dns + fs:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size if n in fs else 0, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------ tampered copies of a run
def copy_run(run, tmp):
    """A copy of the run directory ``run`` at ``tmp/copy`` (a pathlib.Path), to be tampered with."""
    import shutil
    d = tmp / "copy"
    shutil.copytree(run, d)
    return d


def shard_path(d, i=0):
    """Path of rank 0's shard number ``i`` in the run directory ``d``."""
    return d / "rank-00000" / f"shard-{i:06d}.h5"


def manifest_edit(fn):
    """A case builder ``make(run, tmp) -> copy`` whose copy's manifest went through ``fn(manifest)``."""
    def make(run, tmp):
        import json
        d = copy_run(run, tmp)
        m = json.loads((d / "manifest.json").read_text())
        fn(m)
        (d / "manifest.json").write_text(json.dumps(m))
        return d
    return make


def unpack_grad_stats(run_dir) -> int:
    """Rewrite every shard of ``run_dir`` in place from the packed layout of the gradient statistics
    (``/packed/grad_stats/<n>/{values, steps, index}``) into the per-parameter layout of older traces
    (``/grad_stats/<layer key>/<param key>/{values, steps}`` with the index's attributes), with h5py
    and json only (independent of the analyzer's reader). Returns the number of packed groups rewritten."""
    import glob
    import json
    import h5py
    n = 0
    for path in glob.glob(_os.path.join(str(run_dir), "rank-*", "shard-*.h5")):
        with h5py.File(path, "r+") as f:
            if "packed" not in f:
                continue
            rows: dict = {}
            for g in f["packed/grad_stats"].values():
                vals, steps = g["values"][()], g["steps"][()]
                for j, (lk, pk, attrs) in enumerate(json.loads(g["index"][()].tobytes().decode())):
                    e = rows.setdefault((lk, pk), [[], [], attrs])
                    e[0].append(steps)
                    e[1].append(vals[:, j])
                n += 1
            del f["packed"]
            for (lk, pk), (st, vs, attrs) in rows.items():
                st, vs = np.concatenate(st), np.concatenate(vs)
                order = np.argsort(st, kind="stable")
                g = f.require_group("grad_stats").require_group(lk).create_group(pk)
                g.create_dataset("values", data=vs[order])
                g.create_dataset("steps", data=st[order])
                for a, v in attrs.items():
                    g.attrs[a] = np.asarray(v, np.int64) if isinstance(v, list) else v
    return n


def split_payloads(data: dict) -> dict:
    """{payload path: (values, steps)} from {dataset path: array} of one shard read with h5py: the
    per-parameter groups ``<kind>/<lk>/<pk>`` as they are, and each packed group
    ``packed/<kind>/<n>`` (or flat group ``flat/<kind>/<n>``) split by its ``index`` into
    ``<kind>/<lk>/<pk>`` (rows of several groups joined in step order)."""
    import json
    out: dict = {}
    for k, v in data.items():
        if not k.endswith("/values"):
            continue
        base = k[:-len("values")]
        if not k.startswith(("packed/", "flat/")):
            out[k[:-len("/values")]] = (v, data[base + "steps"])
            continue
        kind = k.split("/")[1]
        for j, (lk, pk, *place) in enumerate(json.loads(data[base + "index"].tobytes().decode())):
            key = f"{kind}/{lk}/{pk}"
            if k.startswith("flat/"):   # [attrs, start, numel, shape]: columns start .. start + numel
                vals = v[:, place[1]:place[1] + place[2]].reshape((-1, *place[3]))
            else:
                vals = v[:, j]
            steps = data[base + "steps"]
            if key in out:
                vals, steps = np.concatenate([out[key][0], vals]), np.concatenate([out[key][1], steps])
                order = np.argsort(steps, kind="stable")
                vals, steps = vals[order], steps[order]
            out[key] = (vals, steps)
    return out


def h5_payload(f, kind: str, layer_key: str, param_key: str):
    """``(steps (k,), values (k, *shape))`` of one payload of the open h5py shard ``f``, in whichever
    layout it is stored (its own group, or a packed or flat group's columns by its ``index``), with
    h5py and json only (independent of the analyzer's reader); None when the shard lacks it."""
    own = f.get(f"{kind}/{layer_key}/{param_key}")
    if own is not None:
        return own["steps"][()], own["values"][()]
    data: dict = {}
    for root in ("packed", "flat"):
        if f"{root}/{kind}" in f:
            for n, g in f[f"{root}/{kind}"].items():
                for d in ("values", "steps", "index"):
                    data[f"{root}/{kind}/{n}/{d}"] = g[d][()]
    got = split_payloads(data).get(f"{kind}/{layer_key}/{param_key}")
    return None if got is None else (got[1], got[0])


def unflatten_snapshots(run_dir) -> int:
    """Rewrite every shard of ``run_dir`` in place from the flat layout of raw gradients and weights
    (``/flat/<kind>/<n>/{values (k, N), steps, index}``) into the per-tensor layout of older traces
    (``/<kind>/<layer key>/<param key>/{values (k, *shape), steps}`` with the index's attributes), with
    h5py and json only (independent of the analyzer's reader). Returns the number of flat groups rewritten."""
    import glob
    import json
    import h5py
    n = 0
    for path in glob.glob(_os.path.join(str(run_dir), "rank-*", "shard-*.h5")):
        with h5py.File(path, "r+") as f:
            if "flat" not in f:
                continue
            data: dict = {}
            f["flat"].visititems(lambda k, o: data.__setitem__(f"flat/{k}", o[()]) if isinstance(o, h5py.Dataset)
                                 else None)
            n += sum(k.endswith("/index") for k in data)
            attrs = {}
            for k, v in data.items():
                if k.endswith("/index"):
                    for lk, pk, at, *_ in json.loads(v.tobytes().decode()):
                        attrs[(k.split("/")[1], lk, pk)] = at
            del f["flat"]
            for key, (vals, steps) in split_payloads(data).items():
                g = f.create_group(key)
                g.create_dataset("values", data=vals)
                g.create_dataset("steps", data=steps)
                for a, v in attrs[tuple(key.split("/"))].items():
                    g.attrs[a] = np.asarray(v, np.int64) if isinstance(v, list) else v
    return n


def set_payload_attr(f, kind: str, layer_key: str, param_key: str, name: str, value) -> None:
    """Set attribute ``name`` of one payload in the open (writable) h5py shard ``f``, in whichever
    layout the shard stores it (flat, packed: the entry of its ``index``; else its group's attributes)."""
    import json
    for root in ("flat", "packed"):
        if f"{root}/{kind}" not in f:
            continue
        for g in f[f"{root}/{kind}"].values():
            entries = json.loads(g["index"][()].tobytes().decode())
            for e in entries:
                if (e[0], e[1]) == (layer_key, param_key):
                    e[2][name] = value
            del g["index"]
            g["index"] = np.frombuffer(json.dumps(entries).encode(), np.uint8)
        return
    f[f"{kind}/{layer_key}/{param_key}"].attrs[name] = value


def fill_grad_stats(f, layer_key: str, param_key: str, value: float) -> None:
    """Set every gradient-statistics row of one parameter in the open (writable) h5py shard ``f`` to
    ``value``, in whichever layout the shard stores them (packed or per parameter)."""
    import json
    if "packed" not in f:
        v = f[f"grad_stats/{layer_key}/{param_key}/values"]
        v[...] = np.full(v.shape, value)
        return
    for g in f["packed/grad_stats"].values():
        for j, (lk, pk, *_) in enumerate(json.loads(g["index"][()].tobytes().decode())):
            if (lk, pk) == (layer_key, param_key):
                g["values"][:, j, :] = np.full(g["values"].shape[::2], value)


# ------------------------------------------------------------------ multi-process (gloo) jobs
def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo_workers(script, args, cwd, world: int = 2, timeout: float = 120.0, what: str = "workers") -> None:
    """Run ``python script *args`` as ``world`` torch.distributed ranks (env:// rendezvous on the
    loopback interface only, one intra-op thread each); fail the test with the log of any rank that
    exits non-zero, or when they do not finish within ``timeout`` seconds. No worker is left behind."""
    import subprocess
    import sys
    import time

    import pytest
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(_os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                   RANK=str(r), LOCAL_RANK=str(r), OMP_NUM_THREADS="1",
                   PYTHONPATH=ROOT + _os.pathsep + _os.environ.get("PYTHONPATH", ""))
        if _os.path.exists("/sys/class/net/lo"):
            env["GLOO_SOCKET_IFNAME"] = "lo"      # loopback only: no dependence on the host's network
        procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, cwd=str(cwd),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    logs = []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].decode(errors="replace"))
            except subprocess.TimeoutExpired:
                pytest.fail(f"the {what} did not finish within {timeout:.0f} s")
    finally:
        for p in procs:   # never leave a worker behind (e.g. one waiting for a dead peer)
            if p.poll() is None:
                p.kill()
                p.wait(10)
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log[-4000:]}"


# ------------------------------------------------------------------ reference computations
def pool_by_groupby(df):
    """The pooling formulas of analyzer.gradients.pool_params through one plain pandas groupby of the keys."""
    keys = [c for c in ("rank", "step", "epoch", "layer_id", "layer") if c in df.columns]
    mean = df["mean"].fillna(0)
    d = df.assign(_s=mean * df["count"], _q=(df["var"].fillna(0) + mean ** 2) * df["count"],
                  _l2sq=df["l2"].fillna(0) ** 2)
    out = d.groupby(keys, sort=True).agg(numel=("numel", "sum"), count=("count", "sum"),
                                         nonfinite=("nonfinite", "sum"), _s=("_s", "sum"), _q=("_q", "sum"),
                                         max_abs=("max_abs", "max"), l1=("l1", "sum"),
                                         _l2sq=("_l2sq", "sum")).reset_index()
    n = out["count"].to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        nn = np.where(n > 0, n, np.nan)
        out["mean"] = out["_s"] / nn
        out["var"] = np.maximum(out["_q"] / nn - out["mean"] ** 2, 0.0)
        out["abs_mean"] = out["l1"] / nn
    out["l2"] = np.sqrt(out["_l2sq"])
    return out[keys + ["numel", "count", "nonfinite", "mean", "abs_mean", "max_abs", "var", "l1", "l2"]]


def linear_manifest(names, shapes, steps: int, epochs: int) -> dict:
    """A complete run's manifest (format version 1) of Linear-like layers named ``names``, each with the
    parameters ``shapes`` [(name, shape)], for traces written with the storage classes (numpy only)."""
    from bbdecoder.analyzer.trace import format as fmt
    pkeys = fmt.assign_keys([p for p, _ in shapes])
    n_params = int(sum(np.prod(s) for _, s in shapes))
    layers = [{"id": i, "name": n, "type": "Linear", "class": "torch.nn.Linear", "key": k,
               "params": [{"name": p, "key": pk, "shape": list(s), "dtype": "float32", "numel": int(np.prod(s)),
                           "requires_grad": True} for (p, s), pk in zip(shapes, pkeys)],
               "n_params": n_params, "selected": True} for i, (n, k) in enumerate(zip(names, fmt.assign_keys(names)))]
    return {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "created": 0.0,
            "status": fmt.STATUS_COMPLETE, "world_size": 1, "model": {}, "config": {}, "layers": layers,
            "steps": steps, "epochs": epochs}


def write_linear_run(d, names, shapes, steps: int, epochs: int):
    """Create run directory ``d`` with the :func:`linear_manifest` of ``names`` written; returns
    (manifest, keys [(layer_key, param_key)] in layer order, the payload attrs of each key, numel of
    each key as float64 (P,)), for traces written with the storage classes."""
    import os
    from bbdecoder.analyzer.trace import files
    from bbdecoder.analyzer.trace import format as fmt
    manifest = linear_manifest(names, shapes, steps, epochs)
    layers = manifest["layers"]
    os.makedirs(d)
    files.write_json_atomic(os.path.join(d, fmt.MANIFEST), manifest)
    keys = [(L["key"], q["key"]) for L in layers for q in L["params"]]
    attrs = [{"layer": L["name"], "layer_id": L["id"], "param": q["name"]} for L in layers for q in L["params"]]
    numel = np.array([q["numel"] for L in layers for q in L["params"]], np.float64)
    return manifest, keys, attrs, numel


def random_grad_stats(df, rng, nan_fraction: float = 0.0):
    """Random per-step gradient statistics into the rows of ``df`` (step, epoch, layer_id, layer, param),
    in place: numel, count (5% of rows without a finite element), nonfinite, and mean, abs_mean, max_abs,
    var, l1, l2 over 16 decades, a ``nan_fraction`` of each NaN. Returns ``df``."""
    n = len(df)
    df["numel"] = rng.integers(1, 100, n)
    df["count"] = np.where(rng.random(n) < 0.05, 0, df["numel"] - rng.integers(0, 2, n))
    df["nonfinite"] = df["numel"] - df["count"]
    for c in ("mean", "abs_mean", "max_abs", "var", "l1", "l2"):
        df[c] = rng.standard_normal(n) * 10.0 ** rng.uniform(-8, 8, n)
        if nan_fraction:
            df.loc[rng.random(n) < nan_fraction, c] = np.nan
    return df
