"""Installing the package: one top-level name, `bbdecoder`, in a fresh virtual environment."""

import os
import shutil
import subprocess
import sys
import tomllib

import pytest

import helpers

ROOT = helpers.ROOT


def _declared():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def test_every_package_folder_is_declared():
    """Each folder holding an __init__.py is a declared package, mapped under bbdecoder."""
    st = _declared()
    dirs = st["package-dir"]
    want = set()
    for top, pkg in (("bbdecoder", "bbdecoder"), ("recorder", "bbdecoder.recorder"), ("analyzer", "bbdecoder.analyzer")):
        assert dirs[pkg] == top
        for dp, dns, fs in os.walk(os.path.join(ROOT, top)):
            dns[:] = [d for d in dns if not d.startswith((".", "__"))]
            if "__init__.py" in fs:
                rel = os.path.relpath(dp, os.path.join(ROOT, top))
                want.add(pkg if rel == "." else pkg + "." + rel.replace(os.sep, "."))
    assert set(st["packages"]) == want


@pytest.mark.skipif(not shutil.which("git"), reason="needs git to list the tracked and new files")
def test_fresh_install_puts_only_bbdecoder_at_the_top_level(tmp_path):
    # a copy of the source as a user would download it (no .venv, no build leftovers)
    src = tmp_path / "src"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    for rel in listed:
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(src / os.path.dirname(rel), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), src / rel)
    # a regular wheel, built offline with this environment's setuptools
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(dist), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    wheels = os.listdir(dist)
    assert len(wheels) == 1 and wheels[0].startswith("bbdecoder-"), wheels
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    py = str(env / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    before = set(os.listdir(site))
    r = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(dist / wheels[0])],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    new = sorted(set(os.listdir(site)) - before)
    assert len(new) == 2 and new[0] == "bbdecoder" and new[1].startswith("bbdecoder-") \
        and new[1].endswith(".dist-info"), new
    pkg = os.path.join(site, "bbdecoder")
    for rel in ("recorder/recorder.py", "analyzer/trace/format.py", "analyzer/catalog.py", "analyzer/run.py",
                "analyzer/report/template.html", "analyzer/cli/main.py"):
        assert os.path.isfile(os.path.join(pkg, rel)), rel
    # every source module of the checkout is installed (nothing left behind by a missing package entry)
    for top in ("recorder", "analyzer"):
        for dp, dns, fs in os.walk(os.path.join(ROOT, top)):
            dns[:] = [d for d in dns if not d.startswith((".", "__"))]
            for f in fs:
                if f.endswith((".py", ".html")):
                    rel = os.path.relpath(os.path.join(dp, f), ROOT)
                    assert os.path.isfile(os.path.join(pkg, rel)), f"{rel} not installed"
    assert os.path.isfile(env / "bin" / "bbdecoder")
    # the lazy top level imports without any dependency installed, and names what it offers
    r = subprocess.run([py, "-c", "import bbdecoder; print(bbdecoder.__version__, 'Recorder' in dir(bbdecoder))"],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["2.0.0.dev0", "True"], r.stderr[-2000:]
