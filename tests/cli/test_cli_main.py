"""analyzer/cli/main.py: the --out wording of the library's output-directory errors, the terminal
progress factory, and the one place where the commands register."""

import os

import pytest

from bbdecoder.analyzer import progress
from bbdecoder.analyzer.cli import COMMANDS, cli
from bbdecoder.analyzer.cli.main import UsageProblem, out_dir, out_errors, terminal_progress
from bbdecoder.analyzer.outdir import prepare_out_dir


def test_out_dir_words_every_library_error_for_the_option(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("y")
    cases = [
        (str(f), None, f"--out {f} exists and is not a directory"),
        (str(full), False, f"--out {full} is not empty; pass --force to write into it"),
        (str(f / "sub"), None, f"cannot create --out {f / 'sub'}: "),
    ]
    for out, force, want in cases:
        with pytest.raises(UsageProblem) as e:
            out_dir(out, force)
        assert str(e.value).startswith(want), (str(e.value), want)
    assert out_dir(str(full)) == str(full) and out_dir(str(full), True) == str(full)
    assert out_dir(str(tmp_path / "new"), False) == str(tmp_path / "new") and (tmp_path / "new").is_dir()


def test_out_dir_not_writable(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:   # root writes anywhere: report the directory as not writable instead
        import bbdecoder.analyzer.outdir as outdir
        real = os.access
        monkeypatch.setattr(outdir.os, "access", lambda p, mode: False if str(p) == str(ro) else real(p, mode))
    try:
        with pytest.raises(UsageProblem, match=f"^--out {ro} is not writable$"):
            out_dir(str(ro))
    finally:
        ro.chmod(0o700)


def test_out_errors_rewords_library_calls_and_passes_the_rest(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("y")
    with pytest.raises(UsageProblem, match="pass --force"):
        with out_errors(str(full)):
            prepare_out_dir(str(full), False)      # e.g. inside graph.render
    with pytest.raises(FileExistsError, match="^something else$"):
        with out_errors(str(full)):
            raise FileExistsError("something else")
    with pytest.raises(ValueError, match="^other$"):
        with out_errors(str(full)):
            raise ValueError("other")


def test_terminal_progress_off_a_tty_is_the_null_progress():
    bar = terminal_progress("x", 10)
    assert bar is progress.null_progress("x", 10)
    with bar as b:
        b.update(3)


def test_commands_register_in_one_place():
    assert sorted(cli.commands) == sorted(c.name for c in COMMANDS) == [
        "attention-iou", "check", "compare", "dead", "demo", "features", "graph", "info", "layers", "prune",
        "report", "saturation"]


def test_graph_words_a_missing_graphviz_for_the_engine_option(tmp_path, capsys, monkeypatch):
    import shutil
    import types

    import helpers
    from bbdecoder.analyzer.cli import graph as graph_cli
    from bbdecoder.analyzer.report import graph_files

    def render(run_dir, out, force=False, engine="auto"):
        raise FileNotFoundError("Graphviz 'dot' is not on PATH")

    monkeypatch.setattr(graph_cli, "open_run", lambda path: types.SimpleNamespace(path=path))
    monkeypatch.setattr(graph_files, "render", render)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = tmp_path / "out"
    code, o, err = helpers.run_cli(["graph", str(tmp_path), "--out", str(out), "--engine", "dot"], capsys)
    assert (code, o, err) == (2, "", "bbdecoder: error: Graphviz 'dot' is not on PATH (use --engine matplotlib)\n")
    assert not out.exists()
