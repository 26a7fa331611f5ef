"""Values from a trace made safe to show: terminal escapes, CSV formulas, strict keys and file names."""

import csv
import json
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from bbdecoder.analyzer.trace import captures as tc
from bbdecoder.analyzer.trace import format as fmt
from bbdecoder.analyzer.values import csv_safe, csv_safe_cell, json_safe, terminal_safe
from bbdecoder.recorder import Recorder
from helpers import run_cli

ESC, BEL, CSI8 = "\x1b", "\x07", "\x9b"


def test_terminal_safe_escapes_what_a_terminal_would_act_on():
    s = f"a{ESC}]0;title{BEL}b\r{ESC}[2Jc\x7f{CSI8}d\u202eevil\u2066e"
    out = terminal_safe(s)
    assert out == "a\\x1b]0;title\\x07b\\x0d\\x1b[2Jc\\x7f\\x9bd\\u202eevil\\u2066e"
    assert all(ord(ch) >= 0x20 and not 0x7F <= ord(ch) < 0xA0 for ch in out)
    # text, tabs, newlines and ordinary unicode stay as they are
    assert terminal_safe("layer.0\tconv\nÄ → µ 名") == "layer.0\tconv\nÄ → µ 名"
    assert terminal_safe(3.5) == "3.5"


@pytest.mark.parametrize("cell,want", [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+1", "'+1"), ("-1+2", "'-1+2"),
    ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"),
    ("features.0", "features.0"), ("", ""), ("a=b", "a=b"), (-1.5, -1.5), (None, None)])
def test_csv_cells_follow_owasp(cell, want):
    assert csv_safe_cell(cell) == want


def test_csv_safe_leaves_numbers_and_the_original_alone():
    df = pd.DataFrame({"layer": ["=cmd", "ok", "-x"], "value": [-1.0, 2.0, -3.0], "n": [1, 2, 3]})
    out = csv_safe(df)
    assert out["layer"].tolist() == ["'=cmd", "ok", "'-x"]
    assert out["value"].tolist() == [-1.0, 2.0, -3.0] and out["n"].tolist() == [1, 2, 3]
    assert df["layer"].tolist() == ["=cmd", "ok", "-x"]          # a copy: the caller's frame is untouched
    num = pd.DataFrame({"a": [1.0]})
    assert csv_safe(num) is num


def test_keys_and_file_names_end_at_the_end():
    """`$` also matches before a trailing newline: keys and names are matched with \\Z."""
    assert fmt.is_safe_key("abc") and not fmt.is_safe_key("abc\n")
    assert fmt.parse_shard_filename("shard-000001.h5") == 1
    assert fmt.parse_shard_filename("shard-000001.h5\n") is None
    assert fmt.parse_rank_dirname("rank-00000\n") is None
    assert tc.parse_capture_filename("capture-000002.h5\n") is None


def test_json_safe_output_is_strict():
    d = json_safe({"a": float("-inf"), "b": np.float32(np.nan), "c": [np.int64(3), np.inf]})
    assert json.loads(json.dumps(d, allow_nan=False)) == {"a": None, "b": None, "c": [3, None]}


HOSTILE = "=HYPERLINK(\"http://x\")" + ESC + "]0;pwned" + BEL + ESC + "[2J"


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    """A recorded run whose last layer is named with a spreadsheet formula and terminal escapes."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([("fc", nn.Linear(4, 6)), ("act", nn.ReLU()), (HOSTILE, nn.Linear(6, 2))]))
    run = str(tmp_path_factory.mktemp("hostile") / "run")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, run, grads_every=1, weights_every=2) as rec:
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(torch.randn(8, 4)), torch.randint(0, 2, (8,)))
            opt.zero_grad()
            loss.backward()
            rec.step(loss=loss)
            opt.step()
    return run


def test_cli_prints_no_terminal_control_from_names(hostile_run, capsys):
    for argv in (["layers", hostile_run], ["info", hostile_run]):
        code, out, err = run_cli(argv, capsys)
        assert code == 0, err
        assert ESC not in out + err and BEL not in out + err
    code, out, _ = run_cli(["layers", hostile_run], capsys)
    assert "=HYPERLINK" in out and "\\x1b]0;pwned\\x07" in out       # shown, escaped
    code, out, _ = run_cli(["info", hostile_run, "--json"], capsys)
    assert code == 0 and json.loads(out)["layers"] == 2               # JSON stays JSON (control chars \u-escaped)


def test_report_tables_neutralise_formulas(hostile_run, tmp_path, capsys):
    out = tmp_path / "rep"
    code, _, err = run_cli(["report", hostile_run, "--out", str(out)], capsys)
    assert code == 0, err
    cells = []
    for t in (out / "tables").glob("*.csv"):
        with open(t, newline="", encoding="utf-8") as f:
            cells += [c for row in csv.reader(f) for c in row]
    named = [c for c in cells if "HYPERLINK(" in c]                  # the layer's name (its key is sanitised)
    whole = [c for c in named if c.startswith("'=HYPERLINK")]           # a cell that is the name: neutralised
    assert len(whole) > 10                                           # elsewhere (a finding's message) it is mid-text
    assert all(c.startswith("'=HYPERLINK") or not c.lstrip().startswith(("=", "+", "-", "@")) for c in named)
    assert not any(c.startswith(("=", "+", "@")) for c in cells)
    summary = json.loads((out / "summary.json").read_text())
    assert HOSTILE in [L["name"] for L in summary["layers"]]          # the data itself is unchanged
