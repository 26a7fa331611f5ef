"""What several sections share."""

from __future__ import annotations

from ...trace import format as fmt


def file_key(L) -> str:
    """The layer's key for file names (already filesystem-safe; checked again, never trusted).

    Args:
        L: a layer record (row of the layer table) with ``key`` and ``id``.

    Returns:
        ``L.key``, or ``"layer-<id>"`` when the key is missing or unsafe.
    """
    k = getattr(L, "key", None)
    return k if fmt.is_safe_key(k) and k not in (".", "..") else f"layer-{int(L.id)}"
