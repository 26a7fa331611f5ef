"""Health rules on a GPT-2 (Hugging Face, built from a config) trained with AdamW (issue 18 polish):
the update-ratio band's upper side is information under Adam (each weight moves by about lr per step,
so the ratio is about lr / rms(w)), a huge learning rate still fails the run, a planted dead GELU unit
block fires dead_units at its site and units, and the box's groups hold every layer with its worst."""

import numpy as np
import pytest
import torch

import bbdecoder
from bbdecoder.analyzer import findings as F
from bbdecoder.analyzer.activations.deadunits import DEAD_FLOOR
from bbdecoder.recorder import Recorder
from transformer_models import hf_gpt2, tokens

STEPS = 30
LR = 3e-3
DEAD = 96            # units of block 0's MLP (of 4 x 32 = 128) planted dead
SITE0 = "transformer.h.0.mlp.act"


def record(d, lr=LR, dead=False):
    """A 2-block GPT-2 (hidden 32, tanh GELU) on 32 fixed sequences, AdamW, weights and gradient
    statistics every step, activation statistics of every activation module. ``dead``: block 0's
    c_fc bias of the first :data:`DEAD` units at -100 (GELU(x) for x <= -100 is 0 with zero gradient)."""
    model = hf_gpt2("eager")
    if dead:
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.bias[:DEAD] = -100.0
    x, _ = tokens(32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Recorder(model, d, grads_every=0, weights_every=1, activations=True, activations_every=0,
                      flush_steps=16) as rec:
            for _ in range(STEPS):
                loss = model(input_ids=x, labels=x).loss
                opt.zero_grad()
                loss.backward()
                rec.step(loss=loss)
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return bbdecoder.open(d)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("gpt2")
    return {"healthy": record(str(base / "healthy")), "huge": record(str(base / "huge"), lr=1.0),
            "dead": record(str(base / "dead"), dead=True)}


def pooled_medians(run) -> dict:
    """Independent: each layer's median over snapshot pairs of sqrt(sum_p ||dw_p||^2) / sqrt(sum_p ||w_p||^2)."""
    ws = run.weight_stats()
    out = {}
    for layer, d in ws.groupby("layer"):
        w = d.pivot(index="step", columns="param", values=["l2", "update_ratio"])
        prev = w["l2"].shift(1)
        n = w["l2"].shape[1]
        r = np.sqrt(((w["update_ratio"] * prev) ** 2).sum(axis=1, min_count=n)) / \
            np.sqrt((prev ** 2).sum(axis=1, min_count=n))
        out[layer] = float(r.dropna().median())
    return out


def rows(df, rule, severity=None):
    d = df[df["rule"] == rule]
    return d[d["severity"] == severity] if severity else d[d["severity"].isin(F.SEVERITIES)]


def test_adam_moves_each_weight_by_about_lr(runs):
    # the premise of the band's severity: Adam's first update is lr * sign(g) per weight (plus the decay)
    ws = runs["healthy"].weight_stats()
    w = ws[(ws["layer"] == "transformer.h.0.mlp.c_fc") & (ws["param"] == "weight")].sort_values("step")
    n = 32 * 128
    first = w["update_ratio"].iloc[1] * w["l2"].iloc[0]                   # ||w_1 - w_0||
    assert first == pytest.approx(LR * np.sqrt(n), rel=0.02)
    assert w["update_ratio"].iloc[1] == pytest.approx(LR / (w["l2"].iloc[0] / np.sqrt(n)), rel=0.02)
    assert w["update_ratio"].iloc[1] > 0.1                                 # 10x above the band at step 1


def test_healthy_adamw_update_ratios_are_information(runs):
    run = runs["healthy"]
    df = run.findings()
    assert not len(rows(df, "weight_update_ratio", "warning"))
    info = rows(df, "weight_update_ratio", "info").set_index("layer")["value"]
    med = pooled_medians(run)
    above = {k for k, v in med.items() if v > 1e-2}
    assert set(info.index) == above and len(above) == 10              # wte, wpe and the 8 Conv1D weights
    for k in above:
        assert info[k] == pytest.approx(med[k], rel=1e-9)
    assert all(v > 1e-4 for v in med.values())                           # nothing too small
    # the old behaviour on request, and the extreme tier
    warn = run.findings(rules="weight_update_ratio", weight_update_ratio={"high_severity": "warning"})
    assert set(warn.loc[warn["severity"] == "warning", "layer"]) == above
    cut = float(np.median([med[k] for k in above]))
    two = run.findings(rules="weight_update_ratio", weight_update_ratio={"extreme": cut})
    assert set(two.loc[two["severity"] == "warning", "layer"]) == {k for k in above if med[k] > cut}
    assert set(two.loc[two["severity"] == "info", "layer"]) == {k for k in above if med[k] <= cut}
    assert (two.loc[two["severity"] == "warning", "threshold"] == cut).all()


def test_box_groups_every_layer_with_its_worst(runs):
    df = runs["healthy"].findings()
    g = F.group(df)
    ratio = g[g["rule"] == "weight_update_ratio"]
    assert len(ratio) == 1                                               # one entry, not one line per layer
    r = ratio.iloc[0]
    rows_ = rows(df, "weight_update_ratio")
    assert r["severity"] == "info" and r["n"] == len(rows_) == 10
    assert r["worst_value"] == rows_["value"].max()
    assert r["worst_where"] == rows_.loc[rows_["value"].idxmax(), "layer"]
    assert r["values"] == sorted(rows_["value"], reverse=True) and set(r["where"]) == set(rows_["layer"])
    assert r["first_step"] == rows_["first_step"].min() and r["last_step"] == rows_["last_step"].max()
    # every fired row is in exactly one group; the table keeps them all
    assert g["n"].sum() == len(df[df["severity"].isin(F.SEVERITIES)])


def test_box_shows_one_entry_per_group_with_its_layers_linked(runs):
    import re

    from bbdecoder.analyzer.report.sections.findings import SHOWN, findings_html
    df = runs["healthy"].findings()
    g = F.group(df)
    fd = {"counts": {s: int((df["severity"] == s).sum()) for s in F.SEVERITIES + (F.SKIPPED,)},
          "findings": df.to_dict(orient="records"), "groups": g.to_dict(orient="records")}
    page = findings_html(fd, [{"file": "figures/update_ratio.png", "layer": None}])
    entries = re.findall(r"<li class=\"(\w+)\">(.*?)</li>", page, re.S)
    assert [s for s, _ in entries] == list(g["severity"])                # one entry per group, severity first
    body, = [b for _, b in entries if "<code>weight_update_ratio</code>" in b]
    r = g[g["rule"] == "weight_update_ratio"].iloc[0]
    assert f"<strong>{r['n']} layers</strong>, steps {r['first_step']}–{r['last_step']}" in body
    assert f"worst {r['worst_value']:.3g} at <code>{r['worst_where']}</code>" in body
    # every layer listed, worst first, each linked to the update-ratio figure; past SHOWN folded
    shown, folded = body.split("<details>")
    names = re.findall(r'<a href="#fig-update_ratio"><code>([^<]+)</code></a>', body)
    assert names == r["where"] and len(re.findall("<code>", folded)) == r["n"] - SHOWN
    assert f"and {r['n'] - SHOWN} more" in folded and "(<a href=\"#fig-update_ratio\">figure</a>)" in shown


def test_huge_learning_rate_still_fails_the_run(runs):
    run = runs["huge"]
    df = run.findings()
    ld = rows(df, "loss_not_decreasing", "warning")
    loss = run.steps["loss"].to_numpy()
    first, last = loss[:10].mean(), loss[-10:].mean()
    assert len(ld) == 1 and last > first                                # the loss rose
    assert ld["value"].iloc[0] == pytest.approx((first - last) / abs(first), rel=1e-9)
    assert F.fails(df, "warning")
    # the first update of every weight matrix is lr / rms(w) = 50x its size: the ratio rule names them
    ratio = rows(df, "weight_update_ratio")
    assert len(ratio) >= 8 and set(ratio["severity"]) <= {"info", "warning"}
    assert not F.fails(runs["healthy"].findings(rules=["loss_not_decreasing", "weight_update_ratio"]), "warning")


def test_dead_gelu_units_fire_at_their_site(runs):
    df = runs["dead"].findings()
    dead = rows(df, "dead_units")
    assert list(dead["layer"]) == [SITE0] and dead["severity"].iloc[0] == "warning"
    assert dead["value"].iloc[0] == DEAD / 128 and dead["first_step"].iloc[0] == 0
    assert dead["n_steps"].iloc[0] == STEPS and "flat tail" in dead["message"].iloc[0]
    # independent: the per-unit statistics (never above 0, never below the tail's floor)
    a = runs["dead"].activation_stats(sites=SITE0)
    kind = a["kind"].iloc[0]
    assert kind in DEAD_FLOOR
    per = a.groupby("unit").agg(mx=("max", "max"), mn=("min", "min"))
    judged = (per["mx"] <= 0) & (per["mn"] >= -DEAD_FLOOR[kind])
    assert list(per.index[judged]) == list(range(DEAD))
    # quiet on the healthy run of the same model, and judged there (not skipped)
    h = runs["healthy"].findings(rules="dead_units")
    assert len(h) == 0


def test_shapes_keep_sides_and_kinds_apart():
    import pandas as pd
    mk = lambda rule, layer, param, v, thr, msg: dict(rule=rule, severity="warning", layer=layer, param=param,
                                                      first_step=1, last_step=5, n_steps=5, value=v,
                                                      threshold=thr, message=msg)
    df = pd.DataFrame([
        mk("weight_update_ratio", "2", None, 1e-6, 1e-4, "layer '2': median update ratio per step 1e-06 is too small "
           "(band [0.0001, 0.01], 9 snapshot pairs)"),
        mk("weight_update_ratio", "a.b", None, 2e-6, 1e-4, "layer 'a.b': median update ratio per step 2e-06 is too "
           "small (band [0.0001, 0.01], 9 snapshot pairs)"),
        mk("weight_update_ratio", "c", None, 3.0, 1.0, "layer 'c': median update ratio per step 3 is too large "
           "(band [0.0001, 0.01], extreme 1, 9 snapshot pairs)"),
        mk("all_zero", "4", "weight", 0.25, 1, "gradient of 4.weight is all zero on 10 of 40 steps"),
        mk("all_zero", "h.0", "bias", 0.5, 1, "gradient of h.0.bias is all zero on 20 of 40 steps"),
        mk("nonfinite", "h.0", "bias", 3, 0, "gradient NaN/Inf in h.0.bias from step 2 (3 values in 1 steps)"),
        mk("nonfinite", "h.0", "bias", 5, 0, "weight NaN/Inf in h.0.bias from step 3 (5 values in 2 steps)"),
    ])
    g = F.group(df)
    assert list(g["n"]) == [2, 1, 2, 1, 1]

    def one(rule, n):   # the one group of that rule and size (a row, under pandas 2 and 3 alike)
        sel = g[(g["rule"] == rule) & (g["n"] == n)]
        assert len(sel) == 1
        return sel.iloc[0]
    small = one("weight_update_ratio", 2)
    assert small["worst_value"] == 1e-6 and small["worst_where"] == "2"          # lower is worse below the band
    z = one("all_zero", 2)
    assert z["worst_value"] == 0.5 and z["where"] == ["h.0.bias", "4.weight"]     # a larger share is worse
