"""Tooltips over a figure without scripts: the picture in a box, and over it one transparent band per
row of a heatmap whose ``title`` is the row's full name (the browser shows it on hover).

The bands are placed in percent of the picture, so they stay on their rows however the page scales
the image (an HTML ``<map>`` has pixel coordinates of the unscaled picture: wrong on a narrower
page). Where the rows are is known before the figure is drawn: the overview heatmaps are laid out
with fixed margins (:func:`analyzer.report.plots.overview.heatmap_layout`,
:func:`~analyzer.report.plots.overview.row_areas`). Style: ``.tips`` and ``.tip`` in report.css.
"""

from __future__ import annotations

import html
import math
from typing import Iterable


def _pct(v) -> str:
    """A percentage for a style attribute: a finite float clipped to [0, 100], 3 decimals."""
    x = float(v)
    return f"{min(100.0, max(0.0, x)) if math.isfinite(x) else 0.0:.3f}%"


def areas_html(img_html: str, areas: Iterable[dict]) -> str:
    """``img_html`` (an ``<img>`` built from escaped parts) with a tooltip band over each area.

    Args:
        img_html: the picture's element.
        areas: {"top", "height", "left", "width" (percent of the picture), "title" (plain text, escaped
            here)} per band; none: ``img_html`` unchanged.

    Returns:
        HTML: a ``span.tips`` holding the picture and one ``span.tip`` per area.
    """
    areas = list(areas)
    if not areas:
        return img_html
    bands = "".join(
        f'<span class="tip" style="top:{_pct(a["top"])};height:{_pct(a["height"])};left:{_pct(a["left"])};'
        f'width:{_pct(a["width"])}" title="{html.escape(str(a["title"]), quote=True)}"></span>' for a in areas)
    return f'<span class="tips">{img_html}{bands}</span>'


__all__ = ["areas_html"]
