"""Activation kinds right for transformers (issue 15, item 3): which kind each site of HF GPT-2, BERT,
ViT, Llama and the pure-torch tiny models is, no site for the ops inside a recognised activation
module, softmax sites under eager attention, and the note that fused attention (sdpa) leaves the
attention probabilities unobservable."""

import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder import analyzer
from bbdecoder.recorder import Recorder
from bbdecoder.recorder.activation_kinds import (FUNCS, RELU_FAMILY, SMOOTH_KINDS, WATCHED, call_kind,
                                                 fused_attention_config, module_kind, site_family)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import transformer_models as tm  # noqa: E402

pytest.importorskip("transformers")


def record(tmp_path, model, inputs, steps=2, hooks=()):
    """Train ``model`` ``steps`` steps with activations=True; returns (run, manifest, {module: [outputs]})
    where the outputs of the ``hooks`` modules are captured independently by forward hooks."""
    seen = {n: [] for n in hooks}
    named = dict(model.named_modules())
    hs = [named[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(o.detach().clone())) for n in hooks]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    d = tmp_path / "run"
    with Recorder(model, d, grads_every=None, weights_every=None, activations=True, activations_every=None) as rec:
        model.train()
        for _ in range(steps):
            out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
            loss = out.loss if hasattr(out, "loss") else out.float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            rec.step(loss=loss)
            opt.step()
    for h in hs:
        h.remove()
    return analyzer.open(d), json.loads((d / "manifest.json").read_text()), seen


def kinds(run):
    return {S["name"]: (S["kind"], S["family"]) for S in run.catalog.sites}


def lm_batch():
    ids, _ = tm.tokens(3)
    return {"input_ids": ids, "labels": ids}


# ----------------------------------------------------------------------------- HF GPT-2

def test_gpt2_eager_gelu_new_is_one_gelu_tanh_site_and_softmax_is_seen(tmp_path):
    run, man, seen = record(tmp_path, tm.hf_gpt2("eager"), lm_batch(), hooks=["transformer.h.0.mlp.c_fc"])
    assert kinds(run) == {
        "transformer.h.0.attn/softmax#0": ("softmax", "bounded"),
        "transformer.h.1.attn/softmax#0": ("softmax", "bounded"),
        "transformer.h.0.mlp.act": ("gelu_tanh", "smooth"), "transformer.h.1.mlp.act": ("gelu_tanh", "smooth")}
    assert "attention_unobserved" not in man
    S = next(S for S in man["sites"] if S["name"] == "transformer.h.0.mlp.act")
    assert S["hist_edges"] is None and "hist" not in S["stats"]    # not a bounded kind: no histogram
    # the site holds gelu_new of the MLP's input (not the tanh inside it): numpy's gelu_new of c_fc's output
    st = run.activation_stats(sites="transformer.h.0.mlp.act")
    for step, x in enumerate(seen["transformer.h.0.mlp.c_fc"]):
        x = x.double().reshape(-1, x.shape[-1]).numpy()
        h = 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))
        g = st[st["step"] == step].sort_values("unit")
        np.testing.assert_allclose(g["mean"], h.mean(0), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(g["min"], h.min(0), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(g["max"], h.max(0), rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(g["frac_active"], (h > 0).mean(0), atol=1e-12)


def test_gpt2_sdpa_has_no_softmax_site_and_notes_each_attention_module_once(tmp_path):
    run, man, _ = record(tmp_path, tm.hf_gpt2("sdpa"), lm_batch(), steps=3)
    assert kinds(run) == {"transformer.h.0.mlp.act": ("gelu_tanh", "smooth"),
                          "transformer.h.1.mlp.act": ("gelu_tanh", "smooth")}
    assert man["attention_unobserved"] == ["transformer.h.0.attn", "transformer.h.1.attn"]


@pytest.mark.parametrize("act,kind", [("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_fast", "gelu_tanh"),
                                      ("gelu", "gelu"), ("quick_gelu", "quick_gelu"), ("silu", "silu"),
                                      ("mish", "mish"), ("relu", "relu")])
def test_gpt2_activation_functions_map_to_kinds(act, kind):
    m = tm.hf_gpt2("eager", layers=1, activation=act)
    assert module_kind(m.transformer.h[0].mlp.act) == kind
    assert (kind in SMOOTH_KINDS) == (site_family(kind, None) == "smooth")


# ----------------------------------------------------------------------------- BERT, ViT, Llama, tiny models

def test_bert_eager_and_sdpa_sites(tmp_path):
    run, man, _ = record(tmp_path / "e", tm.hf_bert("eager"), {"input_ids": tm.tokens(3)[0], "labels": tm.tokens(3)[1]})
    L = "bert.encoder.layer"
    assert kinds(run) == {f"{L}.0.attention.self/softmax#0": ("softmax", "bounded"),
                          f"{L}.1.attention.self/softmax#0": ("softmax", "bounded"),
                          f"{L}.0.intermediate.intermediate_act_fn": ("gelu", "smooth"),
                          f"{L}.1.intermediate.intermediate_act_fn": ("gelu", "smooth"),
                          "bert.pooler.activation": ("tanh", "bounded")}
    assert "attention_unobserved" not in man
    run, man, _ = record(tmp_path / "s", tm.hf_bert("sdpa"), {"input_ids": tm.tokens(3)[0], "labels": tm.tokens(3)[1]})
    assert not any(k == "softmax" for k, _ in kinds(run).values())
    assert man["attention_unobserved"] == [f"{L}.0.attention.self", f"{L}.1.attention.self"]


def test_vit_sdpa_sites(tmp_path):
    x, y = tm.images(2)
    run, man, _ = record(tmp_path, tm.hf_vit("sdpa"), {"pixel_values": x, "labels": y}, steps=1)
    assert kinds(run) == {"vit.layers.0.mlp.activation_fn": ("gelu", "smooth"),
                          "vit.layers.1.mlp.activation_fn": ("gelu", "smooth")}
    assert man["attention_unobserved"] == ["vit.layers.0.attention", "vit.layers.1.attention"]


def test_llama_swiglu_gate_is_the_silu_site(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tm.VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=tm.CONTEXT,
                      attn_implementation="eager")
    run, man, seen = record(tmp_path, LlamaForCausalLM(cfg), lm_batch(), steps=1,
                            hooks=["model.layers.0.mlp.gate_proj"])
    assert kinds(run) == {"model.layers.0.self_attn/softmax#0": ("softmax", "bounded"),
                          "model.layers.0.mlp.act_fn": ("silu", "smooth")}
    st = run.activation_stats(sites="model.layers.0.mlp.act_fn").sort_values("unit")
    g = seen["model.layers.0.mlp.gate_proj"][0].double()
    h = (g * torch.sigmoid(g)).reshape(-1, 24).numpy()          # SiLU of the gate, by hand
    np.testing.assert_allclose(st["mean"], h.mean(0), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(st["max"], h.max(0), rtol=1e-5)


def test_tiny_models_sites_and_sdpa_note(tmp_path):
    ids, y = tm.tokens(3)
    run, man, _ = record(tmp_path / "g", tm.tiny_gpt2(), ids, steps=1)
    assert kinds(run) == {"blocks.0.mlp.1": ("gelu", "smooth"), "blocks.1.mlp.1": ("gelu", "smooth")}
    assert man["attention_unobserved"] == ["blocks.0.attn", "blocks.1.attn"]
    run, man, _ = record(tmp_path / "b", tm.tiny_bert(), ids, steps=1)
    assert kinds(run) == {"blocks.0.mlp.1": ("gelu", "smooth"), "blocks.1.mlp.1": ("gelu", "smooth"),
                          "/tanh#0": ("tanh", "bounded")}
    assert man["attention_unobserved"] == ["blocks.0.attn", "blocks.1.attn"]


# ----------------------------------------------------------------------------- pure torch forms

class SwiGLU(nn.Module):
    """A gated MLP written with F.silu (LLaMA's MLP): down(silu(gate(x)) * up(x))."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 6)
        self.act = nn.GELU(approximate="tanh")

    def forward(self, x):
        y = self.down(F.silu(self.gate(x)) * self.up(x))
        return self.act(y) + F.gelu(y, approximate="tanh") + F.gelu(y) + F.mish(y)


def test_functional_forms_swiglu_and_gelu_approximations(tmp_path):
    torch.manual_seed(0)
    run, _, _ = record(tmp_path, SwiGLU(), torch.randn(5, 6), steps=1)
    assert kinds(run) == {"/silu#0": ("silu", "smooth"), "act": ("gelu_tanh", "smooth"),
                          "/gelu_tanh#0": ("gelu_tanh", "smooth"), "/gelu#0": ("gelu", "smooth"),
                          "/mish#0": ("mish", "smooth")}
    assert call_kind("gelu", (None, "tanh"), {}) == "gelu_tanh" and call_kind("gelu", (None,), {}) == "gelu"


class NewGELUActivation(nn.Module):
    """Named like transformers' class but defined here: not recognised (the class's module decides)."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))


def test_class_name_matches_only_in_transformers_modules(tmp_path):
    assert module_kind(NewGELUActivation()) is None
    Fake = type("NewGELUActivation", (NewGELUActivation,), {"__module__": "transformers.activations"})
    assert module_kind(Fake()) == "gelu_tanh"
    net = nn.Sequential(nn.Linear(4, 4), NewGELUActivation())
    run, _, _ = record(tmp_path, net, torch.randn(3, 4), steps=1)
    assert kinds(run) == {"1/tanh#0": ("tanh", "bounded")}    # a user's own module: its tanh is a site


def test_tables_and_fused_attention_config():
    assert WATCHED[F.scaled_dot_product_attention] == "fused_attention"
    assert F.scaled_dot_product_attention not in FUNCS                 # the graph's kinds stay activations
    assert set(SMOOTH_KINDS).isdisjoint(RELU_FAMILY) and "gelu" in SMOOTH_KINDS and "silu" in SMOOTH_KINDS
    cfg = lambda impl: types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation=impl))  # noqa: E731
    assert fused_attention_config(cfg("flash_attention_2")) == ["attn_implementation=flash_attention_2"]
    assert fused_attention_config(cfg("sdpa")) == [] and fused_attention_config(cfg("eager")) == []
    assert fused_attention_config(nn.Linear(2, 2)) == []


def test_recorder_never_imports_transformers():
    import ast
    import bbdecoder.recorder as R
    root = os.path.dirname(R.__file__)
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py") and "integrations" not in dirpath:   # the HF callback may import it
                tree = ast.parse(open(os.path.join(dirpath, f), encoding="utf-8").read())
                names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names] + \
                        [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
                assert not any(x.split(".")[0] == "transformers" for x in names), f
