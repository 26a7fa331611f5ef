"""Open a BBDecoder HTML report in headless Chromium as a person would, and check it (issue 17, item 4).

For every ``*.html`` page of the report directory (index.html first), the page is loaded in an iframe of a
small harness page (written to a temporary folder, never into the report) at a fixed width, and checked:

* every ``<img>`` loaded (``complete`` and ``naturalWidth > 0``): no broken figure;
* nothing overflows the page width (``scrollWidth <= clientWidth`` of the document);
* no script error (Chromium's console log has no ``Uncaught`` line for the page).

With ``--screenshot`` a full-height screenshot of each page is kept under ``REPORT/screenshots/`` for a
person to look at. Chromium comes from Debian (``apt-get install -y chromium``); without it the script
says so and exits 3.

Usage::

    python scripts/check_report_browser.py REPORT_DIR [--screenshot] [--width 1280]

Exit status: 0 all pages pass, 1 a check failed (each failure printed), 2 bad arguments, 3 no browser.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars")

HARNESS = """<!doctype html><html><body style="margin:0">
<iframe id="f" src="{src}" style="width:{width}px;height:900px;border:0"></iframe>
<pre id="result">pending</pre>
<script>
const f = document.getElementById('f');
f.addEventListener('load', () => {{
  let r;
  try {{
    const d = f.contentDocument, e = d.documentElement;
    const imgs = Array.from(d.images);
    r = {{title: d.title, images: imgs.length,
         broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
         scrollWidth: e.scrollWidth, clientWidth: e.clientWidth, scrollHeight: e.scrollHeight}};
  }} catch (err) {{ r = {{error: String(err)}}; }}
  document.getElementById('result').textContent = JSON.stringify(r);
}});
</script></body></html>
"""


def find_browser() -> str | None:
    """Path of a Chromium-family browser on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def file_url(path: Path) -> str:
    """``file://`` URL of an absolute path, percent-quoted."""
    return "file://" + quote(str(path.resolve()))


def _chromium(browser: str, profile: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [browser, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def check_page(browser: str, page: Path, width: int, work: str, timeout: float = 60.0) -> dict:
    """Load ``page`` in the harness and return its measurements plus ``script_errors`` (list of str)."""
    harness = Path(work) / "harness.html"
    harness.write_text(HARNESS.format(src=file_url(page), width=width), encoding="utf-8")
    p = _chromium(browser, os.path.join(work, "profile"),
                  ["--allow-file-access-from-files", "--virtual-time-budget=10000", "--enable-logging=stderr",
                   "--v=0", "--dump-dom", file_url(harness)], timeout)
    m = re.search(r'<pre id="result">(.*?)</pre>', p.stdout, re.S)
    if not m or m.group(1) == "pending":
        return {"error": f"the page did not load (browser exit {p.returncode})"}
    res = json.loads(m.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&"))
    page_url = file_url(page)
    res["script_errors"] = [ln.strip() for ln in p.stderr.splitlines()
                            if "Uncaught" in ln and page_url in ln]
    return res


def failures(res: dict) -> list[str]:
    """Human-readable failed checks of one page's measurements (empty: the page passes)."""
    if "error" in res:
        return [res["error"]]
    out = [f"broken image: {src}" for src in res["broken"]]
    if res["scrollWidth"] > res["clientWidth"]:
        out.append(f"overflows the page width: {res['scrollWidth']} px > {res['clientWidth']} px")
    out += [f"script error: {e}" for e in res["script_errors"]]
    return out


def screenshot(browser: str, page: Path, dest: Path, width: int, height: int, work: str,
               timeout: float = 60.0) -> None:
    """Full-height PNG of ``page`` at ``width`` x ``height`` CSS px (height capped at 16,000)."""
    dest.parent.mkdir(exist_ok=True)
    _chromium(browser, os.path.join(work, "profile"),
              [f"--window-size={width},{min(max(height, 600), 16000)}", f"--screenshot={dest}",
               file_url(page)], timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", type=Path, help="a report directory (holding index.html)")
    ap.add_argument("--screenshot", action="store_true", help="keep screenshots under REPORT/screenshots/")
    ap.add_argument("--width", type=int, default=1280, help="page width in CSS px (default 1280)")
    a = ap.parse_args(argv)
    if not (a.report / "index.html").is_file() or not 320 <= a.width <= 4000:
        print(f"error: {a.report} holds no index.html, or --width is outside 320..4000", file=sys.stderr)
        return 2
    browser = find_browser()
    if browser is None:
        print("error: no Chromium on PATH (apt-get install -y chromium)", file=sys.stderr)
        return 3
    pages = sorted(a.report.glob("*.html"), key=lambda p: (p.name != "index.html", p.name))
    bad = 0
    with tempfile.TemporaryDirectory(prefix="bbd-browser-") as work:
        for page in pages:
            res = check_page(browser, page, a.width, work)
            fails = failures(res)
            bad += bool(fails)
            print(f"{page.name}: {res.get('images', 0)} images, width {res.get('scrollWidth')}/"
                  f"{res.get('clientWidth')} px, {'OK' if not fails else 'FAILED'}")
            for f in fails:
                print(f"  {f}")
            if a.screenshot and "error" not in res:
                dest = a.report / "screenshots" / (page.stem + ".png")
                screenshot(browser, page, dest, a.width, res["scrollHeight"], work)
                print(f"  screenshot: {dest}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
