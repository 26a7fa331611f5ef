"""Small reference CNN, a synthetic image task and a training loop for demos.

Everything here is self-contained (no downloads, no files) and deterministic
given the seeds, so that ``bbdecoder demo`` and the tests can exercise the
recorder on a realistic but cheap workload (a few seconds per epoch on a CPU).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

__all__ = ["make_reference_cnn", "synthetic_images", "train", "accuracy", "run_demo", "make_tiny_gpt2",
           "make_tiny_bert", "synthetic_tokens", "make_many_tensor_mlp"]


def make_reference_cnn(num_classes: int = 10) -> nn.Module:
    """Build the reference CNN for 3x32x32 images (651,274 parameters at 10 classes).

    Dotted module names are ``features.0`` ... ``features.10`` (convs at 0, 2,
    5, 8) and ``classifier.0`` ... ``classifier.3`` (linears at 1 and 3).

    Args:
        num_classes: Number of output logits.

    Returns:
        ``nn.Sequential`` mapping images ``(N, 3, 32, 32)`` to logits
        ``(N, num_classes)``.
    """
    features = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),     # (N, 32, 32, 32)
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),    # (N, 64, 32, 32)
        nn.MaxPool2d(2),                               # (N, 64, 16, 16)
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),   # (N, 128, 16, 16)
        nn.MaxPool2d(2),                               # (N, 128, 8, 8)
        nn.Conv2d(128, 256, 3, padding=1), nn.ReLU(),  # (N, 256, 8, 8)
        nn.MaxPool2d(2),                               # (N, 256, 4, 4)
    )
    classifier = nn.Sequential(
        nn.Flatten(),                                  # (N, 4096)
        nn.Linear(256 * 4 * 4, 64), nn.ReLU(),         # (N, 64)
        nn.Linear(64, num_classes),                    # (N, num_classes)
    )
    return nn.Sequential(OrderedDict(features=features, classifier=classifier))


class _Attention(nn.Module):
    """Multi-head self-attention: one qkv projection and an output projection."""

    def __init__(self, d: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    """Transformer block: pre-LN (GPT-2: x + attn(ln(x))) or post-LN (BERT: ln(x + attn(x)))."""

    def __init__(self, d: int, heads: int, causal: bool, pre_ln: bool):
        super().__init__()
        self.pre_ln = pre_ln
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads, causal)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


def _transformer_init(m: nn.Module) -> None:
    """GPT-2 / BERT initialisation: weights of linear and embedding layers N(0, 0.02), biases 0
    (PyTorch's N(0, 1) embeddings, tied to the LM head, give logits of ~sqrt(d) and a first loss
    several times log(vocab))."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


class TinyGPT2(nn.Module):
    """GPT-2-style decoder: token + position embeddings, pre-LN causal blocks, final LN, LM head
    tied to the token embedding. Maps token ids (B, T) to logits (B, T, vocab)."""

    def __init__(self, vocab: int = 512, context: int = 64, d: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_Block(d, heads, causal=True, pre_ln=True) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.apply(_transformer_init)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln_f(x) @ self.wte.weight.t()


class TinyBERT(nn.Module):
    """BERT-style encoder: token + position + segment embeddings with LN, post-LN blocks, a tanh
    pooler on the first token and a classification head. Maps token ids (B, T) to logits (B, C)."""

    def __init__(self, vocab: int = 512, context: int = 64, d: int = 64, heads: int = 4, layers: int = 2,
                 num_classes: int = 2):
        super().__init__()
        self.tok, self.pos, self.seg = nn.Embedding(vocab, d), nn.Embedding(context, d), nn.Embedding(2, d)
        self.ln = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(_Block(d, heads, causal=False, pre_ln=False) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.classifier = nn.Linear(d, num_classes)
        self.apply(_transformer_init)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device)) + self.seg(
            (torch.arange(t, device=ids.device) >= t // 2).long())
        x = self.ln(x)
        for blk in self.blocks:
            x = blk(x)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def make_tiny_gpt2(vocab: int = 512, context: int = 64, d: int = 64, heads: int = 4, layers: int = 2) -> nn.Module:
    """A tiny GPT-2-style language model (28 parameter tensors at 2 blocks; LM head tied to ``wte``).
    Train it with ``cross_entropy(logits.flatten(0, 1), targets.flatten())`` on
    :func:`synthetic_tokens` ``(ids, next_ids)``."""
    return TinyGPT2(vocab, context, d, heads, layers)


def make_tiny_bert(vocab: int = 512, context: int = 64, d: int = 64, heads: int = 4, layers: int = 2,
                   num_classes: int = 2) -> nn.Module:
    """A tiny BERT-style sequence classifier (33 parameter tensors at 2 layers); train it with
    ``cross_entropy(logits, labels)`` on :func:`synthetic_tokens` ``(ids, labels)``."""
    return TinyBERT(vocab, context, d, heads, layers, num_classes)


def synthetic_tokens(n: int, vocab: int = 512, context: int = 64, num_classes: int = 2,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A deterministic, learnable token task: each sequence repeats a random pattern of 2 to 8 tokens
    (so the next token is predictable), with 10% of the tokens replaced at random.

    Returns:
        ``(ids, next_ids, labels)``: int64 ``(n, context)`` inputs, int64 ``(n, context)`` next-token
        targets (for :func:`make_tiny_gpt2`) and int64 ``(n,)`` classes (for :func:`make_tiny_bert`:
        whether the pattern is shorter than 5 tokens when ``num_classes`` is 2, else period mod classes).
    """
    g = torch.Generator().manual_seed(seed)
    period = torch.randint(2, 9, (n,), generator=g)
    pattern = torch.randint(0, vocab, (n, 8), generator=g)
    pos = torch.arange(context + 1)
    seq = torch.gather(pattern, 1, pos.view(1, -1) % period.view(-1, 1))
    noise = torch.rand(n, context + 1, generator=g) < 0.1
    seq = torch.where(noise, torch.randint(0, vocab, (n, context + 1), generator=g), seq)
    labels = (period < 5).long() if num_classes == 2 else period % num_classes
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous(), labels


def make_many_tensor_mlp(n_tensors: int = 150, width: int = 32) -> nn.Module:
    """An MLP of ``n_tensors // 2`` small Linear layers (weight + bias each: ``n_tensors`` parameter
    tensors of 1 KiB to 4 KiB), for timing per-parameter costs. Maps (B, width) to (B, width)."""
    mods: list[nn.Module] = []
    for _ in range(max(1, n_tensors // 2)):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods)


def synthetic_images(n: int, num_classes: int = 10, size: int = 32,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate a deterministic, learnable synthetic image classification task.

    Each image holds one Gabor-like grating patch at a random position. The
    class fixes the grating's orientation (``num_classes`` angles spread over
    180 degrees) and, for alternate classes, its spatial frequency; phase,
    position, patch width, colour, contrast and sign are random per image, and
    Gaussian pixel noise is added, so no single pixel identifies the class.

    Args:
        n: Number of images.
        num_classes: Number of classes (labels in ``[0, num_classes)``).
        size: Image height and width in pixels.
        seed: Seed of the ``torch.Generator`` used for all randomness.

    Returns:
        ``(images, labels)``: images float32 ``(n, 3, size, size)`` roughly in
        ``[-1, 1]``; labels int64 ``(n,)``.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    # Orientation (radians) from the class, with a small jitter.
    theta = labels.float() * math.pi / num_classes + (rand(n) - 0.5) * 0.2
    # Spatial frequency in cycles per pixel: two bands, alternating by class.
    freq = torch.where(labels % 2 == 0, 0.12, 0.22) * (0.9 + 0.2 * rand(n))
    phase = rand(n) * 2 * math.pi
    cy, cx = (0.25 + 0.5 * rand(n)) * size, (0.25 + 0.5 * rand(n)) * size
    width = size * (0.18 + 0.12 * rand(n))           # Gaussian envelope sigma, px

    coords = torch.arange(size, dtype=torch.float32)
    yy = coords.view(1, size, 1) - cy.view(n, 1, 1)  # (n, size, 1)
    xx = coords.view(1, 1, size) - cx.view(n, 1, 1)  # (n, 1, size)
    c, s = torch.cos(theta).view(n, 1, 1), torch.sin(theta).view(n, 1, 1)
    u = xx * c + yy * s                               # (n, size, size)
    wave = torch.cos(2 * math.pi * freq.view(n, 1, 1) * u + phase.view(n, 1, 1))
    env = torch.exp(-(xx ** 2 + yy ** 2) / (2 * width.view(n, 1, 1) ** 2))
    pattern = wave * env                              # (n, size, size) in [-1, 1]

    colour = 0.3 + 0.7 * rand(n, 3)                   # per-channel gain
    colour = colour * torch.where(rand(n, 1) < 0.5, -1.0, 1.0)
    amp = 0.4 + 0.5 * rand(n, 1)
    images = (amp * colour).view(n, 3, 1, 1) * pattern.unsqueeze(1)
    images = images + 0.2 * (rand(n, 3, 1, 1) - 0.5)  # per-channel offset
    images = images + 0.22 * torch.randn(n, 3, size, size, generator=g)
    return images.clamp_(-1.0, 1.0).float(), labels.long()


def train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
          epochs: int = 3, batch_size: int = 64, lr: float = 2e-3,
          recorder=None, seed: int = 0) -> list[float]:
    """Train ``model`` with Adam and cross-entropy.

    Per batch the order is ``loss = loss_fn(model(x), y)``,
    ``opt.zero_grad()``, ``loss.backward()``, ``recorder.step(loss=loss)``
    (if a recorder is given), ``opt.step()``; after each epoch
    ``recorder.epoch_end()``.

    Args:
        model: Module mapping ``(B, 3, H, W)`` images to ``(B, C)`` logits.
        images: Float tensor ``(N, 3, H, W)``.
        labels: Int64 tensor ``(N,)`` of class indices.
        epochs: Number of passes over the data.
        batch_size: Images per optimisation step (last batch may be smaller).
        lr: Adam learning rate.
        recorder: Optional object with ``step(loss=...)`` and ``epoch_end()``.
        seed: Seed of the ``torch.Generator`` that shuffles each epoch.

    Returns:
        Mean training loss (nats per sample) of each epoch, length ``epochs``.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    n = images.shape[0]
    history: list[float] = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x, y = images[idx], labels[idx]
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            if recorder is not None:
                recorder.step(loss=loss)
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / n)
        if recorder is not None:
            recorder.epoch_end()
    return history


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 256) -> float:
    """Classification accuracy of ``model`` in eval mode.

    Args:
        model: Module mapping ``(B, 3, H, W)`` images to ``(B, C)`` logits.
        images: Float tensor ``(N, 3, H, W)``.
        labels: Int64 tensor ``(N,)``.
        batch_size: Images per forward pass.

    Returns:
        Fraction of correct argmax predictions, in ``[0, 1]``.
    """
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size])
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum().item()
    model.train(was_training)
    return correct / max(images.shape[0], 1)


def run_demo(out: str, force: bool = False, epochs: int = 3, samples: int = 2048, seed: int = 0,
             log=lambda msg: None) -> dict:
    """Train the reference CNN on the synthetic task while recording, then write a report.

    Writes ``out/run`` (the trace) and ``out/report`` (index.html, summary.json, figures, tables).
    An earlier demo in ``out`` is replaced only with ``force=True``; nothing else in ``out`` is touched.

    Returns:
        dict with ``run`` and ``report`` (paths), ``losses`` (per-epoch mean training loss) and
        ``accuracy`` on a held-out synthetic set (fraction in [0, 1]).
    """
    import os
    import time

    from bbdecoder import analyzer
    from bbdecoder.analyzer.report import build_report

    from .recorder import Recorder

    run_dir = os.path.join(out, "run")
    report_dir = os.path.join(out, "report")
    if os.path.exists(run_dir) and not force:
        raise FileExistsError(f"{run_dir} already exists; pass force=True to replace the earlier demo")
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    images, labels = synthetic_images(samples, seed=seed)
    test_x, test_y = synthetic_images(512, seed=seed + 1)
    model = make_reference_cnn()
    log(f"training the reference CNN ({sum(p.numel() for p in model.parameters()):,} parameters) "
        f"on {samples} synthetic images for {epochs} epochs, recording into {run_dir}")
    with Recorder(model, run_dir, grads_every=1, weights_every=10, activations=True, activations_every=20,
                  overwrite=force) as rec:
        losses = train(model, images, labels, epochs=epochs, recorder=rec, seed=seed)
    acc = accuracy(model, test_x, test_y)
    log("epoch losses: " + ", ".join(f"{v:.3f}" for v in losses) + f"; held-out accuracy {acc:.1%}")
    run = analyzer.open(run_dir)
    os.makedirs(report_dir, exist_ok=True)
    build_report(run, report_dir)
    log(f"done in {time.perf_counter() - t0:.1f} s")
    return {"run": run_dir, "report": os.path.join(report_dir, "index.html"), "losses": losses,
            "accuracy": acc}
