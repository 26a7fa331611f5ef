"""The framework callbacks under torch.distributed (issue 15): two gloo processes on the CPU, started as
torchrun starts them (MASTER_ADDR/PORT, WORLD_SIZE, RANK, LOCAL_RANK, TORCHELASTIC_RUN_ID), so that
Lightning (``strategy="ddp"`` and FSDP2 through ``ModelParallelStrategy``) and the HF Trainer
(``ddp_backend="gloo"``) join the process group without spawning.

Every rank writes its rank directory: under DDP gradients and weights on rank 0 only (``record_rank``),
steps, losses and activations on every rank; under FSDP2 every rank its slice of every parameter. The
number of steps is the number of optimizer steps (accumulation 2), each rank's loss is its own, and
the recorded gradients equal a plain-torch replay of the batches both ranks saw: per step the mean
over ranks of each rank's accumulated gradient (what DDP's all-reduce and FSDP2's reduce-scatter
give), before clipping. FSDP1 (Lightning's ``FSDPStrategy``) is refused on the CPU by Lightning
itself ("requires a GPU accelerator") and by the Recorder (see test_fsdp.py)."""

from __future__ import annotations

import helpers

import json
import os
import textwrap

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder import analyzer

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("this torch build has no torch.distributed gloo backend", allow_module_level=True)

#: what the workers and the replay share: sizes, the model and the data
COMMON = textwrap.dedent(r"""
    N, B, ACC, CLIP, LR, EPOCHS = 16, 2, 2, 0.05, 0.1, 2    # N samples in all, B per rank and micro-batch

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 5)      # 5 rows: FSDP2 slices of 3 and 2
            self.fc2 = nn.Linear(5, 1)      # 1 row: rank 1's slice is empty

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x)))

    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(N, 6, generator=g), torch.randn(N, 1, generator=g)
""")

HEAD = textwrap.dedent(r"""
    import json, os, sys, warnings
    os.environ.setdefault("TORCHELASTIC_RUN_ID", "bbdecoder-test")   # torchrun sets it: an external launcher
    import numpy as np
    import torch
    from torch import nn
    from torch.nn import functional as F
    from bbdecoder.recorder import RecorderWarning
    out, rank = sys.argv[1], int(os.environ["RANK"])

    def save(name, seen, info, caught):
        info["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RecorderWarning)]
        np.save(os.path.join(out, f"{name}-seen-{rank}.npy"), torch.stack(seen).numpy())
        with open(os.path.join(out, f"{name}-info-{rank}.json"), "w") as f:
            json.dump(info, f)
""")

LIGHTNING = HEAD + COMMON + textwrap.dedent(r"""
    import pytorch_lightning as pl
    from pytorch_lightning.strategies import ModelParallelStrategy
    from bbdecoder.recorder.integrations.lightning import Callback

    class Lit(pl.LightningModule):
        def __init__(self, shard):
            super().__init__()
            torch.manual_seed(0)
            self.model, self.shard, self.seen = Net(), shard, []

        def configure_model(self):          # ModelParallelStrategy: FSDP2 over the data-parallel mesh
            if self.shard:
                from torch.distributed.fsdp import fully_shard
                mesh = self.device_mesh["data_parallel"]
                fully_shard(self.model.fc1, mesh=mesh)
                fully_shard(self.model, mesh=mesh)

        def training_step(self, batch, i):   # once per micro-batch: the graph's extra forwards run self.model
            x, y = batch
            self.seen.append(torch.cat([x, y], 1))
            return F.mse_loss(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=B)
    for name in ("ddp", "fsdp2"):
        strategy = "ddp" if name == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        lit = Lit(shard=name == "fsdp2")
        cb = Callback(os.path.join(out, name), grads_every=1, weights_every=1, activations=True, graph=True)
        trainer = pl.Trainer(max_epochs=EPOCHS, accumulate_grad_batches=ACC, gradient_clip_val=CLIP,
                             accelerator="cpu", devices=2, strategy=strategy, callbacks=[cb], logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(lit, loader)
        save(name, lit.seen, {"rank": cb.recorder.rank, "world": cb.recorder.world_size,
                              "environment": type(trainer.strategy.cluster_environment).__name__}, caught)

    # FSDP1 as Lightning's FSDPStrategy makes it (FSDP(LightningModule), no auto-wrap policy: no FSDP
    # module inside the LightningModule). Lightning will not run it on the CPU, so the callback's
    # train-start hook is handed that wrapper as trainer.strategy.model.
    from types import SimpleNamespace
    from torch.distributed.fsdp import FullyShardedDataParallel
    from bbdecoder.recorder.distributed import uses_fsdp1
    lit = Lit(shard=False)
    wrapped = FullyShardedDataParallel(lit, device_id=torch.device("cpu"), use_orig_params=True)
    cb = Callback(os.path.join(out, "fsdp1"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb.on_train_start(SimpleNamespace(strategy=SimpleNamespace(model=wrapped)), lit)
        cb.on_train_end(None, lit)
    save("fsdp1", [torch.zeros(1)], {"inner_fsdp": uses_fsdp1(lit), "names": [L.name for L in cb.recorder.layers]},
         caught)
""")

HF = HEAD + COMMON + textwrap.dedent(r"""
    import transformers
    from bbdecoder.recorder.integrations.hf import Callback

    class HFNet(Net):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x, labels):
            if self.training and torch.is_grad_enabled():   # not the graph's extra forwards (no_grad)
                self.seen.append(torch.cat([x, labels], 1).detach().clone())
            out = super().forward(x)
            return {"loss": F.mse_loss(out, labels), "logits": out}

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "labels": self.y[i]}

    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, "hf"), per_device_train_batch_size=B, gradient_accumulation_steps=ACC,
        num_train_epochs=EPOCHS, learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=CLIP, use_cpu=True, ddp_backend="gloo", logging_steps=1, report_to=[], save_strategy="no",
        eval_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    torch.manual_seed(0)
    model = HFNet()
    cb = Callback(os.path.join(out, "hf-run"), grads_every=1, weights_every=1, activations=True, graph=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Pairs(*data()), callbacks=[cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    save("hf", model.seen, {"rank": cb.recorder.rank, "world": cb.recorder.world_size,
                            "wrapper": type(trainer.model_wrapped).__name__,
                            "logged": [h["loss"] for h in trainer.state.log_history if "loss" in h]}, caught)

    # FSDP2: accelerate runs FSDP on accelerators only (on the CPU it drops the fsdp plugin and the
    # Trainer uses DDP), so the callback is driven here as the Trainer drives it, on a model sharded
    # by fully_shard: its hooks, its events, accumulation windows marked in accelerate's GradientState.
    from accelerate.state import GradientState
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    model = HFNet()
    fully_shard(model.fc1)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    cb = Callback(os.path.join(out, "fsdp2-run"), grads_every=1, weights_every=1, activations=True, graph=True)
    state, control = transformers.TrainerState(), transformers.TrainerControl()
    x, y = data()
    mine = torch.arange(rank, N, 2)                    # a distributed sampler's share of every epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb.on_train_begin(args, state, control, model=model)
        for epoch in range(EPOCHS):
            for i, idx in enumerate(mine.split(B)):
                GradientState()._set_sync_gradients(i % ACC == ACC - 1)
                (model(x[idx], y[idx])["loss"] / ACC).backward()
                if i % ACC == ACC - 1:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                    cb.on_pre_optimizer_step(args, state, control)
                    opt.step()
                    opt.zero_grad()
            cb.on_epoch_end(args, state, control)
        cb.on_train_end(args, state, control)
    save("fsdp2", model.seen, {"sharded": type(next(model.parameters())).__name__}, caught)
""")

ns: dict = {"torch": torch, "nn": nn, "F": F}
exec(COMMON, ns)
N, B, ACC, CLIP, LR, EPOCHS = (ns[k] for k in ("N", "B", "ACC", "CLIP", "LR", "EPOCHS"))
STEPS = EPOCHS * N // (2 * B * ACC)      # optimizer steps: 2 ranks, accumulation ACC


def _workers(tmp_path_factory, name, source):
    tmp = tmp_path_factory.mktemp(name)
    script = tmp / "worker.py"
    script.write_text(source)
    helpers.run_gloo_workers(script, [tmp], tmp, timeout=180, what=f"{name} workers")
    return tmp


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    """Lightning DDP then FSDP2 in the same two processes; the folder with runs ddp/ and fsdp2/."""
    return _workers(tmp_path_factory, "lightning", LIGHTNING)


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    return _workers(tmp_path_factory, "hf", HF)


def _seen(d, name):
    """Per rank the micro-batches the rank trained on: (n_micro, B, 7) = x (6 columns) and y."""
    return [np.load(d / f"{name}-seen-{r}.npy") for r in (0, 1)]


def replay(seen):
    """Plain torch: per optimizer step each rank's gradient accumulated over its ACC micro-batches
    (loss / ACC), averaged over the ranks (DDP's all-reduce), clipped to CLIP, then SGD.

    Returns:
        per step {name: gradient before clipping}, {name: weight used}, [loss of rank 0, rank 1],
        and the ReLU outputs of both ranks' micro-batches (2 * ACC * B rows, 5 units).
    """
    torch.manual_seed(0)
    net = ns["Net"]()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    out = []
    for w in range(0, len(seen[0]), ACC):
        weights = {n: p.detach().clone() for n, p in net.named_parameters()}
        grads, losses, relu = [], [], []
        for s in seen:
            net.zero_grad()
            total = 0.0
            for mb in torch.from_numpy(np.ascontiguousarray(s[w:w + ACC])):
                x, y = mb[:, :6], mb[:, 6:]
                loss = F.mse_loss(net(x), y) / ACC
                loss.backward()
                total += loss.item()
                relu.append(F.relu(net.fc1(x)).detach())
            grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
            losses.append(total)
        mean = {n: (grads[0][n] + grads[1][n]) / 2 for n in grads[0]}
        for n, p in net.named_parameters():
            p.grad = mean[n].clone()
        torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
        opt.step()
        out.append((mean, weights, losses, torch.cat(relu).numpy()))
    return out


def _rank_steps(run_dir, r):
    """(steps, losses) of one rank's step tables, read from its shards."""
    st, loss = [], []
    d = run_dir / f"rank-{r:05d}"
    for n in sorted(x for x in os.listdir(d) if x.endswith(".h5")):
        with h5py.File(d / n, "r") as f:
            st += f["steps/step"][()].tolist()
            loss += f["steps/loss"][()].tolist()
    return st, loss


def _check_seen(seen):
    """The ranks trained on disjoint halves of every epoch (a distributed sampler), ACC * STEPS / EPOCHS
    micro-batches of B each per epoch and rank."""
    x, _ = ns["data"]()
    per_epoch = len(seen[0]) // EPOCHS
    assert [s.shape for s in seen] == [(EPOCHS * per_epoch, B, 7)] * 2 and per_epoch * 2 * B == N
    for e in range(EPOCHS):
        rows = np.concatenate([s[e * per_epoch:(e + 1) * per_epoch].reshape(-1, 7) for s in seen])
        np.testing.assert_array_equal(np.sort(rows[:, 0]), np.sort(x[:, 0].numpy()))


def _check_run(run_dir, seen, prefix, site, sharded):
    """The trace of a two-rank run against the replay of what the ranks saw."""
    want = replay(seen)
    assert len(want) == STEPS
    run = analyzer.open(run_dir)
    assert run.status == "complete" and run.problems == [] and run.ranks == [0, 1]
    assert sorted(os.listdir(run_dir)) == ["graph.json", "manifest.json", "rank-00000", "rank-00001"]
    rt = run.rank_table()
    assert rt["steps"].tolist() == [STEPS, STEPS] and rt["status"].tolist() == ["complete"] * 2
    # record_rank=0: replicated tensors on rank 0 only; sharded ones on every rank (its slice)
    assert rt["grads"].tolist() == [True, sharded] and rt["weights"].tolist() == [True, sharded]
    assert rt["activations"].tolist() == [True, True]
    assert run.steps["step"].tolist() == list(range(STEPS))
    assert run.steps["epoch"].tolist() == [e for e in range(EPOCHS) for _ in range(STEPS // EPOCHS)]
    for r in (0, 1):   # every rank its own loss: the sum of its back-propagated micro-batch losses
        st, loss = _rank_steps(run_dir, r)
        assert st == list(range(STEPS))
        np.testing.assert_allclose(loss, [w[2][r] for w in want], rtol=1e-6)
    assert [L["name"] for L in run.catalog.layers] == [prefix + "fc1", prefix + "fc2"]
    norms = []
    gs = run.grad_stats()
    for s, (grads, weights, _, relu) in enumerate(want):
        for name, g in grads.items():
            layer, param = name.rsplit(".", 1)
            got = run.raw_tensor("grads", prefix + layer, param, s)   # sharded: put together from both ranks
            np.testing.assert_allclose(got, g.numpy(), rtol=1e-5, atol=1e-7, err_msg=f"{name} step {s}")
            np.testing.assert_allclose(run.raw_tensor("weights", prefix + layer, param, s), weights[name].numpy(),
                                       rtol=1e-5, atol=1e-7, err_msg=f"weight {name} step {s}")
            row = gs[(gs["step"] == s) & (gs["layer"] == prefix + layer) & (gs["param"] == param)]
            assert len(row) == 1   # the statistics of the whole parameter, merged over the slices if sharded
            assert float(row["l2"].iloc[0]) == pytest.approx(float(g.double().norm()), rel=1e-5)
            assert float(row["max_abs"].iloc[0]) == pytest.approx(float(g.abs().max()), rel=1e-5)
        norms.append(float(torch.cat([g.flatten() for g in grads.values()]).norm()))
        # activation statistics pooled over both ranks' micro-batches of the step
        a = run.activation_stats(sites=site, steps=[s]).sort_values("unit")
        assert (a["count"] == 2 * ACC * B).all()
        np.testing.assert_allclose(a["mean"], relu.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a["max"], relu.max(0), rtol=1e-5, atol=1e-7)
    assert min(norms) > 2 * CLIP        # before clipping: the clipping threshold is not what was recorded
    graph = json.loads((run_dir / "graph.json").read_text())   # from the module that ran under the wrapper
    assert [n["module"] for n in graph["nodes"] if n["op"] == "linear"] == [prefix + "fc1", prefix + "fc2"]
    return run


@pytest.mark.parametrize("name", ["ddp", "fsdp2"])
def test_lightning_ranks_record_the_all_reduced_gradient(lightning_runs, name):
    for r in (0, 1):
        info = json.loads((lightning_runs / f"{name}-info-{r}.json").read_text())
        assert info == {"rank": r, "world": 2, "environment": "TorchElasticEnvironment", "warnings": []}
    seen = _seen(lightning_runs, name)
    _check_seen(seen)
    run = _check_run(lightning_runs / name, seen, "model.", "model/relu#0", sharded=name == "fsdp2")
    if name == "fsdp2":   # dim-0 slices: fc1 (5 rows) as 3 + 2, fc2 (1 row) as 1 + 0
        assert all(q["shard_dim"] == 0 for L in run.catalog.layers for q in L["params"])


def test_lightning_fsdp1_is_refused_not_misrecorded(lightning_runs):
    """FSDPStrategy wraps the LightningModule itself; the callback gives the Recorder that wrapper, so
    the Recorder's FSDP1 refusal (one warning, no gradients or weights) applies instead of recording the
    flat-parameter views of the inner module as if they were the parameters."""
    for r in (0, 1):
        info = json.loads((lightning_runs / f"fsdp1-info-{r}.json").read_text())
        assert info["inner_fsdp"] is False and info["names"] == ["model.fc1", "model.fc2"]
        assert len(info["warnings"]) == 1 and "(FSDP1) is not supported" in info["warnings"][0], info


def test_hf_trainer_ranks_record_the_all_reduced_gradient(hf_runs):
    infos = [json.loads((hf_runs / f"hf-info-{r}.json").read_text()) for r in (0, 1)]
    for r, info in enumerate(infos):
        assert (info["rank"], info["world"], info["wrapper"], info["warnings"]) == (r, 2, "DistributedDataParallel", [])
    seen = _seen(hf_runs, "hf")
    _check_seen(seen)
    run_dir = hf_runs / "hf-run"
    _check_run(run_dir, seen, "", "/relu#0", sharded=False)
    # the Trainer logs the mean over ranks of the per-rank loss each rank recorded
    losses = np.array([_rank_steps(run_dir, r)[1] for r in (0, 1)])
    np.testing.assert_allclose(infos[0]["logged"], losses.mean(0), rtol=1e-6)


def test_hf_callback_under_fsdp2_records_the_merged_slices(hf_runs):
    """FSDP2 computes the gradients on unsharded copies and hands each rank its reduce-scattered slice:
    no gradient reaches the sharded parameters through autograd, and the step is still recorded at
    the end of the backward pass, after the reduce-scatter, each rank its slice."""
    for r in (0, 1):
        info = json.loads((hf_runs / f"fsdp2-info-{r}.json").read_text())
        assert info == {"sharded": "DTensor", "warnings": []}
    seen = _seen(hf_runs, "fsdp2")
    _check_seen(seen)
    _check_run(hf_runs / "fsdp2-run", seen, "", "/relu#0", sharded=True)
