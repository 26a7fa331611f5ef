"""The rooms and the arrows of docs/architecture.md, checked on the source (AST) and in subprocesses.

Each rule of issue 13 that a program can check is one test here; a failure names the file and line.
"""

import ast
import os
import re
import subprocess
import sys

import pytest

import helpers

ROOT = helpers.ROOT
#: package folder -> its import name
PACKAGES = {"analyzer": "bbdecoder.analyzer", "recorder": "bbdecoder.recorder", "bbdecoder": "bbdecoder"}
HEAVY = ("pandas", "matplotlib", "seaborn", "scipy", "click")
MAX_MODULE_LINES = 550
MAX_CLASS_LINES = 320


def _sources():
    """(relative path, dotted module name, ast) of every library module."""
    out = []
    for folder, pkg in PACKAGES.items():
        base = os.path.join(ROOT, folder)
        for dp, dns, fs in os.walk(base):
            dns[:] = [d for d in dns if not d.startswith((".", "__"))]
            for f in sorted(fs):
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dp, f)
                rel = os.path.relpath(path, ROOT)
                parts = os.path.relpath(path, base)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                mod = ".".join([pkg] + parts)
                with open(path, encoding="utf-8") as fh:
                    out.append((rel, mod, ast.parse(fh.read(), rel)))
    return out


SOURCES = _sources()


def _is_package(rel: str) -> bool:
    return rel.endswith("__init__.py")


def _imports(rel: str, mod: str, tree) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module imported, names imported from it) for every import in a module."""
    pkg = mod if _is_package(rel) else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append((node.lineno, a.name, []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            out.append((node.lineno, target, names))
            # `from . import x` imports the module pkg.x
            for n in names:
                out.append((node.lineno, f"{target}.{n}", []))
    return out


def _top(name: str) -> str:
    return name.split(".")[0]


def test_every_library_module_is_found():
    mods = {m for _, m, _ in SOURCES}
    assert {"bbdecoder", "bbdecoder.analyzer", "bbdecoder.analyzer.trace", "bbdecoder.analyzer.catalog",
            "bbdecoder.recorder"} <= mods


# ---------------------------------------------------------------------------------------- rule 1
def test_trace_imports_only_itself_stdlib_numpy_h5py():
    bad = []
    for rel, mod, tree in SOURCES:
        if not mod.startswith("bbdecoder.analyzer.trace"):
            continue
        for line, target, _ in _imports(rel, mod, tree):
            if _top(target) in HEAVY + ("torch",):
                bad.append(f"{rel}:{line} imports {target}")
            elif target.startswith("bbdecoder") and not (target.startswith("bbdecoder.analyzer.trace")
                                                       or target == "bbdecoder.analyzer"):
                bad.append(f"{rel}:{line} imports {target}")
    assert bad == []


def test_analyzer_never_imports_torch_and_recorder_imports_only_the_trace():
    bad = []
    bridges = ("bbdecoder.recorder.compat", "bbdecoder.recorder.demo")
    for rel, mod, tree in SOURCES:
        for line, target, _ in _imports(rel, mod, tree):
            if mod.startswith("bbdecoder.analyzer") and _top(target) == "torch":
                bad.append(f"{rel}:{line} imports {target}")
            if (mod.startswith("bbdecoder.analyzer") and target.startswith("bbdecoder.recorder")
                    and not (mod.startswith("bbdecoder.analyzer.cli") and target.startswith(bridges))):
                bad.append(f"{rel}:{line} imports {target}")   # `bbdecoder demo` runs the demo bridge
            if (mod.startswith("bbdecoder.recorder") and mod not in bridges
                    and target.startswith("bbdecoder.analyzer") and not target.startswith("bbdecoder.analyzer.trace")
                    and target != "bbdecoder.analyzer"):
                bad.append(f"{rel}:{line} imports {target}")
    assert bad == []


def test_bridges_import_the_analysis_stack_only_inside_functions():
    """recorder/compat.py and recorder/demo.py reach the analyzer lazily, so importing them is cheap."""
    bad = []
    for rel, mod, tree in SOURCES:
        if mod not in ("bbdecoder.recorder.compat", "bbdecoder.recorder.demo"):
            continue
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for line, target, _ in _imports(rel, mod, ast.Module(body=[node], type_ignores=[])):
                    if _top(target) in HEAVY or (target.startswith("bbdecoder.analyzer")
                                                 and not target.startswith("bbdecoder.analyzer.trace")):
                        bad.append(f"{rel}:{line} imports {target} at module level")
    assert bad == []


# ---------------------------------------------------------------------------------------- rule 2
def _loaded_after(code: str) -> list[str]:
    probe = (f"import sys\n{code}\n"
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY + ('torch',))!r}))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return eval(r.stdout.strip().splitlines()[-1])  # a printed list of names


def test_import_recorder_loads_no_analysis_stack():
    assert _loaded_after("import bbdecoder.recorder") == ["torch"]
    assert _loaded_after("from bbdecoder import Recorder") == ["torch"]


def test_import_analyzer_and_trace_are_cheap():
    assert _loaded_after("import bbdecoder, bbdecoder.analyzer, bbdecoder.analyzer.trace.format, "
                         "bbdecoder.analyzer.trace.shards, bbdecoder.analyzer.trace.series") == []


def test_the_common_names_resolve():
    code = ("import bbdecoder\n"
            "from bbdecoder import Recorder, Master_analyzer, open, Run, TraceError\n"
            "from bbdecoder.recorder import Recorder as R2\n"
            "from bbdecoder.analyzer import open as o2\n"
            "assert Recorder is R2 and open is o2 and Master_analyzer.__name__ == 'Master_analyzer'\n"
            "assert bbdecoder.__version__\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 0, r.stderr[-2000:]


# ---------------------------------------------------------------------------------------- rule 3
def test_nothing_imports_the_cli_and_the_report_imports_no_click():
    bad = []
    for rel, mod, tree in SOURCES:
        in_cli = mod.startswith("bbdecoder.analyzer.cli")
        for line, target, _ in _imports(rel, mod, tree):
            if not in_cli and target.startswith("bbdecoder.analyzer.cli") and mod != "bbdecoder.analyzer":
                bad.append(f"{rel}:{line} imports {target}")
            if not in_cli and _top(target) == "click":
                bad.append(f"{rel}:{line} imports click")
    assert bad == []


_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def test_library_errors_name_no_cli_option():
    """A library raise never says '--out': the CLI words messages for its options."""
    bad = []
    for rel, mod, tree in SOURCES:
        if mod.startswith("bbdecoder.analyzer.cli"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for sub in ast.walk(node.exc):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and _OPTION.search(sub.value):
                        bad.append(f"{rel}:{node.lineno}: {sub.value!r}")
    assert bad == []


# ---------------------------------------------------------------------------------------- rule 4
def test_no_private_names_cross_modules():
    bad = []
    for rel, mod, tree in SOURCES:
        module_aliases = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                module_aliases |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                module_aliases |= {a.asname or a.name for a in node.names}
        for line, target, names in _imports(rel, mod, tree):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{rel}:{line} imports {n} from {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                v = node.value
                if isinstance(v, ast.Name) and (v.id in module_aliases or v.id == "run"):
                    bad.append(f"{rel}:{node.lineno} reads {v.id}.{node.attr}")
                elif isinstance(v, ast.Attribute) and v.attr in ("run", "catalog"):
                    bad.append(f"{rel}:{node.lineno} reads .{v.attr}.{node.attr}")
    # numpy/scipy/h5py's own underscore APIs that a library must use are not ours to rename
    allowed = ("scipy._lib", "h5py._hl", "torch._", "np._", "h5py.h5", "sys._")
    bad = [b for b in bad if not any(a in b for a in allowed)]
    assert bad == []


# ---------------------------------------------------------------------------------------- rule 5
def test_one_atomic_write_and_one_progress_protocol():
    bad = []
    for rel, mod, tree in SOURCES:
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr in ("replace", "rename")
                    and isinstance(node.value, ast.Name) and node.value.id == "os"
                    and mod != "bbdecoder.analyzer.trace.files"):
                bad.append(f"{rel}:{node.lineno} os.{node.attr} outside trace/files.py")
            if isinstance(node, ast.ClassDef) and mod != "bbdecoder.analyzer.progress":
                meths = {b.name for b in node.body if isinstance(b, ast.FunctionDef)}
                if {"__enter__", "__exit__", "update"} <= meths:
                    body = next(b for b in node.body if isinstance(b, ast.FunctionDef) and b.name == "update")
                    if all(isinstance(s, (ast.Pass, ast.Expr)) for s in body.body):
                        bad.append(f"{rel}:{node.lineno} class {node.name} is another do-nothing progress")
    assert bad == []


# ---------------------------------------------------------------------------------------- rule 6
def test_report_html_comes_from_a_template():
    tdir = os.path.join(ROOT, "analyzer", "report")
    assert os.path.isfile(os.path.join(tdir, "template.html"))
    bad = []
    for rel, mod, tree in SOURCES:
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.search(
                    r"<(html|head|body)\b", node.value, re.I):
                bad.append(f"{rel}:{node.lineno}")
    assert bad == []


# ---------------------------------------------------------------------------------------- rule 7
def test_tests_mirror_the_packages():
    tests = helpers.TESTS
    top = sorted(f for f in os.listdir(tests) if f.endswith(".py"))
    assert set(top) <= {"conftest.py", "helpers.py", "transformer_models.py", "test_architecture.py", "test_packaging.py"}, top
    dirs = sorted(d for d in os.listdir(tests) if os.path.isdir(os.path.join(tests, d)) and not d.startswith(("_", ".")))
    assert set(dirs) <= {"trace", "recorder", "analyzer", "report", "cli"}, dirs
    names, copies = {}, []
    for dp, _, fs in os.walk(tests):
        for f in fs:
            if f.startswith("test_") and f.endswith(".py"):
                assert f not in names, f"{f} in {dp} and {names[f]}"
                names[f] = dp
                src = open(os.path.join(dp, f), encoding="utf-8").read()
                if re.search(r"^def _cli\(", src, re.M):
                    copies.append(f)
    assert copies == []


# ---------------------------------------------------------------------------------------- rule 8
def test_modules_and_classes_stay_small():
    bad = []
    for rel, mod, tree in SOURCES:
        n = len(open(os.path.join(ROOT, rel), encoding="utf-8").read().splitlines())
        if n > MAX_MODULE_LINES:
            bad.append(f"{rel}: {n} lines")
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    bad.append(f"{rel}:{node.lineno} class {node.name}: {size} lines")
    assert bad == []


@pytest.mark.parametrize("folder", ["analyzer", "recorder"])
def test_public_functions_have_docstrings(folder):
    missing = []
    for rel, mod, tree in SOURCES:
        if not rel.startswith(folder):
            continue
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if not ast.get_docstring(node) and not (isinstance(node, ast.FunctionDef) and node.decorator_list):
                    missing.append(f"{rel}:{node.lineno} {node.name}")
    # a budget, not a free pass: the count may only go down
    assert len(missing) <= 60, missing


def test_tests_and_scripts_import_the_installed_names_only():
    """`import analyzer` from the repository root would load a second copy of every module under
    another name (and pass tests that a user's install would fail): everything says bbdecoder."""
    bad = []
    pat = re.compile(r"(^|\\n|[\"';]\s*)\s*(from|import) (analyzer|recorder)\b", re.M)
    for folder in ("tests", "scripts"):
        for dp, _, fs in os.walk(os.path.join(ROOT, folder)):
            for f in fs:
                if f.endswith(".py"):
                    src = open(os.path.join(dp, f), encoding="utf-8").read()
                    bad += [f"{folder}/{f}: {m.group(0).strip()!r}" for m in pat.finditer(src)]
    assert bad == []


def test_every_cli_line_goes_through_the_escaping_echo():
    """Names in a trace come from strangers: the CLI prints only through main.echo (terminal_safe)."""
    bad = []
    for rel, mod, tree in SOURCES:
        if not mod.startswith("bbdecoder.analyzer.cli") or mod == "bbdecoder.analyzer.cli.main":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("echo", "secho") and \
                    isinstance(node.value, ast.Name) and node.value.id == "click":
                bad.append(f"{rel}:{node.lineno} click.{node.attr}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                bad.append(f"{rel}:{node.lineno} print")
    assert bad == []
