"""Output only inside --out (issue 16, items 3 and 9): a --out that is a symbolic link or holds one where
outputs go is refused, --force never writes through a link, a non-empty --out needs --force, and a
lock keeps a second writer out while one writes (the cross-process cases: test_hostile_traces)."""

import fcntl
import os

import pytest

from bbdecoder.analyzer.outdir import LOCK_NAME, OutputBusyError, OutputDirError, out_lock, prepare_out_dir
from bbdecoder.analyzer.trace import files
from bbdecoder.analyzer.trace import format as fmt
from helpers import run_cli, tree_snapshot


def graph_json(n=3):
    """A valid n-op chain graph (as recorder/graph.py writes it)."""
    nodes = [{"id": i, "op": "relu", "module": "", "inputs": [[2, 4]], "outputs": [[2, 4]], "params": [],
              "flops": 8} for i in range(n)]
    return {"format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "kind": fmt.GRAPH_KIND, "nodes": nodes,
            "edges": [{"src": i, "dst": i + 1} for i in range(n - 1)],
            "modules": [{"name": "", "type": "M", "depth": 0, "calls": 1, "flops": 8 * n}]}


@pytest.fixture
def graph_run(tmp_path):
    """A run of nothing but a manifest and a 3-op graph.json (no torch, no shards)."""
    run = tmp_path / "run"
    run.mkdir()
    files.write_json_atomic(run / fmt.MANIFEST, {"format": fmt.FORMAT_NAME, "format_version": 1, "layers": [],
                                                 "status": "complete"})
    files.write_json_atomic(run / fmt.GRAPH_FILE, graph_json())
    return run


def _graph(run, out, capsys, *extra):
    return run_cli(["graph", str(run), "--out", str(out), "--engine", "matplotlib", *extra], capsys)


def test_a_symlinked_out_is_refused(graph_run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / "out")
    code, _, err = _graph(graph_run, tmp_path / "out", capsys, "--force")
    assert code == 2 and err == f"bbdecoder: error: --out {tmp_path / 'out'} is a symbolic link (outputs are " \
                                "written only into a real directory)\n"
    assert os.listdir(elsewhere) == []


def test_force_never_writes_through_a_planted_link(graph_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.csv"
    victim.write_text("precious\n")
    os.symlink(victim, out / "ops.csv")
    before = tree_snapshot(tmp_path)
    code, _, err = _graph(graph_run, out, capsys, "--force")
    assert code == 2 and "holds a symbolic link where outputs go (ops.csv)" in err and len(err.splitlines()) == 1
    assert victim.read_text() == "precious\n" and tree_snapshot(tmp_path) == before


def test_a_non_empty_out_needs_force_and_then_writes(graph_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep\n")
    code, _, err = _graph(graph_run, out, capsys)
    assert (code, err) == (2, f"bbdecoder: error: --out {out} is not empty; pass --force to write into it\n")
    code, o, err = _graph(graph_run, out, capsys, "--force")
    assert code == 0, err
    ops = (out / "ops.csv").read_text().strip().splitlines()
    assert len(ops) == 1 + len(graph_json()["nodes"])            # header + one row per node
    assert (out / "mine.txt").read_text() == "keep\n" and not (out / LOCK_NAME).exists()


def test_a_locked_out_is_refused_with_one_line(graph_run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK_NAME, os.O_CREAT | os.O_RDWR)     # another writer: its own open file
    try:
        os.write(fd, b"4242")
        fcntl.flock(fd, fcntl.LOCK_EX)
        code, _, err = _graph(graph_run, out, capsys, "--force")
        assert (code, err) == (2, f"bbdecoder: error: --out {out} is being written by another bbdecoder command "
                                  "(process 4242); wait for it to finish or choose another directory\n")
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    finally:
        os.close(fd)
    os.unlink(out / LOCK_NAME)
    code, _, err = _graph(graph_run, out, capsys)
    assert code == 0, err
    assert not (out / LOCK_NAME).exists()


def test_out_lock_is_reentrant_and_leaves_no_file(tmp_path):
    with out_lock(tmp_path) as p:
        assert os.listdir(tmp_path) == [LOCK_NAME] and open(os.path.join(p, LOCK_NAME)).read() == str(os.getpid())
        with out_lock(tmp_path):                      # the same process: a library call inside a command
            pass
        fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):      # still held after the inner exit
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    assert os.listdir(tmp_path) == []


def test_busy_error_is_an_output_dir_error(tmp_path):
    fd = os.open(tmp_path / LOCK_NAME, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(OutputBusyError, match="being written by another"):
            with out_lock(tmp_path):
                pass
    finally:
        os.close(fd)
    assert issubclass(OutputBusyError, OutputDirError)


def test_links_in_output_subdirectories_are_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    (out / "tables").mkdir(parents=True)
    os.symlink(elsewhere, out / "figures")
    with pytest.raises(OutputDirError, match=r"symbolic link where outputs go \(figures\)"):
        prepare_out_dir(out, None, ("figures", "tables"))
    os.unlink(out / "figures")
    os.symlink(elsewhere / "x.png", out / "tables" / "t.csv")
    with pytest.raises(OutputDirError, match=r"\(tables/t.csv\)"):
        prepare_out_dir(out, None, ("figures", "tables"))
    os.unlink(out / "tables" / "t.csv")
    assert prepare_out_dir(out, None, ("figures", "tables")) == str(out) and (out / "figures").is_dir()
    assert os.listdir(elsewhere) == []
