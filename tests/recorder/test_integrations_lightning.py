"""The Lightning callback (bbdecoder.recorder.integrations.lightning) with the real pytorch-lightning:
one step per optimizer step under gradient accumulation, the gradient before (default) or after
clipping equal to a plain-torch replay of the same batches under the same bf16 autocast, the loss
Lightning back-propagated, epochs, no validation statistics, activation sites and the graph of the
submodule that ``training_step`` calls."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn
import pytorch_lightning as pl
from torch.nn import functional as F

from bbdecoder import analyzer
from bbdecoder.recorder import RecorderWarning
from bbdecoder.recorder.integrations.lightning import Callback

N, B, D_IN, D_H = 16, 4, 6, 8      # samples, batch, input and hidden width
ACC, CLIP, LR, EPOCHS = 2, 0.05, 0.1, 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, D_H)
        self.fc2 = nn.Linear(D_H, 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class Lit(pl.LightningModule):
    """training_step calls self.model(...), never self(...)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = Net()
        self.val_forwards = 0

    def training_step(self, batch, i):
        x, y = batch
        return F.mse_loss(self.model(x).float(), y)

    def validation_step(self, batch, i):
        self.val_forwards += 1
        x, y = batch
        return F.mse_loss(self.model(x).float(), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class Losses(pl.Callback):
    """What Lightning hands on_train_batch_end: the back-propagated loss of each batch."""

    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, i):
        self.values.append(float(outputs["loss"]))


def _data():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(N, D_IN, generator=g), torch.randn(N, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def _replay(model, data, clipped, dtype=torch.bfloat16):
    """The same training in plain torch: per optimizer step the accumulated gradient (loss / ACC per
    micro-batch, ``dtype`` autocast as Lightning's bf16-mixed / 16-mixed, no loss scaling), pre- or
    post-clipping, then SGD."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loader = torch.utils.data.DataLoader(data, batch_size=B)
    grads, losses = [], []
    for _ in range(EPOCHS):
        batches = list(loader)
        for w in range(0, len(batches), ACC):
            opt.zero_grad()
            total = 0.0
            for x, y in batches[w:w + ACC]:
                with torch.autocast("cpu", dtype=dtype):
                    loss = F.mse_loss(model(x).float(), y) / ACC
                loss.backward()
                total += loss.item()
            losses.append(total)
            if not clipped:
                grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            if clipped:
                grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
    return grads, losses


@pytest.mark.parametrize("clipped", [False, True])
def test_lightning_records_optimizer_steps_with_the_replayed_gradient(tmp_path, clipped):
    data = _data()
    lit = Lit()
    start = copy.deepcopy(lit.model)
    cb, seen = Callback(tmp_path / "run", clipped=clipped, grads_every=1, weights_every=1, activations=True,
                        graph=True), Losses()
    loader = torch.utils.data.DataLoader(data, batch_size=B)
    trainer = pl.Trainer(max_epochs=EPOCHS, accumulate_grad_batches=ACC, gradient_clip_val=CLIP,
                         precision="bf16-mixed", accelerator="cpu", devices=1, callbacks=[cb, seen],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(lit, loader, loader)
    assert not [w for w in caught if issubclass(w.category, RecorderWarning)]
    assert lit.val_forwards == EPOCHS * N // B   # validation ran, and must not show in the trace
    assert "configure_gradient_clipping" not in vars(lit)   # the clipping hook is the module's own again

    run = analyzer.open(tmp_path / "run")
    steps_per_epoch = N // B // ACC
    st = run.steps
    assert st["step"].tolist() == list(range(EPOCHS * steps_per_epoch))          # optimizer steps only
    assert st["epoch"].tolist() == [e for e in range(EPOCHS) for _ in range(steps_per_epoch)]
    grads, losses = _replay(start, data, clipped)
    # the loss: the sum of the back-propagated micro-batch losses, as Lightning reports them
    np.testing.assert_allclose(st["loss"], np.add.reduceat(seen.values, np.arange(0, len(seen.values), ACC)),
                               rtol=1e-6)
    np.testing.assert_allclose(st["loss"], losses, rtol=1e-5)
    norms = []
    for s, want in enumerate(grads):
        for name, g in want.items():
            layer, param = name.rsplit(".", 1)
            got = run.raw_tensor("grads", "model." + layer, param, s)
            np.testing.assert_allclose(got, g.numpy(), rtol=1e-5, atol=1e-7, err_msg=f"{name} step {s}")
        norms.append(float(torch.cat([g.flatten() for g in want.values()]).norm()))
    if clipped:   # what the optimizer's update used
        assert max(norms) == pytest.approx(CLIP, rel=1e-4)
    else:         # the raw gradient, above the clipping threshold
        assert min(norms) > 2 * CLIP

    # activation statistics from the training forwards only: per step 2 micro-batches of B rows
    acts = run.activation_stats()
    assert set(acts["site"]) == {"model/relu#0"}
    assert (acts.groupby("step")["count"].max() == ACC * B).all()
    graph = json.loads((tmp_path / "run" / "graph.json").read_text())
    assert [n["module"] for n in graph["nodes"] if n["op"] == "linear"] == ["model.fc1", "model.fc2"]


@pytest.mark.parametrize("clipped", [False, True])
def test_lightning_16_mixed_records_unscaled_gradients(tmp_path, clipped):
    """fp16 AMP with a GradScaler. ``Trainer(precision="16-mixed", accelerator="cpu")`` turns itself into
    bf16-mixed ("AMP with fp16 is not supported on CPU"), so the test gives Lightning the plugin it
    would make on a GPU, ``MixedPrecision("16-mixed", "cpu")`` with a ``torch.amp.GradScaler("cpu")``:
    the loss is scaled before backward, unscaled before ``on_before_optimizer_step``. The recorded
    gradients are the unscaled ones, before clipping by default (after with ``clipped=True``), equal to
    a replay under fp16 autocast without any scaler to float16 tolerance; the recorded loss is unscaled."""
    from pytorch_lightning.plugins import MixedPrecision
    data = _data()
    lit = Lit()
    start = copy.deepcopy(lit.model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    cb, seen = Callback(tmp_path / "run", clipped=clipped, grads_every=1), Losses()
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=ACC, gradient_clip_val=CLIP, accelerator="cpu",
                         devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], callbacks=[cb, seen],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(lit, torch.utils.data.DataLoader(data, batch_size=B))
    assert not [w for w in caught if issubclass(w.category, RecorderWarning)]
    assert trainer.precision_plugin.scaler is scaler and scaler._scale is not None     # the loss was scaled
    assert scaler.get_scale() == 2.0 ** 10                                               # and no step skipped
    run = analyzer.open(tmp_path / "run")
    grads, losses = _replay(start, data, clipped, dtype=torch.float16)
    grads, losses = grads[:N // B // ACC], losses[:N // B // ACC]     # one epoch
    assert run.steps["step"].tolist() == list(range(len(grads)))
    np.testing.assert_allclose(run.steps["loss"], losses, rtol=1e-3)       # unscaled (scaled: x1024)
    norms = []
    for s, want in enumerate(grads):
        for name, g in want.items():
            layer, param = name.rsplit(".", 1)
            got = run.raw_tensor("grads", "model." + layer, param, s)
            np.testing.assert_allclose(got, g.numpy(), rtol=2e-3, atol=1e-6, err_msg=f"{name} step {s}")
        norms.append(float(torch.cat([g.flatten() for g in want.values()]).norm()))
    if clipped:
        assert max(norms) == pytest.approx(CLIP, rel=1e-3)
    else:
        assert min(norms) > 2 * CLIP


def test_forward_redirection_is_not_the_models_forward(tmp_path):
    """Under DDP Lightning runs ``training_step`` as ``DDP(module)(batch, i)`` with the LightningModule's
    ``forward`` patched for that one call (``_ForwardRedirection``). That call is not the model's
    forward: the graph and the activation sites come from the submodule that runs (as without DDP),
    ``training_step`` runs once per batch (no extra forward of the redirected call), and the first
    step's activation statistics hold the whole batch. One process, the real redirection, a plain
    wrapper module in place of DDP."""
    from pytorch_lightning.strategies.strategy import _ForwardRedirection
    from bbdecoder.recorder import Recorder

    class Wrapper(nn.Module):      # what DDP's forward does with its module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            return self.module(*args)

    lit = Lit()
    calls, plain = [], lit.training_step
    lit.training_step = lambda batch, i: (calls.append(i), plain(batch, i))[1]
    wrapper, redirect = Wrapper(lit), _ForwardRedirection()
    rec = Recorder(lit, tmp_path / "run", activations=True, graph=True, grads_every=1)
    batches = list(torch.utils.data.DataLoader(_data(), batch_size=B))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, batch in enumerate(batches):
            loss = redirect(wrapper, lit, "training_step", batch, i)
            loss.backward()
            rec.step(loss)
            lit.zero_grad()
        rec.close()
    assert calls == list(range(len(batches)))
    got = [str(w.message) for w in caught if issubclass(w.category, RecorderWarning)]
    assert len(got) == 1 and "forward of the recorded model (Lit) did not run" in got[0]   # the callback expects it
    run = analyzer.open(tmp_path / "run")
    assert set(run.sites["name"]) == {"model/relu#0"}
    assert (run.activation_stats().groupby("step")["count"].max() == B).all()
    graph = json.loads((tmp_path / "run" / "graph.json").read_text())
    assert [n["module"] for n in graph["nodes"] if n["op"] == "linear"] == ["model.fc1", "model.fc2"]
