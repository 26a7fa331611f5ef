"""Health rules (issue 18 items 1, 2, 6): each rule on a small run with its fault planted fires at the
planted layer and step and stays quiet on a healthy run of the same model; re-evaluating at other
thresholds reads no raw tensor."""

import numpy as np
import pytest
import torch
from torch import nn

import bbdecoder
from bbdecoder.analyzer import findings as F
from bbdecoder.recorder import Recorder

STEPS = 40
K = 25          # the step at which a fault is planted


def net(kind="net", seed=0):
    """Net: 0 Linear, 1 ReLU, 2 Linear, 3 Tanh, 4 Linear, 5 ReLU, 6 Linear (activation sites 1, 3, 5),
    ReLU layers He-initialised, the tanh layer Xavier-initialised. "sigmoid": ten Linear + Sigmoid."""
    torch.manual_seed(seed)
    if kind == "sigmoid":
        mods = []
        for i in range(10):
            mods += [nn.Linear(16 if i else 8, 16), nn.Sigmoid()]
        return nn.Sequential(*mods, nn.Linear(16, 4))
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(),
                      nn.Linear(32, 4))
    for i, gain in ((0, "relu"), (2, "tanh"), (4, "relu"), (6, "linear")):
        nn.init.xavier_normal_(m[i].weight, nn.init.calculate_gain(gain)) if gain != "relu" else \
            nn.init.kaiming_normal_(m[i].weight, nonlinearity="relu")
        nn.init.zeros_(m[i].bias)
    return m


def record(d, fault=None, kind="net", lr=0.05):
    """Train on one fixed batch (a learnable teacher) with plain SGD, recording gradient statistics and
    weights every step and activation statistics of every activation module; ``fault`` plants one."""
    model = net(kind)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=g)
    y = (x @ torch.randn(8, 4, generator=g)).argmax(1)
    groups = [{"params": list(model[i].parameters()), "lr": lr} for i in range(len(model))
              if list(model[i].parameters())]
    if fault == "tiny_lr":
        groups[1]["lr"] = 1e-6                  # layer "2"
    if fault == "lr0":
        for gr in groups:
            gr["lr"] = 0.0
    if fault == "frozen":
        model[2].requires_grad_(False)
        groups = [gr for i, gr in enumerate(groups) if i != 1]
    if fault == "dead":
        with torch.no_grad():
            model[4].bias[:24] = -100.0         # 24 of the 32 units of ReLU "5" never active
    if fault == "dead_all":
        with torch.no_grad():
            model[4].bias.fill_(-100.0)         # ReLU "5" all zero, and so every gradient but the head's bias
    if fault == "saturated":
        with torch.no_grad():
            model[2].weight.mul_(30.0)          # tanh "3" saturated
    if fault == "poor_init":
        with torch.no_grad():
            for i in (0, 2, 4, 6):
                model[i].weight.mul_(0.05)
    opt = torch.optim.SGD(groups, lr=lr)
    state = {"step": 0}
    if fault in ("spike", "explode"):
        model[4].weight.register_hook(lambda gr: gr * 1000.0 if (state["step"] == K or fault == "explode"
                                                                  and state["step"] >= K) else gr)
    if fault == "collapse":                     # site "5" loses its spread across the batch from step K
        model[4].register_forward_hook(lambda m, i, o: o.mean(0, keepdim=True).expand_as(o).clone()
                                       if state["step"] >= K else o)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # a tiny model: more threads only contend for the cores
    with Recorder(model, d, grads_every=0, weights_every=1, activations=True, activations_every=0,
                  flush_steps=16) as rec:
        for s in range(STEPS):
            state["step"] = s
            xs = x.clone()
            if fault == "nan" and s >= K:
                xs[0, 0] = float("nan")
            loss = nn.functional.cross_entropy(model(xs), y)
            opt.zero_grad()
            loss.backward()
            rec.step(loss=loss)
            if fault == "explode" and s >= K:
                continue                        # the explosion is in the gradients only: no update
            opt.step()
    torch.set_num_threads(threads)
    return d


FAULTS = ("healthy", "healthy_again", "frozen", "sigmoid", "nan", "lr0", "tiny_lr", "spike", "explode", "dead", "dead_all", "saturated",
          "poor_init", "collapse")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("findings")
    out = {}
    for f in FAULTS:
        record(str(base / f), None if f in ("healthy", "healthy_again", "sigmoid") else f, kind="sigmoid" if f == "sigmoid" else "net")
        out[f] = bbdecoder.open(str(base / f))
    return out


def fired(df, rule):
    return df[(df["rule"] == rule) & df["severity"].isin(F.SEVERITIES)]


def test_healthy_run_is_quiet(runs):
    df = runs["healthy"].findings()
    assert not len(df[df["severity"].isin(F.SEVERITIES)]), df.to_string()
    # every rule had its data (attention_entropy_collapse: this net has no softmax site)
    assert set(df.loc[df["severity"] == F.SKIPPED, "rule"]) <= {"attention_entropy_collapse"}


def layer_grads(run):
    """Per (step, layer) gradient statistics from the Run API (the analyzer's gradient pass)."""
    return run.grad_stats(by="layer").sort_values(["layer", "step"])


def test_frozen_layer_is_unchanged(runs):
    df = fired(runs["frozen"].findings(), "unchanged_weights")
    assert set(zip(df["layer"], df["param"])) == {("2", "weight"), ("2", "bias")}
    assert (df["first_step"] == 0).all() and (df["last_step"] == STEPS - 1).all() and (df["n_steps"] == STEPS).all()
    assert (df["value"] == 0).all()
    ws = runs["frozen"].weight_stats()
    w2 = ws[ws["layer"] == "2"]
    assert (w2["update_ratio"].dropna() == 0).all() and len(w2) == 2 * STEPS     # independent: the weight pass


def test_sigmoid_chain_vanishes_at_the_first_layers(runs):
    df = fired(runs["sigmoid"].findings(), "vanishing_gradient")
    assert "0" in set(df["layer"]) and "20" not in set(df["layer"])   # the first layer; never the head
    g = layer_grads(runs["sigmoid"])
    top = g.groupby("step")["abs_mean"].transform("max")
    rel = (g["abs_mean"] / top)[g["layer"] == "0"]
    row = df[df["layer"] == "0"].iloc[0]
    assert row["value"] == pytest.approx(float(np.median(rel)), rel=1e-9)
    assert row["value"] < 1e-4 and row["first_step"] == 0 and row["n_steps"] == STEPS
    assert not len(fired(runs["healthy"].findings(), "vanishing_gradient"))


def test_nonfinite_from_the_planted_step(runs):
    df = fired(runs["nan"].findings(), "nonfinite")
    assert df["severity"].eq("error").all()
    grads = df[df["message"].str.startswith("gradient")]
    assert set(grads["first_step"]) == {K}                          # every layer's gradient from step K
    assert len(grads) == 8 and (grads["n_steps"] == STEPS - K).all()
    loss = df[df["param"] == "loss"].iloc[0]
    assert loss["first_step"] == K and loss["n_steps"] == STEPS - K
    acts = df[df["message"].str.startswith("activation")]
    assert acts[acts["layer"] == "1"]["first_step"].iloc[0] == K
    weights = df[df["message"].str.startswith("weight")]
    assert set(weights["first_step"]) == {K + 1}                    # the update of step K made them NaN
    st = runs["nan"].steps
    assert np.isfinite(st["loss"][st["step"] < K]).all() and np.isnan(st["loss"][st["step"] >= K]).all()


def test_learning_rate_zero(runs):
    df = runs["lr0"].findings()
    un = fired(df, "unchanged_weights")
    assert len(un) == 8                                              # every parameter of the 4 Linear layers
    ld = fired(df, "loss_not_decreasing").iloc[0]
    loss = runs["lr0"].steps["loss"].to_numpy()
    want = (loss[:10].mean() - loss[-10:].mean()) / abs(loss[:10].mean())
    assert ld["value"] == pytest.approx(want, abs=1e-12) and abs(ld["value"]) < 1e-6
    assert ld["first_step"] == STEPS - 10 and ld["n_steps"] == 10
    assert not len(fired(runs["healthy"].findings(), "loss_not_decreasing"))


def test_update_ratio_too_small_at_the_slow_layer(runs):
    df = fired(runs["tiny_lr"].findings(), "weight_update_ratio")
    assert list(df["layer"]) == ["2"] and "too small" in df["message"].iloc[0]
    ws = runs["tiny_lr"].weight_stats()
    w = ws[ws["layer"] == "2"].pivot(index="step", columns="param", values=["l2", "update_ratio"])
    prev = w["l2"].shift(1)
    pooled = np.sqrt(((w["update_ratio"] * prev) ** 2).sum(axis=1, min_count=2)) / np.sqrt((prev ** 2).sum(axis=1, min_count=2))
    assert df["value"].iloc[0] == pytest.approx(float(pooled.dropna().median()), rel=1e-9)
    assert df["value"].iloc[0] < 1e-4
    assert not len(fired(runs["healthy"].findings(), "weight_update_ratio"))


def test_gradient_spike_at_the_planted_layer_and_step(runs):
    run = runs["spike"]
    df = fired(run.findings(), "gradient_spike")
    first = df.sort_values("first_step").iloc[0]
    assert first["layer"] == "4" and first["first_step"] == K
    assert (df[df["layer"] != "4"]["first_step"] > K).all()         # others only after the update it caused
    g = layer_grads(run)
    l2 = g[g["layer"] == "4"].set_index("step")["l2"]
    ref = l2.loc[K - 20:K - 1]
    row = df[df["layer"] == "4"].iloc[0]
    assert row["message"].find(f"at step {K}") > 0
    assert 10 ** (np.log10(l2.loc[K]) - np.median(np.log10(ref))) == pytest.approx(row["value"], rel=1e-9)
    assert row["value"] > 100
    assert not len(fired(runs["healthy"].findings(), "gradient_spike"))


def test_loss_spike_is_traced_to_the_layer_that_moved_first(runs):
    run = runs["spike"]
    df = fired(run.findings(), "loss_spike")
    assert len(df) == 1
    row = df.iloc[0]
    assert row["first_step"] == K + 1                               # the update of step K raised the next loss
    assert row["layer"] == "4" and row["param"] == "grad_norm"
    att = F.attribute(F.Tables(run), K + 1, lead_window=10, window=20, z=3.5, factor=10.0)
    assert (att.iloc[0]["layer"], att.iloc[0]["statistic"], att.iloc[0]["step"], att.iloc[0]["lead"]) == \
        ("4", "grad_norm", K, 1)
    assert (att["lead"].iloc[1:] <= 1).all()
    loss = run.steps.set_index("step")["loss"]
    med = loss.loc[K + 1 - 20:K].median()
    assert row["value"] == pytest.approx((loss.loc[K + 1] - med) / abs(med), rel=1e-9)
    assert not len(fired(runs["healthy"].findings(), "loss_spike"))


def test_exploding_gradient_from_the_planted_step(runs):
    df = fired(runs["explode"].findings(), "exploding_gradient")
    assert list(df["layer"]) == ["4"]
    assert df["first_step"].iloc[0] == K and df["n_steps"].iloc[0] == STEPS - K
    assert not len(fired(runs["explode"].findings(), "gradient_spike"))
    assert not len(fired(runs["healthy"].findings(), "exploding_gradient"))


def test_dead_relu(runs):
    dead = fired(runs["dead"].findings(), "dead_units")
    assert list(dead["layer"]) == ["5"]
    assert dead["value"].iloc[0] == 24 / 32 and dead["first_step"].iloc[0] == 0 and dead["n_steps"].iloc[0] == STEPS
    a = runs["dead"].activation_stats(sites="5")                    # independent: the per-unit statistics
    per_unit = a.groupby("unit")["frac_active"].mean()
    assert (per_unit <= 0.01).sum() == 24 and (per_unit.index[per_unit <= 0.01] < 24).all()
    assert not len(fired(runs["healthy"].findings(), "dead_units"))


def test_all_zero_site_and_gradients(runs):
    zero = fired(runs["dead_all"].findings(), "all_zero")
    got = set(zip(zero["layer"], zero["param"]))
    assert ("5", None) in got                                        # the site
    # nothing flows back through an all-zero ReLU: every gradient but the head's bias is zero
    assert {(str(i), p) for i in (0, 2, 4) for p in ("weight", "bias")} | {("6", "weight")} <= got
    assert ("6", "bias") not in got
    assert (zero["first_step"] == 0).all() and (zero["n_steps"] == STEPS).all()
    g = runs["dead_all"].grad_stats()
    assert (g[g["layer"] == "4"]["max_abs"] == 0).all()
    assert not len(fired(runs["healthy"].findings(), "all_zero"))


def test_saturated_tanh(runs):
    df = fired(runs["saturated"].findings(), "saturated_activations")
    assert list(df["layer"]) == ["3"] and df["first_step"].iloc[0] == 0
    sat = runs["saturated"].saturation(delta=0.03, sites="3", per_unit=True)
    share = float((sat.groupby("unit")["saturated"].mean() > 0.5).mean())
    assert df["value"].iloc[0] == pytest.approx(share) and share > 0.5
    assert not len(fired(runs["healthy"].findings(), "saturated_activations"))


def test_poor_initialization(runs):
    df = fired(runs["poor_init"].findings(), "poor_initialization")
    assert len(df) == 1 and df["layer"].iloc[0] == "5" and "shrinks" in df["message"].iloc[0]
    a = runs["poor_init"].activation_stats(sites=["1", "5"], steps=(0, 10))
    site_var = {}
    for s, g in a.groupby("site"):   # pooled variance of every value of the site over the steps, per step
        per_step = g.groupby("step").apply(lambda d: ((d["std"] ** 2 + d["mean"] ** 2).mean()
                                                      - d["mean"].mean() ** 2), include_groups=False)
        site_var[s] = float(per_step.median())
    assert df["value"].iloc[0] == pytest.approx(site_var["1"] / site_var["5"], rel=1e-6)
    assert not len(fired(runs["healthy"].findings(), "poor_initialization"))


def test_spread_collapse(runs):
    df = fired(runs["collapse"].findings(), "tensor_variance")
    assert list(df["layer"]) == ["5"] and df["first_step"].iloc[0] == K and df["n_steps"].iloc[0] == STEPS - K
    assert not len(fired(runs["healthy"].findings(), "tensor_variance"))


def test_compare_same_run_twice_is_similar(runs):
    from bbdecoder import analyzer
    comp = analyzer.compare(runs["healthy"], runs["healthy_again"])
    assert comp.similar and comp.steps == STEPS
    assert not comp.divergence["first_step"].notna().any()
    assert set(comp.divergence["statistic"]) == {"grad_norm", "update_ratio", "act_rms", "act_std", "loss"}
    s = comp.series
    assert np.array_equal(s["a"].to_numpy(), s["b"].to_numpy(), equal_nan=True)   # bit-identical (CPU, same seed)
    assert comp.summary()["similar_across_runs"] is True


def test_compare_finds_the_planted_spike_first(runs):
    from bbdecoder.analyzer.compare import compare
    comp = compare(runs["healthy"], runs["spike"], tolerance=0.5, window=1)
    assert not comp.similar
    div = comp.divergence.dropna(subset=["first_step"]).sort_values("first_step", kind="stable")
    first = div.iloc[0]
    assert (first["layer"], first["statistic"], first["first_step"]) == ("4", "grad_norm", K)
    g = layer_grads(runs["spike"]).set_index(["layer", "step"])["l2"]
    h = layer_grads(runs["healthy"]).set_index(["layer", "step"])["l2"]
    assert first["difference"] == pytest.approx(abs(np.log10(h[("4", K)] / g[("4", K)])), rel=1e-9)
    assert (div["first_step"] >= K).all()                               # identical before the fault
    # smoothed with a trailing median of 5 steps, the one-step spike itself is no divergence: what it
    # caused afterwards is
    smooth = compare(runs["healthy"], runs["spike"], tolerance=0.5, window=5).divergence
    assert (smooth["first_step"].dropna() > K).all()
