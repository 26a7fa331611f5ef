"""Tied and shared parameters (issue 15, item 4): GPT-2's ``transformer.wte.weight`` / ``lm_head.weight``
and a module at two places are recorded once, listed with every name that shares them, and counted once
(the catalogue's total equals ``sum(p.numel() for p in model.parameters())``, which counts unique)."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import transformer_models as tm
from helpers import manifest_edit, run_cli
from bbdecoder import analyzer
from bbdecoder.analyzer.catalog import Catalog, param_aliases, shared_names, unique_params
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.format import TraceError
from bbdecoder.recorder import Recorder
from bbdecoder.recorder.layers import layer_table, table_lines

STEPS = 3


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A recorded HF GPT-2 (tied wte / lm_head) with every gradient and weight, and the torch gradients."""
    model = tm.hf_gpt2()
    d = str(tmp_path_factory.mktemp("tied") / "gpt2")
    x, _ = tm.tokens(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads, weights = {}, {}
    with Recorder(model, d, grads_every=1, weights_every=1) as rec:
        for s in range(STEPS):
            out = model(input_ids=x, labels=x)
            opt.zero_grad()
            out.loss.backward()
            grads[s] = model.lm_head.weight.grad.detach().clone().numpy()
            weights[s] = model.transformer.wte.weight.detach().clone().numpy()
            rec.step(out.loss)
            opt.step()
    return {"run": d, "model": model, "grads": grads, "weights": weights}


def _double_count(model):
    """Parameter elements counted once per module that holds them (what the layer table summed before)."""
    return sum(p.numel() for m in model.modules() for p in m.parameters(recurse=False))


def test_tied_weight_is_one_parameter_in_the_manifest(gpt2):
    model = gpt2["model"]
    assert model.lm_head.weight is model.transformer.wte.weight        # the fixture really ties them
    unique = sum(p.numel() for p in model.parameters())
    assert _double_count(model) == unique + 128 * 32                   # the double count the issue saw
    m = json.load(open(f"{gpt2['run']}/manifest.json"))
    by = {L["name"]: L for L in m["layers"]}
    head, = by["lm_head"]["params"]
    wte, = by["transformer.wte"]["params"]
    assert head["tied_to"] == "transformer.wte.weight" and "aliases" not in head
    assert wte["aliases"] == ["lm_head.weight"] and "tied_to" not in wte
    assert by["lm_head"]["n_params"] == 0 and by["transformer.wte"]["n_params"] == 128 * 32
    assert sum(L["n_params"] for L in m["layers"]) == unique == m["model"]["n_params"]
    # no other parameter of GPT-2 is shared
    assert [L["name"] for L in m["layers"] for q in L["params"] if "tied_to" in q or "aliases" in q] == \
        ["transformer.wte", "lm_head"]


def test_tied_weight_is_recorded_once_and_read_under_every_name(gpt2):
    run = analyzer.open(gpt2["run"])
    cat = run.catalog
    head = cat.layer("lm_head")["key"]
    held = {(k, lk) for s in cat.shards for (k, lk, _) in s.payloads}
    assert not any(lk == head for _, lk in held)                      # nothing stored under lm_head
    wte = cat.layer("transformer.wte")["key"]
    assert {(fmt.KIND_GRADS, wte), (fmt.KIND_WEIGHTS, wte)} <= held
    # the one gradient is the sum over both uses: torch's .grad of the shared parameter
    for s in range(STEPS):
        np.testing.assert_array_equal(run.raw_tensor("grads", "transformer.wte", "weight", s), gpt2["grads"][s])
        np.testing.assert_array_equal(run.raw_tensor("weights", "transformer.wte", "weight", s), gpt2["weights"][s])
        np.testing.assert_array_equal(run.raw_tensor("grads", "lm_head", "weight", s), gpt2["grads"][s])
    # statistics asked for under either name are the owner's, one row per step
    g = run.grad_stats(layers="lm_head")
    assert g["layer"].tolist() == ["transformer.wte"] * STEPS
    want = [float(np.sqrt((gpt2["grads"][s].astype(np.float64) ** 2).sum())) for s in range(STEPS)]
    assert g.sort_values("step")["l2"].to_numpy() == pytest.approx(want, rel=1e-6)
    allg = run.grad_stats()
    assert len(allg) == STEPS * sum(1 for p in gpt2["model"].parameters())   # each unique parameter once
    # totals and names
    assert unique_params(cat) == sum(p.numel() for p in gpt2["model"].parameters())
    assert param_aliases(cat, head, cat.layer("lm_head")["params"][0]["key"]) == \
        ["transformer.wte.weight", "lm_head.weight"]
    assert shared_names(cat) == [{"kind": "param", "name": "transformer.wte.weight", "aliases": ["lm_head.weight"],
                                  "numel": 128 * 32}]
    lay = run.layers.set_index("name")
    assert lay.loc["lm_head", "aliases"] == "weight = transformer.wte.weight"
    assert lay.loc["transformer.wte", "aliases"] == "weight also lm_head.weight"
    assert int(lay["n_params"].sum()) == unique_params(cat)


def test_info_shows_the_shared_parameter_and_the_unique_total(gpt2, capsys):
    unique = sum(p.numel() for p in gpt2["model"].parameters())
    code, out, err = run_cli(["info", gpt2["run"]], capsys)
    assert code == 0, err
    assert f"layers    16, {unique:,} parameter(s)" in out
    assert "shared    transformer.wte.weight = lm_head.weight (4,096 parameters, recorded and counted once)" in out
    code, out, _ = run_cli(["info", "--json", gpt2["run"]], capsys)
    d = json.loads(out)
    assert d["params"] == unique and d["shared"][0]["aliases"] == ["lm_head.weight"]


def test_report_names_the_shared_parameter_under_both_layers(gpt2, tmp_path):
    """The report's layer table says why lm_head has 0 parameters of its own (summary.json's "shared", and
    under the layer's name in index.html, escaped)."""
    from bbdecoder.analyzer.report import build_report
    out = tmp_path / "rep"
    out.mkdir()
    build_report(analyzer.open(gpt2["run"]), out, jobs=1)
    s = json.loads((out / "summary.json").read_text())
    ids = {L["name"]: L["id"] for L in s["layers"]}
    assert s["shared"] == {str(ids["transformer.wte"]): "weight also lm_head.weight",
                           str(ids["lm_head"]): "weight = transformer.wte.weight"}
    assert [L["n_params"] for L in s["layers"] if L["name"] == "lm_head"] == [0]
    page = (out / "index.html").read_text()
    assert '<code>lm_head</code><br><span class="note">weight = transformer.wte.weight</span>' in page


class Shared(nn.Module):
    """One Linear at two places (``a`` and ``b``), a second Linear whose weight is the first's."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.c = nn.Linear(4, 4, bias=False)
        self.c.weight = self.a.weight

    def forward(self, x):
        return self.c(self.b(torch.relu(self.a(x))))


def test_a_module_at_two_places_and_a_weight_in_two_modules(tmp_path):
    torch.manual_seed(0)
    model = Shared()
    _, table = layer_table(model)
    assert [(L["name"], L.get("aliases"), L["n_params"]) for L in table] == [("a", ["b"], 20), ("c", None, 0)]
    w, bias = table[0]["params"]
    assert w["aliases"] == ["b.weight", "c.weight"] and bias["aliases"] == ["b.bias"]
    assert table[1]["params"][0]["tied_to"] == "a.weight"
    for L in table:
        L["selected"] = True
    assert table_lines(table)[2].split()[:4] == ["1", "c", "(weight", "="]   # "c (weight = a.weight) Linear 0"
    assert "c (weight = a.weight)" in table_lines(table)[2] and table_lines(table)[2].split()[-2] == "0"
    d = tmp_path / "run"
    x = torch.randn(8, 4)
    with Recorder(model, d, grads_every=1, layers="c") as rec:   # selecting only the module that borrows it
        model(x).pow(2).sum().backward()
        g = model.a.weight.grad.clone().numpy()
        rec.step()
    run = analyzer.open(d)
    assert sum(L["n_params"] for L in run.catalog.layers) == sum(p.numel() for p in model.parameters()) == 20
    np.testing.assert_array_equal(run.raw_tensor("grads", "a", "weight", 0), g)   # recorded under its owner
    assert {(lk, pk) for s in run.catalog.shards for (k, lk, pk) in s.payloads if k == fmt.KIND_GRADS} == \
        {(run.catalog.layer("a")["key"], w["key"])}                                 # once, not the bias
    assert shared_names(run.catalog)[0] == {"kind": "module", "name": "a", "aliases": ["b"], "numel": 0}


@pytest.mark.parametrize("edit,msg", [
    (lambda m: m["layers"][0]["params"][0].update(aliases="lm_head.weight"), "malformed aliases or tied_to"),
    (lambda m: m["layers"][-1]["params"][0].update(tied_to=["x"]), "malformed aliases or tied_to"),
    (lambda m: m["layers"][0].update(aliases=[1]), "malformed aliases or an unknown weight_layout"),
    (lambda m: m["layers"][3].update(weight_layout="sideways"), "malformed aliases or an unknown weight_layout"),
])
def test_malformed_sharing_fields_are_refused(gpt2, tmp_path, edit, msg):
    d = manifest_edit(edit)(gpt2["run"], tmp_path)
    with pytest.raises(TraceError, match=msg):
        Catalog(d)
