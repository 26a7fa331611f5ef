"""The report's sections, registered here and nowhere else.

A section is a module with ``add(rep)``: it reads what it needs from ``rep.run`` and ``rep.data``
(:class:`analyzer.report.data.Frames`), writes its tables with ``rep.table(name, df, description)``,
queues its figures with ``rep.figure(name, title, caption_html, draw, group, layer=None)`` and skips,
with a reason, whatever the trace lacks (``rep.skip(item, reason)``). A new section is a new module
added to :data:`SECTIONS`; a new figure group of the page is a line of :data:`GROUPS`.
"""

from __future__ import annotations

from . import activations, attention, detail, findings, gradients, loss, modules, nonfinite, overview, tables, weights

#: the sections, in the order they run (their tables and figures are listed in this order; the page
#: groups the figures by :data:`GROUPS`): the sections whose figures draw longest first, so that they
#: are drawn while the findings and activation sections compute (:class:`analyzer.report.figures.Drawing`);
#: the detail section right after the findings (by default its layers are those a finding points at),
#: so that its many figures are drawn while the tables and the activation sections compute
SECTIONS = (overview, loss, gradients, weights, findings, detail, tables, activations, attention, modules,
            nonfinite)

#: the page's figure groups in page order: (group, heading, intro_html(summary) or None)
GROUPS = (("overview", "Overview: every layer", overview.intro_html), ("loss", "Loss", None),
          ("gradients", "Gradients", None), ("weights", "Weights", None),
          ("activations", "Activations", activations.intro_html), ("attention", "Attention-IoU", None),
          ("modules", "Modules: FLOPs and time", modules.intro_html), ("layers", "Per layer", None))

__all__ = ["SECTIONS", "GROUPS"]
