"""HDF5 files of a trace read as untrusted data: hard links only, no data in other files (virtual
datasets, external storage), no filter plugins searched (issue 16, item 1, HDF5 part)."""

import shutil

import h5py
import numpy as np
import pytest

from bbdecoder import analyzer
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.trace.format import TraceError
from bbdecoder.analyzer.trace.h5safe import no_filter_plugins
from helpers import record_tiny


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("h5safe") / "run"
    record_tiny(str(run), epochs=1, steps_per_epoch=2, grads_every=1, weights_every=1)
    return run


def _tamper(small_run, tmp_path, how):
    """A copy of the run whose first shard's raw 'weights' values (flat: of every parameter; else of one) (or one step-table
    column) are replaced by ``how(group, name, data, outside_file)``; returns (run, data)."""
    run = tmp_path / "copy"
    shutil.copytree(small_run, run)
    outside = tmp_path / "outside.h5"
    with h5py.File(run / "rank-00000" / "shard-000000.h5", "r+") as f:
        if fmt.FLAT_GROUP in f:   # flat snapshots (the default): every weight of the step in one dataset
            g = f[fmt.FLAT_GROUP][fmt.KIND_WEIGHTS]["0"]
        else:
            lk = sorted(f[fmt.KIND_WEIGHTS])[0]
            g = f[fmt.KIND_WEIGHTS][lk][sorted(f[fmt.KIND_WEIGHTS][lk])[0]]
        data = g["values"][()]
        with h5py.File(outside, "w") as o:
            o["secret"] = np.full_like(data, 7.0)
        del g["values"]
        how(g, "values", data, str(outside))
    return run, data


def _external_link(g, name, data, outside):
    g[name] = h5py.ExternalLink(outside, "/secret")


def _soft_link(g, name, data, outside):
    g["elsewhere"] = data
    g[name] = h5py.SoftLink(g.name + "/elsewhere")


def _virtual(g, name, data, outside):
    layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
    layout[...] = h5py.VirtualSource(outside, "secret", shape=data.shape)
    g.create_virtual_dataset(name, layout)


def _external_storage(g, name, data, outside):
    raw = outside + ".raw"
    with open(raw, "wb") as f:
        f.write(np.full_like(data, 7.0).tobytes())
    g.create_dataset(name, shape=data.shape, dtype=data.dtype, external=[(raw, 0, h5py.h5f.UNLIMITED)])


@pytest.mark.parametrize("how,words", [(_external_link, "ExternalLink"), (_soft_link, "SoftLink"),
                                       (_virtual, "a virtual dataset"), (_external_storage, "external storage")])
def test_data_from_elsewhere_is_refused(small_run, tmp_path, how, words):
    run, _ = _tamper(small_run, tmp_path, how)
    with pytest.raises(TraceError, match=words):
        r = analyzer.open(run)
        r.weight_stats()
    # the untampered run reads, and a value of 7 (the outside file's) never appears
    ws = analyzer.open(small_run).weight_stats()
    assert len(ws) and not (ws["max"] == 7.0).any()


def test_no_filter_plugin_directory_is_searched():
    from h5py import h5pl
    h5pl.append(b"/tmp/bbdecoder-test-plugins")
    assert h5pl.size() >= 1
    no_filter_plugins()
    assert h5pl.size() == 0
