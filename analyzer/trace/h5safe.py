"""Reading an HDF5 file of a trace, which may come from a stranger: hard links only, data inside
the file only, no filter plugins loaded from disk. Used by every HDF5 reader of the trace (shards,
captures, feature captures)."""

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
    import h5py
    link = group.get(name, getlink=True)
    if link is None:
        return None
    if not isinstance(link, h5py.HardLink):
        raise TraceError(f"{name!r} is a {type(link).__name__} (links to other objects or files are refused "
                         "in a trace)")
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
