"""Files of a trace opened as untrusted data: regular files inside the run only, bounded strict JSON
(issue 16, item 1, for JSON files and the files the catalogue, captures and features open)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import helpers
from bbdecoder import analyzer
from bbdecoder.analyzer.trace import files
from bbdecoder.analyzer.trace.format import TraceError
from helpers import record_tiny


def _write(p, text):
    p.write_text(text)
    return p


@pytest.mark.parametrize("text,words", [
    ('{"a": 1, "a": 2}', "duplicate key 'a'"),
    ('{"a": NaN}', "non-finite number NaN"),
    ('{"a": -Infinity}', "non-finite number -Infinity"),
    ('{"a": ' + "[" * 100 + "]" * 100 + "}", "nested deeper than 64"),
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 64"),
    ("[1, 2]", "expected a JSON object"),
    ('{"a": 1', "malformed"),
    (b"\xff\xfe{}", "cannot read"),
])
def test_read_json_refuses_what_is_not_strict_bounded_json(tmp_path, text, words):
    p = tmp_path / "x.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(TraceError, match=words.replace("[", r"\[")):
        files.read_json(p, "test file")


def test_read_json_reads_at_most_its_bound(tmp_path):
    p = _write(tmp_path / "big.json", json.dumps({"pad": "x" * 5000}))
    assert files.read_json(p, "f")["pad"] == "x" * 5000
    with pytest.raises(TraceError, match="larger than 1,000 bytes"):
        files.read_json(p, "f", max_bytes=1000)


def test_written_json_is_strict(tmp_path):
    p = tmp_path / "m.json"
    files.write_json_atomic(p, {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert files.read_json(p, "m") == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_files_must_be_regular_and_inside_the_root(tmp_path):
    root = tmp_path / "run"
    root.mkdir()
    good = _write(root / "a.json", "{}")
    outside = _write(tmp_path / "secret.json", '{"secret": 1}')
    assert files.read_json(good, "a", root=root) == {}
    (root / "out.json").symlink_to(outside)
    with pytest.raises(TraceError, match="leads outside the run"):
        files.read_json(root / "out.json", "b", root=root)
    (root / "in.json").symlink_to(good)
    with pytest.raises(TraceError, match="is a symbolic link"):
        files.read_json(root / "in.json", "c", root=root)
    assert files.check_trace_file(root / "in.json", root, "c", allow_links=True) == str(root / "in.json")
    os.mkfifo(root / "fifo.json")
    with pytest.raises(TraceError, match="not a regular file"):
        files.read_json(root / "fifo.json", "d", root=root)
    (root / "dir.json").mkdir()
    with pytest.raises(TraceError, match="not a regular file"):
        files.read_json(root / "dir.json", "e", root=root)
    # the run directory itself may be reached through a link
    (tmp_path / "alias").symlink_to(root)
    assert files.read_json(tmp_path / "alias" / "a.json", "a", root=tmp_path / "alias") == {}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("files") / "run"
    record_tiny(str(run), epochs=1, steps_per_epoch=3, flush_steps=2)
    return run


def _opened(run):
    """Open ``run`` in a child process with a time limit: a reader that blocks fails the test
    instead of hanging it."""
    code = textwrap.dedent(f"""
        import sys
        from bbdecoder import analyzer
        from bbdecoder.analyzer.trace.format import TraceError
        try:
            analyzer.open({str(run)!r}).grad_stats()
        except TraceError as e:
            print("TRACEERROR", e)
            sys.exit(3)
        print("OPENED")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=helpers.ROOT)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("case,words", [
    ("manifest_fifo", "not a regular file"),
    ("manifest_dev_zero", "leads outside the run"),
    ("rank_json_fifo", "not a regular file"),
    ("shard_outside", "leads outside the run"),
    ("shard_fifo", "not a regular file"),
])
def test_hostile_files_in_a_run_are_refused_without_blocking(small_run, tmp_path, case, words):
    run = tmp_path / "copy"
    shutil.copytree(small_run, run)
    rank = run / "rank-00000"
    if case == "manifest_fifo":
        (run / "manifest.json").unlink()
        os.mkfifo(run / "manifest.json")
    elif case == "manifest_dev_zero":
        (run / "manifest.json").unlink()
        (run / "manifest.json").symlink_to("/dev/zero")
    elif case == "rank_json_fifo":
        (rank / "rank.json").unlink()
        os.mkfifo(rank / "rank.json")
    elif case == "shard_outside":
        shard = rank / "shard-000000.h5"
        shutil.move(shard, tmp_path / "elsewhere.h5")
        shard.symlink_to(tmp_path / "elsewhere.h5")
    elif case == "shard_fifo":
        (rank / "shard-000000.h5").unlink()
        os.mkfifo(rank / "shard-000000.h5")
    code, out = _opened(run)
    assert code == 3 and "TRACEERROR" in out and words in out, out[-2000:]


def test_an_ordinary_run_still_opens(small_run):
    assert _opened(small_run)[0] == 0
    assert len(analyzer.open(small_run).steps) == 3
