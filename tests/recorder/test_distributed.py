"""torch.distributed recording (issue 5, section 3): two gloo processes running DDP on CPU.

Each process trains a small MLP under DistributedDataParallel on its own data with a Recorder, and
saves what the hooks saw (raw activations of the ReLU and tanh, and the all-reduced gradients) as
.npy files; the test then checks the run directory, the per-rank shards, and the analyzer's
rank-merged statistics against numpy on the concatenation of both ranks' activations.
"""

from __future__ import annotations

import helpers

import json
import os
import textwrap

import h5py
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from bbdecoder import analyzer
from bbdecoder.analyzer.cli import cli

pytest.importorskip("torch")
import torch.distributed  # noqa: E402

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend", allow_module_level=True)

ROOT = helpers.ROOT
STEPS, BATCH, HIDDEN = 5, 8, 16

WORKER = textwrap.dedent(r"""
    import datetime, json, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    from bbdecoder.recorder import Recorder

    rank, out = int(os.environ["RANK"]), sys.argv[1]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)                       # same initial weights on both ranks

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, {HIDDEN})
            self.act = nn.ReLU()
            self.fc2 = nn.Linear({HIDDEN}, 3)

        def forward(self, x):
            return torch.tanh(self.fc2(self.act(self.fc1(x))))

    model = Net()
    ddp = DDP(model)
    g = torch.Generator().manual_seed(100 + rank)
    sign = 1.0 if rank == 0 else -1.0          # different data per rank: positive / negative inputs
    seen = {{"relu": [], "tanh": [], "grad": []}}
    model.act.register_forward_hook(lambda m, a, o: seen["relu"].append(o.detach().numpy().copy()))
    model.register_forward_hook(lambda m, a, o: seen["tanh"].append(o.detach().numpy().copy()))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)

    def train(rec, steps, tag):
        for s in range(steps):
            x = sign * torch.rand(({BATCH}, 6), generator=g) * 2
            y = torch.rand(({BATCH}, 3), generator=g)
            opt.zero_grad()
            loss = ((ddp(x) - y) ** 2).mean()
            loss.backward()
            seen["grad"].append(model.fc1.weight.grad.numpy().copy())
            rec.step(loss)
            opt.step()
        rec.close()
        for k in ("relu", "tanh", "grad"):
            np.save(os.path.join(out, f"{{k}}{{tag}}-{{rank}}.npy"), np.stack(seen[k]))
            seen[k].clear()

    rec = Recorder(ddp, sys.argv[2], activations=True, activations_every=2, activation_samples=3, flush_steps=2,
                   weights_every=2)
    names = [L.name for L in rec.layers]
    info = {{"rank": rec.rank, "world_size": rec.world_size, "names": names,
             "inner": rec.model is model}}
    train(rec, {STEPS}, "")
    # second run, given the bare model this time (DDP still trains it): activations on rank 1 only
    # (its sites go to its rank.json), gradients on every rank
    rec2 = Recorder(model, sys.argv[3], activations=True, activations_every=0, activation_ranks=[1],
                    record_rank=None, flush_steps=10)
    train(rec2, 2, "b")
    with open(os.path.join(out, f"info-{{rank}}.json"), "w") as f:
        json.dump(info, f)
    dist.barrier()
    dist.destroy_process_group()
""").format(HIDDEN=HIDDEN, BATCH=BATCH, STEPS=STEPS)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Run the 2-process DDP job once; returns (run dir, run dir 2, folder with the workers' .npy files)."""
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "worker.py"
    script.write_text(WORKER)
    out, run1, run2 = tmp / "out", tmp / "run", tmp / "run2"
    out.mkdir()
    helpers.run_gloo_workers(script, [out, run1, run2], tmp, what="DDP workers")
    return run1, run2, out


def _load(out, what):
    return [np.load(out / f"{what}-{r}.npy") for r in (0, 1)]


def test_one_run_dir_shards_per_rank(ddp_runs):
    run1, _, out = ddp_runs
    assert sorted(os.listdir(run1)) == ["manifest.json", "rank-00000", "rank-00001"]
    m = json.loads((run1 / "manifest.json").read_text())
    assert m["world_size"] == 2 and m["status"] == "complete"
    # DDP's "module." prefix is gone: the names are those of the bare model
    assert [L["name"] for L in m["layers"]] == ["fc1", "fc2"]
    for r in (0, 1):
        info = json.loads((out / f"info-{r}.json").read_text())
        assert info == {"rank": r, "world_size": 2, "names": ["fc1", "fc2"], "inner": True}
        rd = run1 / f"rank-{r:05d}"
        st = json.loads((rd / "rank.json").read_text())
        assert st["rank"] == r and st["status"] == "complete" and st["steps_flushed"] == STEPS
        shards = sorted(n for n in os.listdir(rd) if n.endswith(".h5"))
        assert shards == ["shard-000000.h5", "shard-000001.h5", "shard-000002.h5"]   # flush_steps=2, 5 steps
        steps, kinds = [], set()
        for n in shards:
            with h5py.File(rd / n, "r") as f:
                steps += f["steps/step"][()].tolist()
                kinds |= {k for k in ("grads", "weights", "act_stats") if (k in f and len(f[k])) or f"flat/{k}" in f}
        assert steps == list(range(STEPS))           # every rank has its step table
        # gradients and weights from rank 0 only (identical after the all-reduce); activations on both
        assert kinds == ({"grads", "weights", "act_stats"} if r == 0 else {"act_stats"})
    g0, g1 = _load(out, "grad")
    np.testing.assert_array_equal(g0, g1)            # what makes recording one rank enough


def test_merged_activation_stats_equal_numpy(ddp_runs):
    run1, _, out = ddp_runs
    run = analyzer.open(run1)
    assert run.status == "complete" and run.ranks == [0, 1]
    relu = np.concatenate(_load(out, "relu"), axis=1)          # (steps, 2 * batch, units)
    a = run.activation_stats(sites="act")
    assert "rank" not in a.columns and len(a) == STEPS * HIDDEN
    a = a.sort_values(["step", "unit"])
    want = {"count": np.full((STEPS, HIDDEN), 2 * BATCH), "mean": relu.mean(1), "std": relu.std(1),
            "min": relu.min(1), "max": relu.max(1), "abs_mean": np.abs(relu).mean(1),
            "frac_active": (relu > 0).mean(1)}
    for c, w in want.items():
        np.testing.assert_allclose(a[c].to_numpy().reshape(STEPS, HIDDEN), w, rtol=1e-5, atol=1e-6, err_msg=c)
    # per epoch (one epoch): every value of both ranks
    e = run.activation_stats(per="epoch", sites="act").sort_values("unit")
    flat = relu.reshape(-1, HIDDEN)
    np.testing.assert_allclose(e["mean"], flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e["std"], flat.std(0), rtol=1e-4, atol=1e-6)
    assert (e["count"] == STEPS * 2 * BATCH).all()
    # by_rank: each rank's own values
    b = run.activation_stats(sites="act", by_rank=True)
    assert list(b.columns[:2]) == ["rank", "step"]
    for r, x in enumerate(_load(out, "relu")):
        br = b[b["rank"] == r].sort_values(["step", "unit"])
        np.testing.assert_allclose(br["max"].to_numpy().reshape(STEPS, HIDDEN), x.max(1), rtol=1e-6)


def test_merged_dead_units_and_saturation(ddp_runs):
    run1, _, out = ddp_runs
    run = analyzer.open(run1)
    r0, r1 = _load(out, "relu")
    both = np.concatenate([r0, r1], axis=1)
    dead = run.dead_units(sites="act").sort_values("unit")
    np.testing.assert_array_equal(dead["dead"], both.max((0, 1)) <= 0)
    # the data makes the merge matter: some unit is dead on one rank only
    assert ((r0.max((0, 1)) <= 0) != (r1.max((0, 1)) <= 0)).any()
    np.testing.assert_allclose(dead["active_fraction"], (both > 0).mean((0, 1)), rtol=1e-12)
    # per-step judgement on both ranks' values
    st, mask = analyzer.activations.dead_mask(run, "act")
    np.testing.assert_array_equal(st, np.arange(STEPS))
    np.testing.assert_array_equal(mask, both.max(1) <= 0)
    dps = analyzer.activations.dead_per_step(run, sites="act")
    np.testing.assert_allclose(dps["dead_fraction"], (both.max(1) <= 0).mean(1))
    # ReLU saturation = fraction <= 0 over both ranks; tanh from the histograms (delta 0.1 = 10 bins)
    s = run.saturation(0.1, sites="act")
    assert "rank" not in s.columns
    np.testing.assert_allclose(s.sort_values("step")["saturated"], (both <= 0).mean((1, 2)), rtol=1e-12)
    tanh = np.concatenate(_load(out, "tanh"), axis=1)
    tsite = [n for n in run.sites["name"] if run.sites.set_index("name").loc[n, "kind"] == "tanh"]
    assert len(tsite) == 1
    t = run.saturation(0.1, sites=tsite[0]).sort_values("step")
    assert t["delta_used"].iloc[0] == pytest.approx(0.1)
    np.testing.assert_allclose(t["saturated"], (np.abs(tanh) > 0.9).mean((1, 2)), atol=1e-12)
    sb = run.saturation(0.1, sites="act", by_rank=True)
    assert sorted(set(sb["rank"])) == [0, 1]
    np.testing.assert_allclose(sb[sb["rank"] == 1].sort_values("step")["saturated"], (r1 <= 0).mean((1, 2)))


def test_grads_from_the_recording_rank(ddp_runs):
    run1, _, out = ddp_runs
    run = analyzer.open(run1)
    gs = run.grad_stats()
    assert "rank" not in gs.columns
    g = gs[(gs["layer"] == "fc1") & (gs["param"] == "weight")].sort_values("step")
    g0 = _load(out, "grad")[0]
    np.testing.assert_allclose(g["l2"], np.sqrt((g0.astype(np.float64) ** 2).sum((1, 2))), rtol=1e-6)
    rt = run.rank_table()
    assert rt[["rank", "status", "shards", "live", "steps"]].values.tolist() == \
        [[0, "complete", 3, 0, STEPS], [1, "complete", 3, 0, STEPS]]
    assert rt["grads"].tolist() == [True, False] and rt["activations"].tolist() == [True, True]


def test_info_lists_both_ranks(ddp_runs):
    run1 = ddp_runs[0]
    res = CliRunner().invoke(cli, ["info", str(run1)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert any(ln.startswith("ranks     0, 1 (world size 2)") for ln in lines)
    r0 = [ln for ln in lines if ln.strip().startswith("rank 0 ")]
    r1 = [ln for ln in lines if ln.strip().startswith("rank 1 ")]
    assert len(r0) == len(r1) == 1
    assert f"complete, 3 shard(s), {STEPS} step(s) (0..{STEPS - 1})" in r0[0] and "grads, weights, activations" in r0[0]
    assert f"complete, 3 shard(s), {STEPS} step(s)" in r1[0] and r1[0].endswith("records activations")
    js = json.loads(CliRunner().invoke(cli, ["info", str(run1), "--json"]).output)
    assert [(r["rank"], r["steps"], r["shards"]) for r in js["rank_table"]] == [(0, STEPS, 3), (1, STEPS, 3)]


def test_activation_ranks_and_record_rank_none(ddp_runs):
    _, run2, out = ddp_runs
    run = analyzer.open(run2)
    assert run.status == "complete" and run.problems == []
    rt = run.rank_table().set_index("rank")
    assert rt["activations"].tolist() == [False, True]      # activation_ranks=[1]
    assert rt["grads"].tolist() == [True, True]             # record_rank=None: every rank
    assert rt["steps"].tolist() == [2, 2]
    m = json.loads((run2 / "manifest.json").read_text())
    assert m["config"]["activation_ranks"] == [1] and m["config"]["record_rank"] is None
    # the bare model gives the same layer table as the DDP wrapper did in the first run
    m1 = json.loads((ddp_runs[0] / "manifest.json").read_text())
    assert m["layers"] == m1["layers"] and m["model"] == m1["model"]
    assert m["sites"] == []                                  # rank 0 saw no site: rank 1's rank.json has them
    st1 = json.loads((run2 / "rank-00001" / "rank.json").read_text())
    assert sorted(S["name"] for S in st1["sites"]) == sorted(run.sites["name"]) and "act" in list(run.sites["name"])
    relu = np.load(out / "relub-1.npy")
    a = run.activation_stats(sites="act").sort_values(["step", "unit"])
    np.testing.assert_allclose(a["mean"].to_numpy().reshape(2, HIDDEN), relu.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a["max"].to_numpy().reshape(2, HIDDEN), relu.max(1), rtol=1e-6)
    # identical all-reduced gradients on both ranks: per-rank rows agree
    gs = run.grad_stats()
    a, b = (gs[gs["rank"] == r].drop(columns="rank").reset_index(drop=True) for r in (0, 1))
    pd.testing.assert_frame_equal(a, b)


def test_activation_ranks_validation():
    import torch.nn as nn
    from bbdecoder.recorder.distributed import check_ranks
    assert check_ranks(None, 4) is None and check_ranks(0, 4) == [0] and check_ranks((2, 0), 4) == [0, 2]
    assert check_ranks([1], 2) == [1] and check_ranks([], 2) == []
    for bad in ([0, 4], [0, -1], [7], "0", [0.0], [True], 1.5):
        with pytest.raises(ValueError, match="activation_ranks"):
            check_ranks(bad, 4)
    from bbdecoder.recorder.distributed import unwrap_model
    m = nn.Linear(2, 2)
    assert unwrap_model(nn.DataParallel(m)) is m and unwrap_model(m) is m


def test_merge_streams_misaligned_blocks(monkeypatch):
    """Ranks whose shards split the steps differently (and a step one rank lacks) merge per step exactly
    as a direct numpy merge of all rows."""
    import bbdecoder.analyzer.activations.sites as A
    rng = np.random.default_rng(3)
    U = 4
    cuts = {0: [0, 3, 4, 9, 12], 1: [0, 1, 6, 7, 12], 2: [2, 5, 12]}
    missing = {1: {8}, 2: {0, 1}}
    data = {}
    for r, c in cuts.items():
        st = np.array([s for s in range(c[0], c[-1]) if s not in missing.get(r, set())], np.int64)
        d = {"count": rng.integers(1, 9, len(st)).astype(np.float64), "sum": rng.normal(size=(len(st), U)),
             "min": rng.normal(size=(len(st), U)), "max": rng.normal(size=(len(st), U)),
             "hist": rng.integers(0, 5, (len(st), U, 3)).astype(np.float64)}
        d["min"][0, 1] = np.nan if r == 1 else d["min"][0, 1]     # NaN propagates like on the device
        data[r] = (st, d)

    def fake_iter(run, site, stats, steps=None, rank=None):
        st, d = data[rank]
        for a, b in zip(cuts[rank][:-1], cuts[rank][1:]):
            m = (st >= a) & (st < b)
            if m.any():
                yield st[m], {k: v[m] for k, v in d.items()}, rank

    monkeypatch.setattr(A, "iter_site_stats", fake_iter)
    monkeypatch.setattr(A, "_site_ranks", lambda run, site, stat: [0, 1, 2])
    site = {"stats": {"count": [], "sum": [U], "min": [U], "max": [U], "hist": [U, 3]}}
    blocks = list(A.iter_merged_site_stats(None, site, stats=("count", "sum", "min", "max", "hist")))
    got_st = np.concatenate([b[0] for b in blocks])
    np.testing.assert_array_equal(got_st, np.arange(12))        # increasing, each step once
    for s in range(12):
        rows = [(d, np.flatnonzero(st == s)) for st, d in data.values()]
        rows = [(d, i[0]) for d, i in rows if len(i)]
        k = int(np.flatnonzero(got_st == s)[0])
        b = np.searchsorted(np.cumsum([len(x[0]) for x in blocks]), k, side="right")
        off = k - sum(len(x[0]) for x in blocks[:b])
        got = {n: v[off] for n, v in blocks[b][1].items()}
        for n in ("count", "sum", "hist"):
            np.testing.assert_allclose(got[n], sum(d[n][i] for d, i in rows), err_msg=f"{n} at {s}")
        np.testing.assert_array_equal(got["min"], np.min([d["min"][i] for d, i in rows], axis=0))
        np.testing.assert_array_equal(got["max"], np.max([d["max"][i] for d, i in rows], axis=0))


def test_rank_sites_conflict_and_malformed(ddp_runs, tmp_path, capsys):
    """A rank.json site whose key names another site in the manifest is reported and its values ignored;
    a malformed rank.json site table is a clear TraceError."""
    import shutil
    src = ddp_runs[0]
    d = tmp_path / "conflict"
    shutil.copytree(src, d)
    one = analyzer.open(src)
    site = one.sites.set_index("name").loc["act"]
    p = d / "rank-00001" / "rank.json"
    st = json.loads(p.read_text())
    meta = [S for S in json.loads((d / "manifest.json").read_text())["sites"] if S["name"] == "act"][0]
    st["sites"] = [dict(meta, name="other")]
    p.write_text(json.dumps(st))
    run = analyzer.open(d)
    assert any("'other'" in q and "ignored" in q for q in run.problems)
    r0 = _load(ddp_runs[2], "relu")[0]
    a = run.activation_stats(sites="act").sort_values(["step", "unit"])   # rank 0's values only
    assert site["key"] == meta["key"] and (a["count"] == BATCH).all()
    np.testing.assert_allclose(a["max"].to_numpy().reshape(STEPS, HIDDEN), r0.max(1), rtol=1e-6)
    st["sites"] = [dict(meta, units=-1)]
    p.write_text(json.dumps(st))
    with pytest.raises(analyzer.TraceError, match="rank-00001/rank.json: activation site #0 is malformed"):
        analyzer.open(d)
    from helpers import run_cli
    code, out, err = run_cli(["info", str(d)], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "rank-00001/rank.json: activation site #0 is malformed" in err and "Traceback" not in err


def test_prune_names_through_wrappers():
    """Pruning plans name parameters as the recorder does: a DataParallel/DDP wrapper is looked through."""
    import torch
    import torch.nn as nn
    from bbdecoder.recorder.prune import model_params
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    want = [["0.weight", [4, 3]], ["0.bias", [4]], ["2.weight", [2, 4]], ["2.bias", [2]]]
    assert model_params(m) == want and model_params(nn.DataParallel(m)) == want
    assert [n for n, _ in torch.nn.DataParallel(m).named_parameters()][0] == "module.0.weight"


def test_raw_samples_pool_ranks(ddp_runs):
    """Raw activation samples (first 3 of each rank's batch every 2 steps) are read from both ranks and
    the sample-based analyses pool them per step."""
    run1, _, out = ddp_runs
    run = analyzer.open(run1)
    r0, r1 = _load(out, "relu")
    st, x = analyzer.activations.samples(run, "act")
    for s in (0, 2, 4):
        want = np.concatenate([r0[s][:3], r1[s][:3]])
        np.testing.assert_allclose(x[st == s], want, rtol=1e-6)
    assert sorted(set(st.tolist())) == [0, 2, 4]
    dv = run.dimension_variance("act", dim=1)
    assert dv["samples"].tolist() == [6, 6, 6]
    want = [np.concatenate([r0[s][:3], r1[s][:3]]).astype(np.float64).var(axis=1).mean() for s in (0, 2, 4)]
    np.testing.assert_allclose(dv["variance"], want, rtol=1e-5)
