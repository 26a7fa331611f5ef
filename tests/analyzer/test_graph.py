"""Function graph (recorder/graph.py, analyzer/graph.py, `bbdecoder graph`) against hand counts and torch."""

import helpers
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bbdecoder import analyzer
from helpers import run_cli
from bbdecoder.analyzer.graph import read_graph
from bbdecoder.analyzer.report.plots.graph import layered_layout
from bbdecoder.recorder import Recorder
from bbdecoder.recorder.graph import record_graph

ROOT = helpers.ROOT


class Block(nn.Module):
    """conv -> bn -> functional gelu, plus a residual add."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.gelu(self.bn(self.conv(x))) + x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block(4)
        self.fc = nn.Linear(4, 5)
        self.big = nn.Linear(5, 5)
        self.small = nn.Linear(5, 5)

    def forward(self, x):
        pos = x.sum() > 0        # data-dependent: only one branch runs
        x = torch.relu(self.stem(x))
        x = self.block(x)
        y = self.fc(x.mean((2, 3)))
        if pos:
            y = self.big(y)
        else:
            y = self.small(y)
        return y.softmax(-1)


def _ops(g):
    return [(n["op"], n["module"]) for n in g["nodes"]]


@pytest.fixture(scope="module")
def net_graph():
    torch.manual_seed(0)
    m = Net()
    x = torch.randn(2, 3, 8, 8).abs()   # the positive branch
    return m, x, record_graph(m, x, time_repeats=1)


def test_nodes_edges_shapes_and_kinds(net_graph):
    m, x, g = net_graph
    assert _ops(g) == [("input", ""), ("sum", ""), ("gt", ""), ("conv2d", "stem"), ("relu", ""),
                       ("conv2d", "block.conv"), ("add_", "block.bn"), ("batch_norm", "block.bn"), ("gelu", "block"),
                       ("add", "block"), ("mean", ""), ("linear", "fc"), ("linear", "big"), ("softmax", "")]
    n = g["nodes"]
    assert n[4]["kind"] == "relu" and n[8]["kind"] == "gelu" and n[13]["kind"] == "softmax"
    assert n[3]["kind"] is None and n[11]["kind"] is None
    assert n[3]["inputs"] == [[2, 3, 8, 8], [4, 3, 3, 3], [4]] and n[3]["outputs"] == [[2, 4, 8, 8]]
    assert n[3]["params"] == ["stem.weight", "stem.bias"] and n[3]["output_dtypes"] == ["float32"]
    assert n[11]["outputs"] == [[2, 5]] and n[11]["params"] == ["fc.weight", "fc.bias"]
    edges = {(e["src"], e["dst"], e["arg"]) for e in g["edges"]}
    # residual: add takes gelu's output (arg 0) and the relu output that also fed the conv (arg 1)
    assert (8, 9, 0) in edges and (4, 9, 1) in edges and (4, 5, 0) in edges
    assert (0, 1, 0) in edges and (0, 3, 0) in edges and (11, 12, 0) in edges and (12, 13, 0) in edges
    assert g["outputs"] == [13]
    # only what ran: "small" never appears, neither as a node nor as a module
    assert not any(nd["module"] == "small" for nd in g["nodes"])
    assert "small" not in {r["name"] for r in g["modules"]} and "big" in {r["name"] for r in g["modules"]}
    assert all(r["time_s"] is not None and r["time_s"] > 0 for r in g["modules"])


def test_other_branch_recorded_when_it_runs():
    torch.manual_seed(0)
    m = Net()
    g = record_graph(m, -torch.randn(2, 3, 8, 8).abs() - 10, time_repeats=0)
    names = {r["name"] for r in g["modules"]}
    assert "small" in names and "big" not in names
    assert all(r["time_s"] is None for r in g["modules"])


def test_flops_hand_formula_and_flop_counter(net_graph):
    m, x, g = net_graph
    N, H, W = 2, 8, 8
    by = {nd["module"]: nd["flops"] for nd in g["nodes"] if nd["op"] in ("conv2d", "linear")}
    assert by["stem"] == 2 * N * 3 * 4 * 3 * 3 * H * W
    assert by["block.conv"] == 2 * N * 4 * 4 * 3 * 3 * H * W
    assert by["fc"] == 2 * N * 4 * 5 and by["big"] == 2 * N * 5 * 5
    with FlopCounterMode(display=False) as fc:
        m(x)
    assert g["total_flops"] == fc.get_total_flops() == sum(nd["flops"] for nd in g["nodes"])
    counts = fc.get_flop_counts()
    mods = {r["name"]: r["flops"] for r in g["modules"]}
    for name in ("stem", "block", "block.conv", "fc", "big"):
        assert mods[name] == sum(counts[f"Net.{name}"].values()), name
    assert mods[""] == fc.get_total_flops()


def test_state_restored_and_no_grad_side_effects():
    torch.manual_seed(0)
    m = Net().train()
    bn = m.block.bn
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    x = torch.randn(2, 3, 8, 8)
    rng = torch.get_rng_state()
    record_graph(m, x, time_repeats=2)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in m.parameters())


def _train(run, graph, steps=2):
    torch.manual_seed(1)
    m = Net()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    data = [torch.randn(4, 3, 8, 8) for _ in range(steps)]
    with Recorder(m, run, graph=graph, activations=True, weights_every=1) as rec:
        for x in data:
            loss = m(x).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            rec.step(loss)
            opt.step()
    return m


def test_recorder_graph_on_first_forward_does_not_change_training(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ma, mb = _train(a, graph=True), _train(b, graph=False)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb)
    ra, rb = analyzer.open(a), analyzer.open(b)
    sa, sb = ra.activation_stats(), rb.activation_stats()
    assert len(sa) == len(sb) and np.array_equal(sa["count"].to_numpy(), sb["count"].to_numpy())
    np.testing.assert_allclose(sa["mean"].to_numpy(), sb["mean"].to_numpy(), rtol=1e-6)
    nodes, edges = ra.graph()
    assert list(nodes["op"])[:6] == ["input", "sum", "gt", "conv2d", "relu", "conv2d"]
    assert nodes.loc[nodes["op"] == "gelu", "kind"].tolist() == ["gelu"]
    assert nodes["flops"].sum() == read_graph(a)["total_flops"] > 0
    assert len(edges) == len(read_graph(a)["edges"])
    mods = ra.graph_modules()
    assert mods.loc[mods["name"] == "stem", "flops"].item() == 2 * 4 * 3 * 4 * 9 * 64
    with pytest.raises(analyzer.TraceError, match="no function graph"):
        rb.graph()


def test_layered_layout_levels(net_graph):
    _, _, g = net_graph
    x, y = layered_layout(g)
    level = -y
    for e in g["edges"]:
        assert level[e["dst"]] >= level[e["src"]] + 1
    assert level[9] == level[8] + 1 and level[0] == 0


@pytest.fixture(scope="module")
def graph_run(tmp_path_factory):
    torch.manual_seed(0)
    m = Net()
    run = str(tmp_path_factory.mktemp("g") / "run")
    with Recorder(m, run, grads_every=0, weights_every=0) as rec:
        rec.record_graph(torch.randn(2, 3, 8, 8))
    return run


def test_cli_graph_outputs(graph_run, tmp_path, capsys):
    out = str(tmp_path / "out")
    code, o, err = run_cli(["graph", graph_run, "--out", out, "--engine", "matplotlib"], capsys)
    assert code == 0, err
    names = set(os.listdir(out))
    assert {"graph.dot", "graph.png", "ops.csv", "edges.csv", "modules.csv", "module_flops.png",
            "module_time.png"} <= names
    import pandas as pd
    ops = pd.read_csv(os.path.join(out, "ops.csv"))
    g = read_graph(graph_run)
    assert list(ops["op"]) == [n["op"] for n in g["nodes"]] and int(ops["flops"].sum()) == g["total_flops"]
    dot = open(os.path.join(out, "graph.dot")).read()
    assert dot.count("->") == len(g["edges"]) and "gelu" in dot
    assert f"{g['total_flops']:,} FLOPs" in o
    # a non-empty --out is refused without --force, accepted with it
    code, o, err = run_cli(["graph", graph_run, "--out", out], capsys)
    assert code == 2 and err.count("\n") == 1 and "--force" in err
    code, o, err = run_cli(["graph", graph_run, "--out", out, "--force", "--engine", "matplotlib"], capsys)
    assert code == 0, err


def test_cli_graph_bad_input(graph_run, tmp_path, capsys):
    code, _, err = run_cli(["graph", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o1")
    bad = tmp_path / "bad"
    os.makedirs(bad)
    for n in os.listdir(graph_run):
        if n in ("manifest.json",):
            with open(os.path.join(graph_run, n)) as f, open(bad / n, "w") as g:
                g.write(f.read())
    code, _, err = run_cli(["graph", str(bad), "--out", str(tmp_path / "o2")], capsys)
    assert code == 2 and "no function graph" in err and err.count("\n") == 1
    g = json.load(open(os.path.join(graph_run, "graph.json")))
    g["edges"].append({"src": 5, "dst": 2, "arg": 0, "shape": []})
    json.dump(g, open(bad / "graph.json", "w"))
    code, _, err = run_cli(["graph", str(bad), "--out", str(tmp_path / "o3")], capsys)
    assert code == 2 and "malformed edge" in err and err.count("\n") == 1
    g["edges"].pop()
    g["format_version"] = 99
    json.dump(g, open(bad / "graph.json", "w"))
    code, _, err = run_cli(["graph", str(bad), "--out", str(tmp_path / "o4")], capsys)
    assert code == 2 and "not supported" in err


def test_graph_analyzer_without_torch(graph_run, tmp_path):
    code = f"""
import sys
sys.modules["torch"] = None
sys.path.insert(0, {ROOT!r})
from bbdecoder import analyzer
from bbdecoder.analyzer.report.graph_files import render
r = analyzer.open({graph_run!r})
n, e = r.graph()
files = render({graph_run!r}, {str(tmp_path / 'nt')!r}, engine="matplotlib")
import bbdecoder.analyzer.features, bbdecoder.analyzer.cli.graph
leaked = [m for m in sys.modules if (m == "torch" or m.startswith("torch.")) and sys.modules[m] is not None]
print("RESULT", len(n), len(e), files["engine"], leaked)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    g = read_graph(graph_run)
    assert f"RESULT {len(g['nodes'])} {len(g['edges'])} matplotlib []" in r.stdout
