"""The HF Trainer callback (bbdecoder.recorder.integrations.hf) with the real transformers Trainer:
one step per optimizer step under gradient accumulation, the gradient before (default) or after the
Trainer's clipping equal to a plain-torch replay of the batches the model saw under the same bf16
autocast, the loss the Trainer logs (no Trainer subclass), epochs, no evaluation statistics, and
activation sites of a GPT-2 built from a config."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
import transformers
from torch.nn import functional as F

from bbdecoder import analyzer
from bbdecoder.recorder import RecorderWarning
from bbdecoder.recorder.integrations.hf import Callback
from transformer_models import hf_gpt2, tokens

N, B, D_IN, D_H = 16, 4, 6, 8      # samples, batch, input and hidden width
ACC, CLIP, LR, EPOCHS = 2, 0.05, 0.1, 2


class Net(nn.Module):
    """A plain module the Trainer can train: forward(x, labels) -> {"loss", "logits"}; it keeps the
    training batches it sees (for the replay) and counts the evaluation forwards."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(D_IN, D_H)
        self.fc2 = nn.Linear(D_H, 1)
        self.seen, self.eval_forwards = [], 0

    def forward(self, x, labels):
        if self.training:
            self.seen.append((x.detach().clone(), labels.detach().clone()))
        else:
            self.eval_forwards += 1
        out = self.fc2(F.relu(self.fc1(x)))
        return {"loss": F.mse_loss(out.float(), labels), "logits": out}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=B, per_device_eval_batch_size=B,
                gradient_accumulation_steps=ACC, num_train_epochs=EPOCHS, learning_rate=LR, optim="sgd",
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=CLIP, bf16=True, use_cpu=True,
                logging_steps=1, report_to=[], save_strategy="no", eval_strategy="epoch",
                disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _replay(model, seen, clipped, dtype=torch.bfloat16):
    """Plain torch over the batches the Trainer fed: per optimizer step sum of grad(loss / ACC) under
    ``dtype`` autocast (bf16: the Trainer's bf16 on CPU; None: float32), no loss scaling, pre- or
    post-clipping, then SGD."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    grads = []
    for w in range(0, len(seen), ACC):
        opt.zero_grad()
        for x, y in seen[w:w + ACC]:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = model(x, y)["loss"] / ACC
            loss.backward()
        if not clipped:
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if clipped:
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return grads


def _fit(model, args, train, evaluate, cb, setup=None, warned=0):
    """Train; ``setup(trainer)`` runs before; ``warned``: how many RecorderWarnings must come.
    Returns the Trainer's logged per-step losses."""
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluate,
                                   callbacks=[cb])
    if setup is not None:
        setup(trainer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    got = [str(w.message) for w in caught if issubclass(w.category, RecorderWarning)]
    assert len(got) == warned, got
    _fit.warnings = got
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _check_grads(run, want, rtol, atol):
    """The recorded raw gradients against the replay's; returns each step's total L2 norm (replay)."""
    norms = []
    for s, step in enumerate(want):
        for name, gr in step.items():
            layer, param = name.rsplit(".", 1)
            got = run.raw_tensor("grads", layer, param, s)
            np.testing.assert_allclose(got, gr.numpy(), rtol=rtol, atol=atol, err_msg=f"{name} step {s}")
        norms.append(float(torch.cat([gr.flatten() for gr in step.values()]).norm()))
    return norms


@pytest.mark.parametrize("clipped", [False, True])
def test_hf_records_optimizer_steps_with_the_replayed_gradient(tmp_path, clipped):
    g = torch.Generator().manual_seed(1)
    data = Pairs(torch.randn(N, D_IN, generator=g), torch.randn(N, 1, generator=g))
    model = Net()
    start = copy.deepcopy(model)
    cb = Callback(tmp_path / "run", clipped=clipped, grads_every=1, weights_every=1, activations=True)
    logged = _fit(model, _args(tmp_path), data, data, cb)
    assert model.eval_forwards == EPOCHS * N // B    # evaluation ran, and must not show in the trace

    run = analyzer.open(tmp_path / "run")
    steps_per_epoch = N // B // ACC
    st = run.steps
    assert st["step"].tolist() == list(range(EPOCHS * steps_per_epoch))          # optimizer steps only
    assert st["epoch"].tolist() == [e for e in range(EPOCHS) for _ in range(steps_per_epoch)]
    np.testing.assert_allclose(st["loss"], logged, rtol=1e-7)    # the Trainer's own per-step loss
    norms = _check_grads(run, _replay(start, model.seen, clipped), 1e-5, 1e-7)
    if clipped:
        assert max(norms) == pytest.approx(CLIP, rel=1e-4)
    else:
        assert min(norms) > 2 * CLIP
    acts = run.activation_stats()
    assert set(acts["site"]) == {"/relu#0"}
    assert (acts.groupby("step")["count"].max() == ACC * B).all()   # training forwards only


class TokenSet(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_gpt2_loss_normalised_by_the_trainer_and_sites(tmp_path):
    """GPT-2 takes ``num_items_in_batch``: the model normalises the loss over the window and the
    Trainer sums it; the recorded loss is still the logged one. Odd batch count: a short last window."""
    ids, _ = tokens(10)
    model = hf_gpt2()
    cb = Callback(tmp_path / "run", activations=True, graph=True)
    logged = _fit(model, _args(tmp_path, num_train_epochs=1, bf16=False, per_device_train_batch_size=2,
                               eval_strategy="no"), TokenSet(ids), None, cb)
    st = analyzer.open(tmp_path / "run").steps
    assert len(st) == 3 and len(logged) == 3     # 5 batches, accumulation 2: windows of 2, 2, 1
    np.testing.assert_allclose(st["loss"], logged, rtol=1e-7)
    sites = set(analyzer.open(tmp_path / "run").sites["name"])
    assert {"transformer.h.0.mlp.act", "transformer.h.1.mlp.act"} <= {s.split("/")[0] for s in sites}
    assert (tmp_path / "run" / "graph.json").exists()


def _small(tmp_path, cb, **kw):
    """The Net trained one epoch without evaluation; returns (model, start, logged losses, run)."""
    g = torch.Generator().manual_seed(1)
    data = Pairs(torch.randn(N, D_IN, generator=g), torch.randn(N, 1, generator=g))
    model = Net()
    start = copy.deepcopy(model)
    logged = _fit(model, _args(tmp_path, num_train_epochs=1, eval_strategy="no", bf16=False, fp16=True), data, None,
                  cb, **kw)
    run = analyzer.open(tmp_path / "run")
    assert len(run.steps) == N // B // ACC
    np.testing.assert_allclose(run.steps["loss"], logged, rtol=1e-6)
    return model, start, run


def test_hf_fp16_on_cpu_has_no_scaler_and_keeps_the_default(tmp_path):
    """``fp16=True`` on the CPU: accelerate makes no GradScaler and no autocast (float32 training), so
    the callback records before clipping without a warning: the float32 replay, exactly."""
    model, start, run = _small(tmp_path, Callback(tmp_path / "run", grads_every=1))
    norms = _check_grads(run, _replay(start, model.seen, clipped=False, dtype=None), 1e-5, 1e-7)
    assert min(norms) > 2 * CLIP


def test_hf_fp16_grad_scaler_records_after_unscaling_and_clipping(tmp_path):
    """fp16 with a GradScaler, as accelerate sets it up on a GPU: on the CPU accelerate refuses to (no
    scaler, no autocast), so the test gives its Accelerator the two things it would have made there,
    a ``torch.amp.GradScaler("cpu")`` and native AMP (fp16 autocast of the forward); the Trainer's own
    code then scales the loss, unscales and clips. The callback warns once and records the unscaled
    gradient after clipping: the replay without a scaler, to float16 tolerance."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)

    def native_fp16(trainer):
        assert trainer.accelerator.scaler is None and trainer.accelerator.mixed_precision == "fp16"
        trainer.accelerator.scaler, trainer.accelerator.native_amp = scaler, True

    model, start, run = _small(tmp_path, Callback(tmp_path / "run", grads_every=1), setup=native_fp16, warned=1)
    assert "after the Trainer's unscaling and clipping" in _fit.warnings[0]
    assert scaler.get_scale() == 2.0 ** 10 and scaler._scale is not None    # used, and no step skipped
    norms = _check_grads(run, _replay(start, model.seen, clipped=True, dtype=torch.float16), 2e-3, 1e-6)
    assert max(norms) == pytest.approx(CLIP, rel=1e-3)   # clipped, unscaled (scaled: x1024)
