"""Pruning a GPT-2 block whose weights are stored in x out (HF ``Conv1D``, y = x @ W + b; issue 15, item 5):
the plan's units are columns of ``c_fc`` and rows of ``c_proj`` (checked against a hand computation from
the activations and weights torch saw), the residual stream and attention's q/k/v are refused with their
true reasons, the tied ``lm_head`` is never masked, and ``apply_plan`` keeps the logits where it promises."""

import copy
import json

import numpy as np
import pytest
import torch

import transformer_models as tm
from helpers import manifest_edit
from bbdecoder import analyzer
from bbdecoder.analyzer.pruning import pruning_plan, sweep
from bbdecoder.analyzer.trace.plans import PlanError, validate_plan
from bbdecoder.recorder import Recorder
from bbdecoder.recorder.prune import apply_plan, model_sparsity

DEAD = [3, 40, 77]    # units of transformer.h.0.mlp.c_fc made dead with a bias of -100
STEPS = 4
FC, PROJ = "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"


def _record(activation, d):
    """Train an HF GPT-2 with DEAD units for STEPS steps; return what torch saw (inputs, the MLP's
    activations of block 0 pooled over steps, weights at the last step)."""
    model = tm.hf_gpt2(activation=activation)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.bias[DEAD] = -100.0
    acts = []
    hook = model.transformer.h[0].mlp.act.register_forward_hook(lambda m, i, o: acts.append(o.detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xs = []
    with Recorder(model, d, activations="all", activations_every=1, weights_every=1) as rec:
        for s in range(STEPS):
            x, _ = tm.tokens(4, seed=s)
            xs.append(x)
            out = model(input_ids=x, labels=x)
            opt.zero_grad()
            out.loss.backward()
            snap = {n: p.detach().clone().numpy() for n, p in model.named_parameters()}
            rec.step(out.loss)
            opt.step()
    hook.remove()
    h = torch.cat([a.reshape(-1, a.shape[-1]) for a in acts]).double().numpy()   # (tokens, 128)
    return {"run": d, "model": model, "xs": xs, "h": h, "snap": snap}


@pytest.fixture(scope="module")
def gelu(tmp_path_factory):
    return _record("gelu_new", str(tmp_path_factory.mktemp("prune_tf") / "gelu"))


@pytest.fixture(scope="module")
def relu(tmp_path_factory):
    return _record("relu", str(tmp_path_factory.mktemp("prune_tf") / "relu"))


@pytest.fixture(scope="module")
def dead_plan(gelu):
    """The dead plan at threshold 0 of the gelu run (computed once)."""
    return pruning_plan(analyzer.open(gelu["run"]), "dead", 0.0)


def _logits(model, xs):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(input_ids=x).logits for x in xs])


def _unique_weights(model):
    """Elements of every module's own ``weight``, each parameter object once (the tied lm_head is wte's)."""
    seen = {}
    for m in model.modules():
        w = m._parameters.get("weight")
        if w is not None:
            seen[id(w)] = w.numel()
    return sum(seen.values())


def test_recorder_marks_weights_stored_in_x_out(gelu):
    m = json.load(open(f"{gelu['run']}/manifest.json"))
    lay = {L["name"]: L.get("weight_layout") for L in m["layers"]}
    assert {n for n, v in lay.items() if v == "in_out"} == {f"transformer.h.{i}.{c}" for i in (0, 1)
                                                            for c in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")}
    assert lay["lm_head"] is None and lay["transformer.wte"] is None


def test_dead_plan_removes_columns_of_c_fc_and_rows_of_c_proj(gelu, dead_plan):
    h = gelu["h"]
    dead = np.flatnonzero(h.max(0) <= 0).tolist()           # never above 0 in what torch computed
    assert dead == DEAD
    plan = dead_plan
    e, = [e for e in plan["layers"] if e["units"]]
    assert (e["layer"], e["axis"], e["units"], e["units_total"]) == (FC, 1, DEAD, 128)
    assert e["next"] == [{"layer": PROJ, "layer_id": 7, "param": "weight", "axis": 0, "units": DEAD, "group": 1,
                          "role": "consumer"}]
    es = plan["expected_sparsity"]
    assert es["per_layer"][FC] == pytest.approx(3 * 32 / (32 * 128))      # 3 columns of a (32, 128) weight
    assert es["per_layer"][PROJ] == pytest.approx(3 * 32 / (128 * 32))    # 3 rows of a (128, 32) weight
    assert es["weights"] == _unique_weights(gelu["model"]) and "lm_head" not in es["per_layer"]
    assert es["overall"] == pytest.approx(2 * 3 * 32 / _unique_weights(gelu["model"]))
    # the true reasons for what is not pruned; no LayerNorm is anyone's consumer, lm_head never masked
    notes = "\n".join(plan["notes"])
    assert "layer 'transformer.h.0.attn.c_attn' not pruned: no later layer takes its 96 units" in notes
    assert ("layer 'transformer.h.0.mlp.c_proj' not pruned: its 32 units reach 'transformer.h.1.ln_1' "
            "(LayerNorm), which normalises across all 32 units") in notes
    assert "reach 'lm_head', whose weight cannot be masked (its weight is tied to 'transformer.wte.weight')" in notes
    assert "no earlier layer produces" not in notes and "has no weight rows for its 96" not in notes
    assert not any(n["layer"].endswith(("ln_1", "ln_2", "ln_f")) or n["layer"] == "lm_head"
                   for x in plan["layers"] for n in x["next"])
    # applied: exactly those weights are zero, and the logits do not move
    model = copy.deepcopy(gelu["model"])
    before = _logits(model, gelu["xs"])
    summary = apply_plan(model, plan)
    after = _logits(model, gelu["xs"])
    assert float((before - after).abs().max()) <= 1e-6
    fc, proj = model.transformer.h[0].mlp.c_fc, model.transformer.h[0].mlp.c_proj
    want = np.ones((32, 128))
    want[:, DEAD] = 0
    np.testing.assert_array_equal(fc.weight_mask.numpy(), want)
    np.testing.assert_array_equal(proj.weight_mask.numpy(), want.T)
    assert fc.bias_mask.numpy().tolist() == [0.0 if i in DEAD else 1.0 for i in range(128)]
    assert not hasattr(proj, "bias_mask")                                  # a consumer's bias stays
    assert model.lm_head.weight is model.transformer.wte.weight             # the tie survives
    assert summary["overall"] == pytest.approx(es["overall"])
    assert model_sparsity(model)["layers"][FC] == pytest.approx(es["per_layer"][FC])


def test_dormant_plan_against_the_pooled_mean_abs_activation(relu):
    h = relu["h"]
    e_abs = np.abs(h).mean(0)
    score = e_abs / e_abs.mean()                            # Sokar et al.: E|h_i| / mean_k E|h_k|
    t = float(np.sort(score)[10])                           # 11 units at or below
    want = np.flatnonzero(score <= t).tolist()
    assert set(DEAD) <= set(want) and len(want) == 11
    run = analyzer.open(relu["run"])
    plan = pruning_plan(run, "dormant", t, layers=FC)
    e, = plan["layers"]
    assert (e["layer"], e["axis"], e["units"], e["sites"]) == (FC, 1, want, ["transformer.h.0.mlp.act"])
    assert [(n["layer"], n["axis"], n.get("role"), n["units"]) for n in e["next"]] == [(PROJ, 0, "consumer", want)]
    assert pruning_plan(run, "dormant", 0.0, layers=FC)["layers"][0]["units"] == DEAD
    # the sweep counts units on the output axis (128 of c_fc), masked elements per weight
    sw = sweep(run, "dormant", [t], layers=FC).set_index("layer")
    assert (sw.loc[FC, "units_removed"], sw.loc[FC, "units"]) == (11, 128)
    assert sw.loc[PROJ, "masked"] == 11 * 32 and sw.loc[FC, "masked"] == 11 * 32


def test_l1_channel_plan_reads_columns_of_in_x_out_weights(gelu, tmp_path):
    snap = gelu["snap"]
    w = snap[f"{FC}.weight"].astype(np.float64)             # (32 in, 128 out)
    l1 = np.abs(w).sum(0)                                   # per output unit: a column
    t = float(np.sort(l1)[4])
    run = analyzer.open(gelu["run"])
    plan = pruning_plan(run, "l1-channel", t)
    by = {e["layer"]: e for e in plan["layers"]}
    assert by[FC]["units"] == np.flatnonzero(l1 <= t).tolist() and len(by[FC]["units"]) == 5
    assert by[FC]["axis"] == 1 and [(n["layer"], n["axis"], n.get("role")) for n in by[FC]["next"]] == \
        [(PROJ, 0, "consumer")]
    l1b = np.abs(snap["transformer.h.1.mlp.c_fc.weight"].astype(np.float64)).sum(0)
    assert by["transformer.h.1.mlp.c_fc"]["units"] == np.flatnonzero(l1b <= t).tolist()
    # c_attn (q/k/v heads) and the residual writers c_proj are refused; LayerNorms are never a next layer
    assert set(by) == {FC, "transformer.h.1.mlp.c_fc"}
    assert "transformer.h.1.ln_1" not in json.dumps([e["next"] for e in plan["layers"]])
    notes = "\n".join(plan["notes"])
    for blk in (0, 1):
        assert f"layer 'transformer.h.{blk}.attn.c_attn' not pruned: no later layer takes its 96 units" in notes
        assert f"layer 'transformer.h.{blk}.attn.c_proj' not pruned: its 32 units reach" in notes
    model = copy.deepcopy(gelu["model"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.from_numpy(snap[n]))
    apply_plan(model, plan)
    u = by[FC]["units"]
    fc, proj = model.transformer.h[0].mlp.c_fc, model.transformer.h[0].mlp.c_proj
    assert np.array_equal(np.flatnonzero((fc.weight_mask == 0).all(0).numpy()), u)
    assert int((fc.weight_mask == 0).sum()) == 5 * 32 and int((proj.weight_mask == 0).sum()) == 5 * 32
    assert np.array_equal(np.flatnonzero((proj.weight_mask == 0).all(1).numpy()), u)


def test_plan_validation_knows_the_in_x_out_axes(dead_plan):
    plan = dead_plan
    e = next(e for e in plan["layers"] if e["units"])
    bad = copy.deepcopy(plan)
    bad["layers"][plan["layers"].index(e)]["units"] = [127, 128]            # c_fc has 128 output columns
    with pytest.raises(PlanError, match=r"units: index out of range \[0, 128\)"):
        validate_plan(bad)
    bad = copy.deepcopy(plan)
    bad["layers"][plan["layers"].index(e)]["next"][0]["role"] = "norm"
    with pytest.raises(PlanError, match="role must be 'consumer'"):
        validate_plan(bad)


def test_a_trace_without_weight_layout_reads_hf_conv1d_by_its_class(gelu, dead_plan, tmp_path):
    """A GPT-2 trace recorded before ``weight_layout`` existed: ``transformers...Conv1D`` is (in, out)."""
    def drop(m):
        for L in m["layers"]:
            L.pop("weight_layout", None)
    d = manifest_edit(drop)(gelu["run"], tmp_path)
    assert "weight_layout" not in (d / "manifest.json").read_text()
    old = pruning_plan(analyzer.open(d), "dead", 0.0)
    new = dead_plan
    assert old["layers"] == new["layers"] and old["expected_sparsity"] == new["expected_sparsity"]


def test_plan_version_2_for_in_x_out_axes_and_older_versions_still_apply(gelu, dead_plan, tmp_path):
    """Issue 15: a consumer row on axis 0 of a Conv1D would be misread by a version-1 reader (rows and bias
    entries masked as a normalisation's), so such a plan is version 2; version 1 files still read; a newer
    version is refused with one line, before anything is masked."""
    from bbdecoder.analyzer.trace.plans import load_plan, plan_version, write_plan
    plan = dead_plan
    assert plan["version"] == 2 == plan_version(plan["layers"])
    assert plan_version([{"axis": 0, "next": [{"axis": 1}]}]) == 1              # a Linear/conv plan stays 1
    assert plan_version([{"axis": 0, "next": [{"axis": 0, "role": "consumer"}]}]) == 2
    x = gelu["xs"]
    want = _logits(copy.deepcopy(gelu["model"]), x)
    for version in (2, 1):    # 1: the same plan as written before the bump (its role entries read the same)
        p = copy.deepcopy(plan)
        p["version"] = version
        f = write_plan(p, tmp_path / f"v{version}.json")
        model = copy.deepcopy(gelu["model"])
        apply_plan(model, f)
        assert float((_logits(model, x) - want).abs().max()) <= 1e-6         # outputs kept, as promised
        proj = model.transformer.h[0].mlp.c_proj
        assert np.flatnonzero((proj.weight_mask == 0).all(1).numpy()).tolist() == DEAD    # rows of the consumer
        assert not hasattr(proj, "bias_mask")                                # its bias untouched
    newer = copy.deepcopy(plan)
    newer["version"] = 3
    (tmp_path / "v3.json").write_text(json.dumps(newer))
    model = copy.deepcopy(gelu["model"])
    for given in (newer, str(tmp_path / "v3.json")):
        with pytest.raises(ValueError) as e:
            apply_plan(model, given)
        msg = str(e.value)
        assert "\n" not in msg and msg.endswith("plan version 3 is newer than this bbdecoder reads (1, 2); "
                                                "upgrade bbdecoder to apply it")
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())   # nothing was masked
    with pytest.raises(PlanError, match="newer than this bbdecoder"):
        load_plan(tmp_path / "v3.json")


def test_cli_checks_plan_versions(gelu, dead_plan, tmp_path, capsys):
    from bbdecoder.analyzer.trace.plans import write_plan
    from helpers import run_cli
    v2 = write_plan(dead_plan, tmp_path / "v2.json")
    code, o, e = run_cli(["prune", gelu["run"], "--check", v2], capsys)
    assert code == 0 and "version 2, fits the model" in o and FC in o, e
    newer = copy.deepcopy(dead_plan)
    newer["version"] = 3
    (tmp_path / "v3.json").write_text(json.dumps(newer))
    code, o, e = run_cli(["prune", gelu["run"], "--check", str(tmp_path / "v3.json")], capsys)
    assert code == 2 and len(e.strip().splitlines()) == 1 and "Traceback" not in e
    assert e.strip().endswith("plan version 3 is newer than this bbdecoder reads (1, 2); upgrade bbdecoder to "
                              "apply it")
    other = copy.deepcopy(dead_plan)
    other["model_fingerprint"]["params"][0][1][0] += 1          # another model (sha256 made to match)
    from bbdecoder.analyzer.trace.plans import fingerprint
    other["model_fingerprint"] = fingerprint(other["model_fingerprint"]["params"])
    (tmp_path / "other.json").write_text(json.dumps(other))
    code, o, e = run_cli(["prune", gelu["run"], "--check", str(tmp_path / "other.json")], capsys)
    assert code == 2 and "does not fit the model recorded in" in e and len(e.strip().splitlines()) == 1
    code, o, e = run_cli(["prune", gelu["run"], "--check", v2, "--criterion", "dead"], capsys)
    assert code == 2 and "--check PLAN takes no --criterion" in e
