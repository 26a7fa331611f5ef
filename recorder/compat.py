"""The BBDecoder 1.x API on top of the 2.x recorder and analyzer.

``Master_analyzer(model, save_path, input_size)`` keeps the 1.x names and arguments. Underneath, a
:class:`recorder.Recorder` writes a trace to ``save_path/trace`` and every figure and number is read
back from that trace with the analyzer, so 1.x code gets the 2.x figures.

Layer ids are the 1.x ids: the model's top-level children in definition order get ids 0, 1, 2, ...
(a model without children is layer 0). A 1.x layer covers every parameter-owning module below that
child, i.e. one or more rows of the recorder's layer table (``Recorder.layers``, ids in
``named_modules`` order); :attr:`Master_analyzer.layer_map` is that mapping, and the 1.x gradient
numbers of a layer pool all of its parameters (mean |g| = sum |g| / count, max |g|, L1 = sum |g|,
L2 = sqrt(sum g^2)).

An iteration is one ``backward_propagation`` call (one ``Recorder.step``); an epoch ends at each
``save_collected_grads`` call.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import torch

from bbdecoder.analyzer.trace import format as fmt

from .features import capture_features, layer_output
from .recorder import Recorder
from .schedules import as_schedule

if TYPE_CHECKING:   # the analysis stack is imported inside the methods that use it
    import pandas as pd

__all__ = ["Master_analyzer"]

GRAD_COLUMNS = ["iteration", "epoch", "layer_id", "layer", "mean_abs", "max_abs", "l1", "l2", "var", "count"]


class Master_analyzer:  # noqa: N801 - the 1.x name
    """BBDecoder 1.x entry point.

    Args:
        model: the ``torch.nn.Module`` being trained.
        save_path: folder of this analysis: the trace goes to ``save_path/trace``, figures default to
            ``save_path/figures``.
        input_size: input shape without the batch axis, e.g. ``(3, 32, 32)`` (used by :meth:`summary`
            and :meth:`layer_costs` when no forward pass has run yet).
        weights_every: weight snapshots every n iterations (1.x histograms and pruning read the last one).
        overwrite: replace an earlier trace in ``save_path/trace``.
        recorder_kwargs: further :class:`recorder.Recorder` arguments.
    """

    def __init__(self, model: torch.nn.Module, save_path: str | os.PathLike, input_size: Iterable[int] = None,
                 *, weights_every: Any = 10, overwrite: bool = False, **recorder_kwargs):
        if not isinstance(model, torch.nn.Module):
            raise TypeError("model must be a torch.nn.Module")
        self.model = model
        self.save_path = os.path.abspath(os.fspath(save_path))
        self.input_size = tuple(int(s) for s in input_size) if input_size is not None else None
        children = list(model.named_children()) or [("", model)]
        self.layers = [(i, n, m) for i, (n, m) in enumerate(children)]
        os.makedirs(self.save_path, exist_ok=True)
        self.run_dir = os.path.join(self.save_path, "trace")
        recorder_kwargs.setdefault("graph", True)
        self.rec = Recorder(model, self.run_dir, grads_every=1, weights_every=as_schedule(weights_every),
                            overwrite=overwrite, **recorder_kwargs)
        table = self.rec.layers
        #: 1.x layer id -> recorder layer ids (the parameter-owning modules below that child)
        self.layer_map = {i: [L.id for L in table if not n or L.name == n or L.name.startswith(n + ".")]
                          for i, n, _ in self.layers}
        self._collect: dict[int, set | None] = {}
        self._epoch_start = 0
        self._epochs_done = 0

    # ------------------------------------------------------------------ helpers
    def _ids(self, layer_inds: Any) -> list[int]:
        if layer_inds is None:
            return [i for i, _, _ in self.layers]
        if isinstance(layer_inds, (int, np.integer)):
            layer_inds = [layer_inds]
        out = []
        for i in layer_inds:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(self.layers):
                raise ValueError(f"layer index {i!r} out of range: the model has layers 0..{len(self.layers) - 1} "
                                 "(see summary())")
            out.append(int(i))
        return out

    def _name(self, i: int) -> str:
        return self.layers[i][1]

    def _folder(self, save_folder: Any) -> str:
        d = os.path.abspath(os.fspath(save_folder)) if save_folder is not None else os.path.join(self.save_path,
                                                                                                 "figures")
        os.makedirs(d, exist_ok=True)
        return d

    def _run(self):
        from bbdecoder import analyzer
        self.rec.flush()
        return analyzer.open(self.run_dir)

    def summary(self) -> str:
        """The 1.x layer summary: id, name, type and parameter count of each top-level layer."""
        rows = [("id", "name", "type", "params")]
        for i, n, m in self.layers:
            rows.append((str(i), n or "(model)", type(m).__name__, f"{sum(p.numel() for p in m.parameters()):,}"))
        w = [max(len(r[k]) for r in rows) for k in range(4)]
        return "\n".join("  ".join([r[0].rjust(w[0]), r[1].ljust(w[1]), r[2].ljust(w[2]), r[3].rjust(w[3])])
                         for r in rows)

    # ------------------------------------------------------------------ training loop (1.x)
    def forward_propagation(self, x: Any) -> Any:
        """``model(x)``; the first call also records the function graph (FLOPs, time per layer)."""
        return self.model(*x) if isinstance(x, tuple) else self.model(x)

    def backward_propagation(self, loss: torch.Tensor, collect_grads: bool = True, layer_inds: Any = None) -> None:
        """``loss.backward()`` and record the iteration's gradients (call ``optimizer.step()`` after).

        Args:
            loss: scalar loss tensor.
            collect_grads: include this iteration in the 1.x gradient figures and numbers.
            layer_inds: 1.x layer ids to collect (None: every layer).
        """
        ids = self._ids(layer_inds)
        loss.backward()
        self._collect[self.rec.step_index] = set(ids) if collect_grads else set()
        self.rec.step(loss.detach())

    # ------------------------------------------------------------------ numbers
    def grad_stats(self, epoch: int | None = None) -> pd.DataFrame:
        """Per collected iteration and 1.x layer: mean |g|, max |g|, L1, L2 (and var, count) of the
        gradient, pooled over the layer's parameters, from the trace.

        Args:
            epoch: only iterations of this epoch (epochs end at save_collected_grads); None = all.

        Returns:
            DataFrame with columns iteration, epoch, layer_id (1.x id), layer, mean_abs, max_abs, l1, l2,
            var (population, ddof 0) and count, in gradient units (var squared).
        """
        from bbdecoder.analyzer.gradients import pool_params
        run = self._run()
        df = run.grad_stats(per="step", by="param")
        to_x = {rid: i for i, rids in self.layer_map.items() for rid in rids}
        df = df[df["layer_id"].isin(list(to_x))].copy()
        df["layer_id"] = df["layer_id"].map(to_x).astype("int64")
        df["layer"] = df["layer_id"].map(lambda i: self._name(i) or "(model)")
        d = pool_params(df)
        keep = np.array([i in self._collect.get(int(s), set()) for s, i in zip(d["step"], d["layer_id"])], bool)
        d = d[keep] if len(d) else d
        if epoch is not None:
            d = d[d["epoch"] == epoch]
        d = d.rename(columns={"step": "iteration", "abs_mean": "mean_abs"})
        return d[GRAD_COLUMNS].reset_index(drop=True)

    def save_collected_grads(self, ep: int, save_folder: Any = None) -> pd.DataFrame:
        """End the epoch: write the 1.x gradient figures of its iterations and return their numbers.

        Writes into ``save_folder``: ``gradient_flow_ep{ep}.png`` (max and mean |g| per layer over the
        epoch), ``grad_norms_{layer}_ep{ep}.png`` per layer (L1 and L2 per iteration with each epoch's
        mean), ``grad_variance_ep{ep}.png`` (gradient variance per iteration) and ``grads_ep{ep}.csv``.

        Returns:
            :meth:`grad_stats` rows of the epoch just ended.
        """
        folder = self._folder(save_folder)
        self.rec.epoch_end()
        all_rows = self.grad_stats()
        rows = all_rows[all_rows["epoch"] == self._epochs_done]
        self._epochs_done += 1
        rows.to_csv(os.path.join(folder, f"grads_ep{ep}.csv"), index=False)
        if not len(rows):
            warnings.warn(f"save_collected_grads({ep}): no gradients were collected in this epoch", stacklevel=2)
            return rows
        _grad_figures(rows, all_rows, ep, folder, self._name)
        return rows.reset_index(drop=True)

    def visualize_weight_hist(self, layer_inds: Any = None, save_folder: Any = None, bins: int = 64) -> list[str]:
        """Weight histograms per 1.x layer from the trace's weight snapshots: for each parameter the
        last snapshot's histogram and the distribution over time. Returns the PNG paths written."""
        folder = self._folder(save_folder)
        run = self._run()
        paths = []
        for i in self._ids(layer_inds):
            for rid in self.layer_map[i]:
                L = run.layer(rid)
                for q in L["params"]:
                    h = run.weight_histograms(rid, bins=bins, param=q["name"])
                    if not len(h.steps):
                        continue
                    p = os.path.join(folder, f"weights_{i}_{fmt.sanitize(L['name'] + '.' + q['name'])}.png")
                    paths.append(_weight_figure(h, f"{L['name']}.{q['name']}", p))
        if not paths:
            raise ValueError("no weight snapshots recorded yet (run at least one backward_propagation)")
        return paths

    def get_sim(self, x: Any, layer_inds: Any = None, dim: int = 1, sim_method: str = "cosine") -> dict[int, float]:
        """Mean pairwise similarity of one input's intermediate features across ``dim`` (1 = channels),
        per 1.x layer: "cosine" (mean cos over ordered pairs of distinct slices) or "kl_divergence"
        (mean KL(softmax(s_i) || softmax(s_j)), nats); see :func:`analyzer.features.slice_similarity`.
        The forward runs without gradients in the model's current mode (buffers restored).

        Returns:
            {1.x layer id: similarity (float)}.
        """
        from bbdecoder.analyzer.features import slice_similarity
        if sim_method not in ("cosine", "kl_divergence", "kl"):
            raise ValueError(f"sim_method must be 'cosine' or 'kl_divergence', not {sim_method!r}")
        out = {}
        for i in self._ids(layer_inds):
            _, t = layer_output(self.model, x, self.layers[i][2], eval_mode=False)
            out[i] = slice_similarity(t.float().cpu().numpy(), dim, sim_method)
        return out

    def get_inter_features(self, x: Any, layer_inds: Any = None) -> dict[int, np.ndarray]:
        """Capture the intermediate features of the fixed input ``x`` for each 1.x layer into the trace
        (``RUN/features/``, at the current iteration, eval mode) and return them (numpy, (N, C, ...))."""
        import h5py
        out = {}
        for i in self._ids(layer_inds):
            p = capture_features(self.model, x, self.layers[i][2], self.run_dir, step=self.rec.step_index,
                                 epoch=self.rec.epoch, rank=self.rec.rank)
            with h5py.File(p, "r") as f:
                out[i] = np.asarray(f["values"])
        return out

    def compile_feature_evolution(self, layer_ind: int, fps: float = 2, save_folder: Any = None,
                                  channels: Any = None, sample: int = 0) -> str:
        """The evolution of one layer's features (captured by :meth:`get_inter_features`) as an animated
        GIF plus a grid PNG in ``save_folder``. Returns the GIF's path."""
        from bbdecoder.analyzer.features import feature_maps, parse_channels
        from bbdecoder.analyzer.report.plots.features import render_gif, render_grid
        (i,) = self._ids([layer_ind])
        name = self._name(i)
        maps, steps, _ = feature_maps(self.run_dir, name, sample)
        ch = parse_channels(channels, maps.shape[1])
        folder = self._folder(save_folder)
        stem = os.path.join(folder, f"feature_evolution_{fmt.sanitize(name)}")
        render_grid(maps, steps, ch, stem + ".png", layer=name)
        return render_gif(maps, steps, ch, stem + ".gif", fps=fps, layer=name)

    def GradCAM_run(self, layer_ind: int, input: torch.Tensor, target_class: int, save_folder: Any = None,  # noqa: N802,A002
                    method: str = "gradcam") -> np.ndarray:
        """Grad-CAM of ``target_class`` at 1.x layer ``layer_ind`` for ``input`` (B, C, H, W): an
        attention capture into the trace (``RUN/captures/``, :func:`recorder.attention.capture_attention`)
        and the maps computed offline by the analyzer (:meth:`analyzer.Run.attention_maps`), saved as
        ``gradcam_{layer}_{class}.png`` (input, map, overlay per image).

        Returns:
            (B, H, W) float32 maps in [0, 1] at the input's resolution.
        """
        (i,) = self._ids([layer_ind])
        if not isinstance(input, torch.Tensor) or input.ndim != 4:
            raise ValueError("input must be a (B, C, H, W) tensor")
        labels = torch.full((input.shape[0],), int(target_class), dtype=torch.long)
        self.rec.capture_attention([(input, labels)], self.layers[i][2], {"target": int(target_class)})
        maps = self._run().attention_maps("target", method=method, size="image", capture=-1)
        folder = self._folder(save_folder)
        _gradcam_figure(input.detach().float().cpu().numpy(), maps,
                        f"{method} at {self._name(i)}, class {target_class}",
                        os.path.join(folder, f"gradcam_{fmt.sanitize(self._name(i))}_{int(target_class)}.png"))
        return maps

    def threshold_pruning(self, threshold: float, layer_inds: Any = None, permanent: bool = False) -> dict:
        """Prune every weight with |w| <= ``threshold`` (magnitude criterion) in the given 1.x layers.

        The plan is computed from the trace (:meth:`analyzer.Run.pruning_plan`; its expected sparsity
        comes from the last weight snapshot, iteration ``snapshot_step``), written to
        ``save_path/pruning-plan-{threshold}.json`` and applied to the model's current weights with
        torch.nn.utils.prune masks (:func:`recorder.apply_plan`: |w| <= threshold is masked).

        Returns:
            apply_plan's summary (masked counts and fractions per layer, overall, expected) plus
            ``plan`` (path of the plan file) and ``snapshot_step``.
        """
        from bbdecoder.analyzer.trace.plans import write_plan
        from .prune import apply_plan
        rids = sorted(r for i in self._ids(layer_inds) for r in self.layer_map[i])
        if not rids:
            raise ValueError("the selected layers have no parameters to prune")
        run = self._run()
        ws = run.weight_stats(rids)
        if not len(ws):
            raise ValueError("no weight snapshots recorded yet (run at least one backward_propagation)")
        last = int(ws["step"].max())
        plan = run.pruning_plan("magnitude", float(threshold), layers=rids)
        path = os.path.join(self.save_path, f"pruning-plan-{float(threshold):g}.json")
        write_plan(plan, path)
        res = apply_plan(self.model, plan, permanent=permanent)
        res.update(plan=path, snapshot_step=last)
        return res

    def layer_costs(self) -> pd.DataFrame:
        """FLOPs and forward time per 1.x layer from the recorded function graph (recorded on the first
        forward_propagation; before that, on zeros of ``(1, *input_size)``).

        Returns:
            DataFrame: layer_id, layer, type, flops (per forward of the recorded batch), time_s (median
            inclusive forward time, seconds).
        """
        if not os.path.isfile(os.path.join(self.run_dir, fmt.GRAPH_FILE)):
            if self.input_size is None:
                raise ValueError("no forward pass yet and no input_size: cannot record the graph")
            try:
                dev = next(self.model.parameters()).device
            except StopIteration:
                dev = torch.device("cpu")
            self.rec.record_graph(torch.zeros((1, *self.input_size), device=dev))
        import pandas as pd
        from bbdecoder.analyzer.graph import module_frame, read_graph
        m = module_frame(read_graph(self.run_dir)).set_index("name")
        rows = []
        for i, n, mod in self.layers:
            r = m.loc[n] if n in m.index else None
            rows.append({"layer_id": i, "layer": n or "(model)", "type": type(mod).__name__,
                         "flops": int(r["flops"]) if r is not None else 0,
                         "time_s": float(r["time_s"]) if r is not None else float("nan")})
        return pd.DataFrame(rows)

    def close(self) -> None:
        """Close the trace (also done at interpreter exit)."""
        self.rec.close()

    def __enter__(self) -> "Master_analyzer":
        return self

    def __exit__(self, *exc) -> bool:
        self.rec.__exit__(*exc)
        return False


# ---------------------------------------------------------------------- the 1.x figures
def _grad_figures(rows, all_rows, ep: int, folder: str, name_of) -> None:
    """save_collected_grads' figures: gradient flow of the epoch's ``rows``, and per layer the L1/L2
    norms and the variance per iteration over ``all_rows``; ``name_of(1.x id)`` names a layer."""
    from bbdecoder.analyzer.report import plots
    flow = rows.rename(columns={"iteration": "step"})
    fig, axes = plots.new_figure(width=max(6.0, 0.5 * flow["layer_id"].nunique() + 3))
    plots.grad_flow(flow, axes[0, 0], title=f"Gradient flow, epoch {ep}: mean |g| and max |g| per layer")
    plots.save(fig, os.path.join(folder, f"gradient_flow_ep{ep}.png"))
    hist = all_rows.rename(columns={"iteration": "step"})
    for lid, d in hist.groupby("layer_id"):
        fig = plots.figure(8, 6)
        plots.grad_norms(d, fig, title=f"Layer {lid}: {name_of(lid) or '(model)'}")
        plots.save(fig, os.path.join(folder, f"grad_norms_{fmt.sanitize(name_of(lid))}_ep{ep}.png"))
    fig, axes = plots.new_figure()
    ax = axes[0, 0]
    for lid, d in hist.groupby("layer_id"):
        ax.plot(d["step"], d["var"], lw=0.8, label=plots.layer_label(lid, name_of(lid)))
    ax.set_yscale("log") if (hist["var"] > 0).all() else None
    ax.set_xlabel("iteration")
    ax.set_ylabel("gradient variance (squared gradient units)")
    ax.set_title("Gradient variance per iteration")
    ax.legend(fontsize="small")
    plots.save(fig, os.path.join(folder, f"grad_variance_ep{ep}.png"))


def _weight_figure(h, name: str, path: str) -> str:
    """One parameter's last weight histogram beside its distribution over time; returns ``path``."""
    from bbdecoder.analyzer.report import plots
    fig, axes = plots.new_figure(width=11, height=4, ncols=2)
    c = h.counts[-1]
    axes[0, 0].bar(h.edges[:-1], c, width=np.diff(h.edges), align="edge", color="#4c72b0")
    axes[0, 0].set_xlabel("weight value")
    axes[0, 0].set_ylabel("count")
    axes[0, 0].set_title(plots.text(f"{name} at iteration {int(h.steps[-1])}"))
    plots.weight_distribution(h.to_frame(), axes[0, 1])
    return plots.save(fig, path)


def _gradcam_figure(img: np.ndarray, maps: np.ndarray, title: str, path: str) -> None:
    """Input, map and overlay per image: ``img`` (B, C, H, W), ``maps`` (B, H, W) in [0, 1]."""
    from bbdecoder.analyzer.report import plots
    B = img.shape[0]
    fig, axes = plots.new_figure(width=7.5, height=2.5 * B, nrows=B, ncols=3)
    for b in range(B):
        im = img[b].transpose(1, 2, 0)
        im = (im - im.min()) / (np.ptp(im) or 1.0)
        im = im[..., 0] if im.shape[-1] == 1 else im[..., :3]
        axes[b, 0].imshow(im, cmap="gray" if im.ndim == 2 else None)
        axes[b, 1].imshow(maps[b], cmap="jet", vmin=0, vmax=1)
        axes[b, 2].imshow(im, cmap="gray" if im.ndim == 2 else None)
        axes[b, 2].imshow(maps[b], cmap="jet", alpha=0.45, vmin=0, vmax=1)
        for a in axes[b]:
            a.axis("off")
    axes[0, 1].set_title(plots.text(title))
    plots.save(fig, path)
