"""Each HDF5 object of a shard is checked once per unchanged file (issue 17 item 3, speed), and the
checks of issue 16 still refuse a hostile file: a shard changed after its checks were remembered
(an external link, a virtual dataset, external storage, a declared size the file does not store)
is checked again and refused before any read."""

import shutil

import h5py
import numpy as np
import pytest

from helpers import record_tiny, shard_path, unflatten_snapshots

from bbdecoder import analyzer
from bbdecoder.analyzer.trace import h5read
from bbdecoder.analyzer.trace.format import TraceError
from bbdecoder.analyzer.trace.hdf5 import HDF5ShardReader


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("verdicts") / "run"
    record_tiny(str(run), epochs=1, steps_per_epoch=3, weights_every=1, flush_steps=3)
    assert unflatten_snapshots(run) > 0      # one group per tensor: an object per payload to check
    return run


@pytest.fixture
def run(base_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(base_run, d)
    h5read.forget_verdicts()
    return d


@pytest.fixture
def counted(monkeypatch):
    """Counts the storage checks made by shard readers."""
    n = [0]
    real = h5read.storage_problem

    def storage_problem(ds, **kw):
        n[0] += 1
        return real(ds, **kw)
    monkeypatch.setattr(h5read, "storage_problem", storage_problem)
    return n


def _weights(path):
    with h5py.File(path, "r") as f:
        lk = sorted(f["weights"])[0]
        pk = sorted(f["weights"][lk])[0]
    return lk, pk


def test_objects_are_checked_once_per_unchanged_file(run, counted):
    r = analyzer.open(run)
    ws = r.weight_stats()
    first = counted[0]
    n_payloads = sum(len(s.payloads) for s in r.catalog.shards)
    assert first >= n_payloads     # every payload's datasets checked by the scan
    counted[0] = 0
    r2 = analyzer.open(run)        # a new catalogue, new readers: nothing of the payloads checked again
    ws2 = r2.weight_stats()
    assert counted[0] <= 5 * len(r2.catalog.shards)   # the step table's columns only
    assert ws2.equals(ws)


def _external_link(g, data, tmp):
    with h5py.File(tmp / "outside.h5", "w") as o:
        o["secret"] = np.full_like(data, 7.0)
    g["values"] = h5py.ExternalLink(str(tmp / "outside.h5"), "/secret")


def _soft_link(g, data, tmp):
    g["elsewhere"] = data
    g["values"] = h5py.SoftLink(g.name + "/elsewhere")


def _virtual(g, data, tmp):
    with h5py.File(tmp / "outside.h5", "w") as o:
        o["secret"] = np.full_like(data, 7.0)
    layout = h5py.VirtualLayout(shape=data.shape, dtype=data.dtype)
    layout[...] = h5py.VirtualSource(str(tmp / "outside.h5"), "secret", shape=data.shape)
    g.create_virtual_dataset("values", layout)


def _external_storage(g, data, tmp):
    raw = tmp / "outside.raw"
    raw.write_bytes(np.full_like(data, 7.0).tobytes())
    g.create_dataset("values", shape=data.shape, dtype=data.dtype, external=[(str(raw), 0, h5py.h5f.UNLIMITED)])


def _absurd(g, data, tmp):
    g.create_dataset("values", shape=(len(data), 1 << 40), dtype="f4", chunks=(1, 1 << 20))


@pytest.mark.parametrize("how,words", [(_external_link, "ExternalLink"), (_soft_link, "SoftLink"),
                                       (_virtual, "a virtual dataset"), (_external_storage, "external storage"),
                                       (_absurd, "absurd size")])
def test_a_file_changed_after_its_checks_is_checked_again(run, tmp_path, counted, how, words):
    r = analyzer.open(run)
    r.weight_stats()               # every object checked and the verdicts remembered
    path = shard_path(run, 0)
    lk, pk = _weights(path)
    with h5py.File(path, "r+") as f:
        g = f["weights"][lk][pk]
        data = g["values"][()]
        del g["values"]
        how(g, data, tmp_path)
    counted[0] = 0
    with pytest.raises(TraceError, match=words):
        analyzer.open(run).weight_stats()
    # a reader of the changed file alone refuses it too, before reading a value
    rd = HDF5ShardReader(str(path), "shard-000000.h5")
    try:
        with pytest.raises(TraceError, match=words):
            rd.read_payload("weights", lk, pk, 0, 1)
    finally:
        rd.close()


def test_verdicts_are_per_file_identity(run):
    path = str(shard_path(run, 0))
    lk, pk = _weights(path)
    rd = HDF5ShardReader(path)
    rd.read_payload("weights", lk, pk, 0, 1)
    rd.close()
    ident = [k for k, v in h5read.verdicts().items() if f"/weights/{lk}/{pk}/values" in v]
    assert len(ident) == 1
    with open(path, "rb") as fh:
        assert h5read.file_identity(fh.fileno()) == ident[0]
    h5read.forget_verdicts()
    assert h5read.verdicts() == {}
    h5read.add_verdicts({ident[0]: {"x"}})
    assert h5read.verdicts() == {ident[0]: {"x"}}
