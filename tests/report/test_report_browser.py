"""The HTML report opened in headless Chromium as a person would (issue 17, item 4), through
scripts/check_report_browser.py: every figure loads, nothing overflows the page width, no script
error; and the same checks catch a planted broken image, a too-wide element and a script error."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import helpers
from bbdecoder import analyzer
from bbdecoder.analyzer.report import build_report

SCRIPT = f"{helpers.ROOT}/scripts/check_report_browser.py"
BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on PATH (apt-get install -y chromium)")


def _check(report, *extra):
    p = subprocess.run([sys.executable, SCRIPT, str(report), *extra], capture_output=True, text=True, timeout=180)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    helpers.record_tiny(tmp / "run", activations=True)
    out = tmp / "report"
    out.mkdir()
    summary = build_report(analyzer.open(str(tmp / "run")), str(out), detail="all")
    return out, summary


def test_report_loads_in_chromium_with_every_figure(report):
    out, summary = report
    code, text = _check(out, "--screenshot")
    assert code == 0, text
    n_index = int(text.split("index.html: ")[1].split(" images")[0])
    n_detail = int(text.split("layers.html: ")[1].split(" images")[0])
    per_layer = [f for f in summary["figures"] if f.startswith(("figures/grad_norms_", "figures/weight_dist_"))]
    assert n_detail == len(per_layer) > 0                # every figure the summary lists is on a page
    assert n_index + n_detail == len(summary["figures"])
    assert (out / "screenshots" / "layers.png").is_file()
    png = (out / "screenshots" / "index.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(png[16:20], "big")
    assert width == 1280


def test_planted_faults_are_caught(report, tmp_path):
    out, _ = report
    bad = tmp_path / "bad"
    shutil.copytree(out, bad, ignore=shutil.ignore_patterns("screenshots"))
    html = (bad / "index.html").read_text(encoding="utf-8")
    first = html.index('src="') + len('src="')
    name = html[first:html.index('"', first)]
    (bad / name).unlink()                                  # a figure gone missing
    html = html.replace("</body>", '<div style="width:3000px">wide</div><script>no_such_name()</script></body>')
    (bad / "index.html").write_text(html, encoding="utf-8")
    code, text = _check(bad)
    assert code == 1
    assert f"broken image: {name}" in text
    assert "overflows the page width" in text
    assert "no_such_name is not defined" in text
