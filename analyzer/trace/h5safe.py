"""Reading an HDF5 file of a trace, which may come from a stranger: hard links only, data inside
the file only, no filter plugins loaded from disk, and a dataset's declared size, chunks and
compressed chunks bounded by what the file stores (:func:`storage_problem`) before any read. Used
by every HDF5 reader of the trace (shards, captures, feature captures)."""

from __future__ import annotations

from .format import TraceError


def foreign_storage(ds) -> str | None:
    """Why dataset ``ds`` keeps its data outside its own file ("a virtual dataset", "external
    storage"), or None: such data could come from anywhere, so a trace reader refuses it."""
    if ds.is_virtual:
        return "a virtual dataset"
    if ds.external:
        return "external storage"
    return None


def hard_child(group, name: str):
    """``group[name]`` if ``name`` is a hard link in ``group`` (None if absent); TraceError for a
    soft or external link, which could lead to another object or another file."""
    from h5py import h5l
    try:   # one C call for the link's type (h5py's get(getlink=True) first tests membership: two)
        kind = group.id.links.get_info(name.encode("utf-8")).type
    except Exception:
        if name not in group:
            return None
        raise
    if kind != h5l.TYPE_HARD:
        what = {h5l.TYPE_SOFT: "SoftLink", h5l.TYPE_EXTERNAL: "ExternalLink"}.get(kind, "UserDefinedLink")
        raise TraceError(f"{name!r} is a {what} (links to other objects or files are refused in a trace)")
    return group[name]


def no_filter_plugins() -> None:
    """Empty HDF5's filter-plugin search path (for this process): a dataset of a trace that names an
    unknown filter fails to read instead of making HDF5 load code from a plugin directory. Filters
    registered in-process (h5py's own, hdf5plugin's) keep working."""
    from h5py import h5pl
    try:
        while h5pl.size():
            h5pl.remove(0)
    except Exception:   # an HDF5 without the plugin interface: nothing to empty
        pass


#: filters a trace may use: (HDF5 filter id -> (name, the most one stored byte can expand to)).
#: Anything else (szip, n-bit, scale-offset, a plugin) is refused before a read.
FILTERS = {1: ("gzip", 1032), 2: ("shuffle", 1), 3: ("fletcher32", 1), 32000: ("lzf", 100)}
#: the largest chunk (uncompressed bytes) a reader decompresses at once
MAX_CHUNK_BYTES = 64 << 20
#: a compressed chunk is read only when even its worst-case expansion (deflate: 1032 bytes per
#: stored byte) stays under this many bytes: HDF5's decompressors grow their buffer past the
#: chunk's nominal size, so the nominal size alone bounds nothing
MAX_EXPANDED_CHUNK = 512 << 20


def _filters(ds) -> list[int]:
    pl = ds.id.get_create_plist()
    return [int(pl.get_filter(i)[0]) for i in range(pl.get_nfilters())]


def _chunk_sizes(ds) -> list[int]:
    """Stored (compressed) bytes of every allocated chunk, in one pass over the chunk index."""
    sizes: list[int] = []
    if hasattr(ds.id, "chunk_iter"):
        ds.id.chunk_iter(lambda info: sizes.append(int(info.size)))
    else:   # an older HDF5: one lookup per chunk
        sizes = [int(ds.id.get_chunk_info(i).size) for i in range(int(ds.id.get_num_chunks()))]
    return sizes


def storage_problem(ds, dense: bool = True, max_ratio: float = 1000.0, slack: int = 64 << 20) -> str | None:
    """Why reading dataset ``ds`` could cost far more memory or time than the bytes its file stores
    (None: it cannot). Checked from the layout only, before any data is read; one pass over the
    chunk index, so the check itself is linear in the chunks stored.

    Refused: a numeric dtype other than bool/int/uint/float (compound, string, object, ...); data
    in other files (:func:`foreign_storage`); a filter not in :data:`FILTERS`; a chunk larger than
    :data:`MAX_CHUNK_BYTES`; a compressed chunk whose stored bytes exceed its nominal size (plus
    0.4 % and 1 KiB: what deflate and lzf add at worst) or whose worst-case expansion exceeds
    :data:`MAX_EXPANDED_CHUNK`; and a declared size not backed by stored bytes: with ``dense`` (every element written, as for captures and feature
    captures) an unfiltered dataset must store at least its declared bytes and a filtered one at
    least 1/(the filters' expansion bound); otherwise the declared bytes may exceed ``slack`` only
    up to ``max_ratio`` times the stored bytes.

    Args:
        ds: an h5py Dataset. dense: the writer writes every element (no fill values).
        max_ratio, slack: the bound for sparse datasets (declared bytes per stored byte, and the
            declared bytes accepted whatever is stored).

    Returns:
        a few words naming the problem, or None.
    """
    kind, itemsize = ds.dtype.kind, int(ds.dtype.itemsize)
    if kind not in "biuf" or ds.dtype.fields is not None or ds.dtype.subdtype is not None:
        return f"holds {ds.dtype}, not plain numbers"
    foreign = foreign_storage(ds)
    if foreign:
        return f"keeps its data in other files ({foreign})"
    declared = int(ds.size) * itemsize
    stored = int(ds.id.get_storage_size())
    expand = 1
    for code in _filters(ds):
        if code not in FILTERS:
            return f"uses HDF5 filter {code}, not one a trace may use ({', '.join(n for n, _ in FILTERS.values())})"
        expand = max(expand, FILTERS[code][1])
    if ds.chunks is not None:
        nominal = itemsize
        for c in ds.chunks:
            nominal *= int(c)
        if nominal > MAX_CHUNK_BYTES:
            return f"has chunks of {nominal:,} bytes (at most {MAX_CHUNK_BYTES:,})"
        if expand > 1:
            limit = min(nominal + nominal // 256 + 1024, MAX_EXPANDED_CHUNK // expand)
            big = max(_chunk_sizes(ds), default=0)
            if big > limit:
                return (f"has a compressed chunk of {big:,} bytes for {nominal:,} bytes of data "
                        f"(a decompression bomb; at most {limit:,})")
    if dense:
        if declared > stored * expand:
            return f"declares {tuple(ds.shape)} ({declared:,} bytes) but stores {stored:,} bytes"
    elif declared > slack and declared > max_ratio * stored:
        return f"declares an absurd size {tuple(ds.shape)} ({declared:,} bytes) but stores {stored:,} bytes"
    return None


def check_storage(ds, what: str, dense: bool = True) -> None:
    """:func:`storage_problem` as a TraceError naming ``what`` (e.g. "capture c.h5: dataset 'logits'")."""
    try:
        why = storage_problem(ds, dense=dense)
    except TraceError:
        raise
    except Exception as e:   # an unreadable layout
        raise TraceError(f"{what}: unreadable layout ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if why:
        raise TraceError(f"{what} {why}, refused in a trace")
