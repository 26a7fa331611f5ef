"""Sharded training (issue 14): FSDP2 (``fully_shard``) on two gloo processes against the same model
trained unsharded in one process on the same global batches.

Every rank records its own slice of every parameter and gradient; the analyzer merges the slices.
The per-step gradient and weight statistics, the gradient noise, the weight histograms and the
reassembled raw tensors must equal those of the unsharded run. The model's dim-0 sizes are odd
(uneven shards: 5 rows -> 3 + 2) and one parameter has a single row (rank 1's slice is empty).
FSDP1 (``FullyShardedDataParallel``) is refused with one RecorderWarning and records what it can.
"""

from __future__ import annotations

import helpers

import json
import os
import textwrap

import numpy as np
import pytest

from bbdecoder import analyzer

pytest.importorskip("torch")
import torch.distributed  # noqa: E402

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend", allow_module_level=True)

STEPS, BATCH = 6, 8          # BATCH: the global batch; each rank trains on half of it

WORKER = textwrap.dedent(r"""
    import datetime, json, os, sys, warnings
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from bbdecoder.recorder import Recorder, RecorderWarning

    rank, out = int(os.environ["RANK"]), sys.argv[1]
    runs = {{k: os.path.join(out, k) for k in ("ref", "fsdp2", "fsdp1")}}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 5)       # 5 rows: slices of 3 and 2
            self.act = nn.ReLU()
            self.fc2 = nn.Linear(5, 3)       # 3 rows: 2 and 1
            self.head = nn.Linear(3, 1)      # 1 row: rank 1's slice is empty

        def forward(self, x):
            return self.head(torch.tanh(self.fc2(self.act(self.fc1(x)))))

    def batches():
        g = torch.Generator().manual_seed(7)
        return [(torch.randn(({BATCH}, 6), generator=g), torch.randn(({BATCH}, 1), generator=g))
                for _ in range({STEPS})]

    OPTS = dict(grads_every=2, weights_every=2, grad_stats_every=lambda s: s != 2, flush_steps=2)

    def train(model, run, part=slice(None), **kw):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = Recorder(model, run, **OPTS, **kw)
        for s, (x, y) in enumerate(batches()):
            opt.zero_grad()
            loss = ((model(x[part]) - y[part]) ** 2).mean()
            loss.backward()
            rec.step(loss)
            opt.step()
            if s == 2:
                rec.epoch_end()
        rec.close()
        return rec

    torch.manual_seed(0)
    model = Net()
    if rank == 0:   # the reference: unsharded, one process, the global batches (before the process group)
        ref = Net()
        ref.load_state_dict(model.state_dict())
        train(ref, runs["ref"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    fully_shard(model.fc1)
    fully_shard(model.fc2)
    fully_shard(model)
    half = {BATCH} // 2
    with warnings.catch_warnings(record=True) as w2:
        warnings.simplefilter("always")
        rec = train(model, runs["fsdp2"], slice(rank * half, (rank + 1) * half))   # record_rank=0: ignored
    info = {{"fsdp2_warnings": [str(x.message) for x in w2 if issubclass(x.category, RecorderWarning)],
             "fsdp2_types": [L.type for L in rec.layers]}}

    torch.manual_seed(0)
    m1 = Net()
    f1 = FullyShardedDataParallel(m1, use_orig_params=True, device_id=torch.device("cpu"))
    with warnings.catch_warnings(record=True) as w1:
        warnings.simplefilter("always")
        rec1 = train(f1, runs["fsdp1"], slice(rank * half, (rank + 1) * half), activations=True)
    info["fsdp1_warnings"] = [str(x.message) for x in w1 if issubclass(x.category, RecorderWarning)]
    info["fsdp1_other_warnings"] = [str(x.message) for x in w1 if "bbdecoder" in str(x.message)
                                    and not issubclass(x.category, RecorderWarning)]
    info["fsdp1_names"] = [L.name for L in rec1.layers]
    with open(os.path.join(out, f"info-{{rank}}.json"), "w") as f:
        json.dump(info, f)
    dist.barrier()
    dist.destroy_process_group()
""").format(STEPS=STEPS, BATCH=BATCH)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """Run the 2-process job once; returns the folder holding runs ref, fsdp2, fsdp1 and info-<rank>.json."""
    tmp = tmp_path_factory.mktemp("fsdp")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    helpers.run_gloo_workers(script, [tmp], tmp, what="FSDP workers")
    return tmp


def _open(d, name):
    run = analyzer.open(d / name)
    assert run.status == "complete", run.status_reason
    return run


def _close(a, b, rtol, err, atol=1e-12):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol,
                               err_msg=err)


def test_fsdp2_layers_and_ranks(fsdp_runs):
    ref, run = _open(fsdp_runs, "ref"), _open(fsdp_runs, "fsdp2")
    assert run.ranks == [0, 1] and run.problems == []
    # names, types and full shapes as in the unsharded run: no wrapper prefix, no FSDP<Name> class
    strip = [[{k: v for k, v in q.items() if k != "shard_dim"} for q in L["params"]] for L in run.catalog.layers]
    assert [(L["name"], L["type"], L["class"]) for L in run.catalog.layers] == \
        [(L["name"], L["type"], L["class"]) for L in ref.catalog.layers] == \
        [("fc1", "Linear", "torch.nn.modules.linear.Linear"), ("fc2", "Linear", "torch.nn.modules.linear.Linear"),
         ("head", "Linear", "torch.nn.modules.linear.Linear")]
    assert strip == [L["params"] for L in ref.catalog.layers]
    assert all(q["shard_dim"] == 0 for L in run.catalog.layers for q in L["params"])
    assert run.manifest["model"] == ref.manifest["model"]
    for r in (0, 1):
        info = json.loads((fsdp_runs / f"info-{r}.json").read_text())
        assert info["fsdp2_warnings"] == [] and info["fsdp2_types"] == ["Linear", "Linear", "Linear"]
    # every rank records gradients and weights (record_rank=0 notwithstanding), each its own slice
    rt = run.rank_table()
    assert rt["grads"].tolist() == [True, True] and rt["weights"].tolist() == [True, True]
    sh = {(s.rank, k): (v[1], s.offsets[k]) for s in run.catalog.shards for k, v in s.payloads.items()
          if k[0] == "weights" and s.index == 0}
    lk = {L["name"]: L["key"] for L in run.catalog.layers}
    assert sh[(0, ("weights", lk["fc1"], "weight"))] == ((3, 6), 0)
    assert sh[(1, ("weights", lk["fc1"], "weight"))] == ((2, 6), 3)
    assert sh[(1, ("weights", lk["fc2"], "bias"))] == ((1,), 2)
    assert (1, ("weights", lk["head"], "weight")) not in sh      # an empty slice stores nothing


def test_fsdp2_grad_stats_equal_unsharded(fsdp_runs):
    ref, run = _open(fsdp_runs, "ref"), _open(fsdp_runs, "fsdp2")
    a, b = ref.grad_stats(), run.grad_stats()
    assert "rank" not in b.columns and list(a.columns) == list(b.columns)
    assert len(a) == len(b) == STEPS * 6
    for c in ("step", "epoch", "layer_id", "layer", "param", "numel", "count", "nonfinite"):
        assert a[c].tolist() == b[c].tolist(), c
    for c in ("l1", "l2", "mean", "var", "max_abs", "abs_mean"):
        _close(b[c], a[c], 1e-5, c, atol=1e-9)
    # step 2 comes from the raw gradients (no grad_stats row at that step), the others from grad_stats
    assert (b["step"] == 2).sum() == 6
    # independent check of the reference's numbers: numpy on its raw gradients
    g = ref.raw_tensor("grads", "fc1", "weight", 4).astype(np.float64)
    row = a[(a["step"] == 4) & (a["layer"] == "fc1") & (a["param"] == "weight")].iloc[0]
    assert row["l2"] == pytest.approx(np.sqrt((g ** 2).sum()), rel=1e-6)
    assert row["var"] == pytest.approx(g.var(), rel=1e-5)
    # per epoch, incl. the element-wise gradient noise from the raw steps, and pooled per layer
    ea, eb = ref.grad_stats(per="epoch"), run.grad_stats(per="epoch")
    assert len(ea) == len(eb) == 2 * 6 and eb["grad_noise"].notna().all()
    for c in ("mean", "var", "l1", "l2", "l2_var", "grad_noise", "max_abs"):
        _close(eb[c], ea[c], 1e-5, c, atol=1e-12)
    la, lb = ref.grad_stats(by="layer"), run.grad_stats(by="layer")
    for c in ("count", "l1", "l2", "var"):
        _close(lb[c], la[c], 1e-5, c, atol=1e-9)


def test_fsdp2_merge_identical_on_packed_and_per_parameter_layouts(fsdp_runs, tmp_path):
    """The merged slices give the same tables whether the ranks' gradient statistics are stored packed
    (the default) or per parameter (older traces; the shards rewritten by helpers.unpack_grad_stats),
    and the same reassembled raw tensors whether the snapshots are flat (the default) or per tensor
    (helpers.unflatten_snapshots)."""
    import pandas as pd
    old = helpers.copy_run(fsdp_runs / "fsdp2", tmp_path)
    assert helpers.unpack_grad_stats(old) >= 2                 # both ranks' shards held packed groups
    assert helpers.unflatten_snapshots(old) >= 4               # grads and weights of both ranks, flat
    a, b = _open(fsdp_runs, "fsdp2"), _open(old.parent, "copy")
    for kw in ({}, {"per": "epoch"}, {"by": "layer"}):
        pd.testing.assert_frame_equal(a.grad_stats(**kw), b.grad_stats(**kw), rtol=1e-12)
    pd.testing.assert_frame_equal(a.weight_stats(), b.weight_stats(), rtol=0, atol=0)
    assert a.recorded() == b.recorded()
    for kind in ("grads", "weights"):
        for layer, param in (("fc1", "weight"), ("fc2", "bias"), ("head", "weight")):
            for step in (0, 2, 4):
                x, y = a.raw_tensor(kind, layer, param, step), b.raw_tensor(kind, layer, param, step)
                assert x.dtype == y.dtype and np.array_equal(x, y)


def test_fsdp2_weight_stats_and_histograms_equal_unsharded(fsdp_runs):
    ref, run = _open(fsdp_runs, "ref"), _open(fsdp_runs, "fsdp2")
    a, b = ref.weight_stats(), run.weight_stats()
    assert "rank" not in b.columns and len(a) == len(b) == 3 * 6
    assert a["step"].tolist() == b["step"].tolist() == sorted([0, 2, 4] * 6)
    for c in ("numel", "nonfinite"):
        assert a[c].tolist() == b[c].tolist()
    for c in ("mean", "std", "abs_mean", "max_abs", "min", "max", "l2", "update_ratio"):
        _close(b[c], a[c], 1e-5, c, atol=1e-9)
    assert b["update_ratio"].isna().sum() == 6 and b["update_ratio"].notna().sum() == 12
    ha, hb = ref.weight_histograms("fc1", bins=16), run.weight_histograms("fc1", bins=16)
    np.testing.assert_array_equal(hb.steps, [0, 2, 4])
    np.testing.assert_allclose(hb.edges, ha.edges, rtol=1e-6)
    np.testing.assert_array_equal(hb.counts, ha.counts)
    assert (hb.counts.sum(1) == 30).all()


def test_fsdp2_raw_tensors_reassembled(fsdp_runs):
    ref, run = _open(fsdp_runs, "ref"), _open(fsdp_runs, "fsdp2")
    for kind in ("grads", "weights"):
        for layer, param, shape in (("fc1", "weight", (5, 6)), ("fc1", "bias", (5,)), ("fc2", "weight", (3, 5)),
                                    ("head", "weight", (1, 3)), ("head", "bias", (1,))):
            for step in (0, 2, 4):
                want = ref.raw_tensor(kind, layer, param, step)
                got = run.raw_tensor(kind, layer, param, step)
                assert got.shape == want.shape == shape
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=f"{kind} {layer}.{param} {step}")
    with pytest.raises(analyzer.TraceError, match="no grads of fc1.weight at step 1"):
        run.raw_tensor("grads", "fc1", "weight", 1)


def test_fsdp2_missing_slice_and_bad_offset(fsdp_runs, tmp_path):
    """A step whose slice is missing is left out (never shown as part of the tensor); a slice whose
    offset does not fit the manifest is a clear TraceError."""
    import shutil
    import h5py
    d = tmp_path / "cut"
    shutil.copytree(fsdp_runs / "fsdp2", d)
    os.remove(d / "rank-00001" / "shard-000002.h5")           # rank 1's steps 4 and 5
    run = analyzer.open(d)
    gs, ws = run.grad_stats(), run.weight_stats()
    for layer in ("fc1", "fc2"):
        assert sorted(set(gs[gs["layer"] == layer]["step"])) == [0, 1, 2, 3]
        assert sorted(set(ws[ws["layer"] == layer]["step"])) == [0, 2]
    # the head's slice on rank 1 is empty: rank 0's slice is the whole of it, at every step
    assert sorted(set(gs[gs["layer"] == "head"]["step"])) == list(range(STEPS))
    ref = _open(fsdp_runs, "ref").grad_stats()
    _close(gs[gs["layer"] == "head"]["l2"], ref[ref["layer"] == "head"]["l2"], 1e-5, "head l2")
    with pytest.raises(analyzer.TraceError, match="incomplete"):
        run.raw_tensor("weights", "fc1", "weight", 4)
    d2 = tmp_path / "bad"
    shutil.copytree(fsdp_runs / "fsdp2", d2)
    lk = analyzer.open(d2).layer("fc1")["key"]
    with h5py.File(d2 / "rank-00001" / "shard-000000.h5", "r+") as f:
        helpers.set_payload_attr(f, "weights", lk, "weight", "offset", 4)      # rows 4..5 of a 5-row tensor
    with pytest.raises(analyzer.TraceError, match="at offset 4"):
        analyzer.open(d2)


def test_fsdp1_refused_with_one_warning(fsdp_runs):
    run = _open(fsdp_runs, "fsdp1")
    for r in (0, 1):
        info = json.loads((fsdp_runs / f"info-{r}.json").read_text())
        assert len(info["fsdp1_warnings"]) == 1, info
        assert "FSDP1" in info["fsdp1_warnings"][0] and "fully_shard" in info["fsdp1_warnings"][0]
        assert info["fsdp1_names"] == ["fc1", "fc2", "head"]     # no _fsdp_wrapped_module prefix
    rt = run.rank_table()
    assert rt["grads"].tolist() == [False, False] and rt["weights"].tolist() == [False, False]
    assert rt["activations"].tolist() == [True, True] and rt["steps"].tolist() == [STEPS, STEPS]
    assert len(run.grad_stats()) == 0
    # what it could record, it did: the losses (rank 0's half batch, as under FSDP2: same data, same init)
    np.testing.assert_allclose(run.steps["loss"], _open(fsdp_runs, "fsdp2").steps["loss"], rtol=1e-5)
