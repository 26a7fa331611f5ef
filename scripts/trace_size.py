"""Trace size per step and per 100,000 steps at default settings, computed from the format.

Every figure comes from what the recorder writes (docs/trace-format.md), not from a guess:

* activation sites: found by the recorder's own :class:`ActivationTracker` on the model (the reference
  CNN on the CPU; GPT-2 small and a 7B model built on the ``meta`` device, so no memory is used), with
  ``activations=True``; their declared statistics ``{stat: shape}`` give the bytes of one row
  (float64 values, int32 near-bound counts, stored flat: one int64 step per row and dtype;
  :func:`recorder.act_window.row_bytes`), and the
  ``activation_window="auto"`` rule (1 MiB per step and rank) gives N;
* gradient statistics: one row of ``len(GRAD_STAT_FIELDS)`` float64 values per parameter tensor and
  one int64 step for all of them (the packed layout, ``/packed/grad_stats``), every step
  (``grad_stats_every=1``), on every rank that holds a slice (FSDP2);
* raw gradients and weight snapshots: float32 every 50 steps (``grads_every=50``,
  ``weights_every=50``), each rank its slice (FSDP2: 1/world of the elements), stored flat (one row of
  all tensors and one int64 step per snapshot, ``/flat/<kind>``);
* the indexes of the packed and flat groups (UTF-8 JSON of every tensor's or statistic's keys, attributes and place,
  built by the writer's own encoders) once per shard and kind, a shard every 100 steps (``flush_steps``;
  a job whose steps take longer than ``flush_secs / 100`` = 0.1 s closes shards more often: more index bytes);
* raw activation samples: the first 8 inputs (``activation_samples=8``) of every site, float32 and an
  int64 step per row, every 50 steps (``activations_every=50``), under the byte budget
  ``activation_sample_bytes`` (32 MiB per capture step and rank): the recorder's own plan
  (:func:`recorder.sample_budget.allocate`: sites over their share keep fewer inputs, then one input
  strided along the non-unit axes); the unbudgeted figure is printed below the table;
* the step table: step, epoch (int64), loss, time (float64), dropped (int32).

HDF5 overhead (object headers, chunk indices) is not counted.

Assumptions: GPT-2 small runs eager attention, so the attention softmax (``F.softmax`` over
(B, heads, T, T)) is a recorded functional site (unit axis 1: one unit per head, a 200-bin
histogram of each row's largest probability); its MLP activation is ``nn.GELU(approximate="tanh")``
(Hugging Face's ``NewGELUActivation`` computes ``torch.tanh`` inside a plain module: the recorder
would see a tanh site with a 200-bin histogram per unit, 3072 x 200 x 8 bytes = 4.9 MB per layer per
row). Sequence lengths 1024 (GPT-2) and 4096 (7B); a per-rank batch of at least 8 sequences. The 7B
model is Llama-2-7B-like (32 layers, d = 4096, 32 heads, SwiGLU MLP of 11008 with ``F.silu``,
RMSNorm, untied 32000-token embeddings), trained with FSDP2 on 64 ranks: every rank records every
parameter tensor's gradient-statistics row (of its slice) and 1/64 of the raw elements.

Usage: ``python scripts/trace_size.py`` (prints a markdown table).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.packed import FlatLayout, encode_index
from bbdecoder.recorder.act_window import STAT_ITEMSIZES, ActivationWindow, row_bytes
from bbdecoder.recorder.activations import ActivationTracker
from bbdecoder.recorder.sample_budget import DEFAULT_SAMPLE_BYTES, allocate, plan_bytes, sample_rows_bytes
from bbdecoder.recorder.demo import make_reference_cnn

STEPS = 100_000
RAW_EVERY = 50               # grads_every, weights_every, activations_every defaults
SAMPLES = 8                  # activation_samples default
F32, F64, I64 = 4, 8, 8
STEP_TABLE = 8 + 8 + 8 + 8 + 4   # step, epoch, loss, time, dropped
SHARD_STEPS = 100            # flush_steps default


class Block(nn.Module):
    """A pre-norm transformer block: eager attention (F.softmax) and an MLP."""

    def __init__(self, d, heads, hidden, swiglu):
        super().__init__()
        self.heads, self.swiglu = heads, swiglu
        self.n1 = nn.RMSNorm(d) if swiglu else nn.LayerNorm(d)
        self.n2 = nn.RMSNorm(d) if swiglu else nn.LayerNorm(d)
        if swiglu:   # Llama: q, k, v, o without bias; gate, up, down
            self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
            self.gate, self.up = nn.Linear(d, hidden, bias=False), nn.Linear(d, hidden, bias=False)
            self.down = nn.Linear(hidden, d, bias=False)
        else:        # GPT-2: c_attn (qkv), c_proj; c_fc, GELU, c_proj
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.act, self.out = nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.n1(x)
        q, k, v = (self.q(h), self.k(h), self.v(h)) if self.swiglu else self.qkv(h).split(d, -1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        a = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + (self.o(a) if self.swiglu else self.proj(a))
        h = self.n2(x)
        return x + (self.down(F.silu(self.gate(h)) * self.up(h)) if self.swiglu else self.out(self.act(self.fc(h))))


class LM(nn.Module):
    def __init__(self, vocab, ctx, d, heads, hidden, layers, swiglu):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = None if swiglu else nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads, hidden, swiglu) for _ in range(layers))
        self.norm = nn.RMSNorm(d) if swiglu else nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if not swiglu:
            self.head.weight = self.tok.weight   # GPT-2 ties the output layer to the embedding

    def forward(self, ids):
        x = self.tok(ids) + (self.pos(torch.arange(ids.shape[1], device=ids.device)) if self.pos is not None else 0)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def sites_of(model, example) -> list[dict]:
    """The activation sites the recorder finds on ``model`` (``activations=True``): their manifest entries."""
    model.train()
    plain = torch.is_autocast_enabled
    if example.device.type == "meta":   # shapes only: autocast has no "meta" device type
        torch.is_autocast_enabled = lambda *a: False if a and a[0] == "meta" else plain(*a)
    tr = ActivationTracker(model, True)
    try:
        with torch.no_grad():
            model(example)
        if tr.error is not None:
            raise RuntimeError(f"activation capture failed: {tr.error}")
        return [s.meta for s in tr.sites.values()]
    finally:
        tr.remove()
        torch.is_autocast_enabled = plain


def index_bytes(model, world=1) -> tuple[int, int]:
    """(bytes of the packed gradient-statistics index, of one flat snapshot index) of one shard: the
    writer's own encoders on every parameter tensor's keys and attributes (an FSDP2 slice also carries
    ``offset`` and ``global_shape``; its local shape is 1/world of dim 0)."""
    keys, attrs, entries, off = [], [], [], 0
    named = list(model.named_parameters())
    for i, (name, p) in enumerate(named):
        lk, _, pk = name.rpartition(".")
        shape = list(p.shape)
        a = {"layer": lk, "layer_id": i, "param": pk}
        if world > 1 and shape:
            shape[0] = math.ceil(shape[0] / world)
            a.update(offset=shape[0] * (world - 1), global_shape=list(p.shape))
        n = math.prod(shape)
        keys.append((fmt.sanitize(lk), pk))
        attrs.append(a)
        entries.append((fmt.sanitize(lk), pk, off, n, tuple(shape), a))
        off += n
    return (len(encode_index(fmt.KIND_GRAD_STATS, tuple(keys), attrs)), len(FlatLayout(entries).index()))


def act_index_bytes(sites, window: bool) -> int:
    """Bytes of the flat activation-statistics indexes of one shard (``/flat/act_stats``: one for the
    float64 statistics, one for the int32 near-bound counts), by the writer's own encoder."""
    groups: dict = {}
    for S in sites:
        stats = dict(S["stats"])
        if window:
            stats.setdefault(fmt.SITE_WINDOW_STAT, [])
        for k, shp in stats.items():
            e = groups.setdefault(k in STAT_ITEMSIZES, [])
            start = e[-1][2] + e[-1][3] if e else 0
            e.append((S["key"], k, start, math.prod(shp), tuple(shp), None))
    return sum(len(FlatLayout(e).index()) for e in groups.values())


def sizes(name, model, example, world=1) -> dict:
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    sites = sites_of(model, example)
    n = ActivationWindow("auto").choose(sites)
    act_row = row_bytes(sites, window=n > 1)
    grad_row = len(params) * len(fmt.GRAD_STAT_FIELDS) * F64 + I64   # packed: one step index per row
    raw = 2 * (math.ceil(P / world) * F32 + I64)                        # grads + weights flat, per snapshot
    unbudgeted = sum(sample_rows_bytes(SAMPLES, S["sample_shape"]) for S in sites)
    plans = allocate(sites, SAMPLES, DEFAULT_SAMPLE_BYTES)
    samples = sum(plan_bytes(S["sample_shape"], plans[S["key"]]) for S in sites)
    cut = sorted({(plans[S["key"]][0], S["kind"], tuple(S["sample_shape"]), plans[S["key"]][1]) for S in sites
                  if plans[S["key"]] != (SAMPLES, (1,) * len(S["sample_shape"]))}, key=str)
    gidx, fidx = index_bytes(model, world)
    per_step = {"step table": STEP_TABLE, "grad stats": grad_row, "act stats": act_row / n,
                "raw grads+weights": raw / RAW_EVERY, "act samples": samples / RAW_EVERY,
                "indexes": (gidx + 2 * fidx + act_index_bytes(sites, n > 1)) / SHARD_STEPS}
    return {"model": name, "params": P, "tensors": len(params), "units": sum(S["units"] for S in sites),
            "sites": len(sites), "N": n, "act_row": act_row, "per_step": per_step, "world": world,
            "unbudgeted": unbudgeted, "capture": samples, "cut": cut}


def human(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(b) < 1000 or unit == "PB":
            return f"{b:.3g} {unit}" if unit != "B" else f"{b:.0f} B"
        b /= 1000


def main() -> None:
    torch.manual_seed(0)
    rows = [sizes("reference CNN (demo)", make_reference_cnn(), torch.randn(8, 3, 32, 32))]
    with torch.device("meta"):
        gpt2 = LM(50257, 1024, 768, 12, 3072, 12, swiglu=False)
        llama = LM(32000, 4096, 4096, 32, 11008, 32, swiglu=True)
    rows.append(sizes("GPT-2 small, T=1024", gpt2, torch.zeros(8, 1024, dtype=torch.long, device="meta")))
    rows.append(sizes("7B (Llama-2-like), T=4096, FSDP2 x64, per rank", llama,
                      torch.zeros(8, 4096, dtype=torch.long, device="meta"), world=64))
    cols = ["step table", "grad stats", "act stats", "raw grads+weights", "act samples", "indexes"]
    print("| model | params | param tensors | act sites / units | window N | act row |"
          + "".join(f" {c} /step |" for c in cols) + " total /step | total /100k steps |")
    print("|" + " --- |" * (7 + len(cols) + 1))
    for r in rows:
        ps = r["per_step"]
        tot = sum(ps.values())
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['tensors']} | {r['sites']} / {r['units']:,} | "
              f"{r['N']} | {human(r['act_row'])} |" + "".join(f" {human(ps[c])} |" for c in cols)
              + f" {human(tot)} | {human(tot * STEPS)} |")
    print("\nWithout windows (N = 1) the activation statistics would be, per step: "
          + "; ".join(f"{r['model']}: {human(r['act_row'])}" for r in rows))
    print(f"Raw activation samples per capture step (every {RAW_EVERY} steps) under activation_sample_bytes = "
          f"{DEFAULT_SAMPLE_BYTES >> 20} MiB, and without a budget (activation_sample_bytes=None): "
          + "; ".join(f"{r['model']}: {human(r['capture'])} (without: {human(r['unbudgeted'])}, "
                      f"{human(r['unbudgeted'] / RAW_EVERY)} per step)" for r in rows))
    for r in rows:
        for rows_, kind, shape, strides in r["cut"]:
            print(f"  {r['model']}: {kind} sites of output {shape} keep {rows_} input(s)"
                  + (f", strides {strides}" if any(x > 1 for x in strides) else ""))
    print("Without raw activation samples (activation_samples=0), per 100k steps: "
          + "; ".join(f"{r['model']}: {human((sum(r['per_step'].values()) - r['per_step']['act samples']) * STEPS)}"
                      for r in rows))


if __name__ == "__main__":
    main()
