"""The shipped package holds product code only: no module of `pipeline/` (nor a DAG file) imports
the tests' tools (`tests.support`: throwaway services, fake feed servers), none is a test tool itself,
and the wheel built from the checkout holds `pipeline/` and its metadata, nothing else."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipeline"
TEST_TOOLS = ("testing", "replay", "services", "feeds", "servers", "alert_data", "support")


def imported_modules(source: str) -> set[str]:
    """Absolute module names a file imports (`import a.b`, `from a.b import c`), plus string
    arguments of `importlib.import_module(...)` / `__import__(...)`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            names.add(node.args[0].value)
    return names


def test_imported_modules_sees_every_form_of_import():
    source = (
        "import tests.support.services\nfrom tests.support import feeds\n"
        "import importlib\nimportlib.import_module('tests.support.feeds')\nfrom . import sibling\n"
    )
    assert imported_modules(source) == {"tests.support.services", "tests.support", "importlib",
                                        "tests.support.feeds"}


def test_no_module_of_the_package_imports_the_tests():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path.read_text())
                                            if m.split(".")[0] in ("tests", "support", "conftest"))
        for path in sorted([*PACKAGE.rglob("*.py"), *(ROOT / "dags").glob("*.py")])
    }
    assert len(offenders) > 50  # really walked the package
    assert {path: mods for path, mods in offenders.items() if mods} == {}


def test_the_package_has_no_test_tool_modules():
    found = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*")
             if p.stem in TEST_TOOLS and "__pycache__" not in p.parts]
    assert found == []


@pytest.mark.integration
@pytest.mark.slow
def test_the_wheel_holds_product_code_only(tmp_path):
    """Build the wheel from a copy of the checkout (so no stale build/ folder can add files) and
    list it: `pipeline/` and the dist-info, no tests, no test servers."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "*.h5", "*.keras"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "out"),
                           str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "out").glob("brandmon-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pipeline/cli.py" in names and "pipeline/synthetic/__init__.py" in names  # the demo's source ships
    tops = {n.split("/")[0] for n in names} - {"pipeline"}
    assert len(tops) == 1 and tops.pop().endswith(".dist-info")
    assert [n for n in names if Path(n).stem in TEST_TOOLS or "conftest" in n] == []


def _architecture_tree() -> list[str]:
    """The paths of README's Architecture tree (`pipeline/`, `  sources/<platform>/`, ...), each
    made whole from its indentation."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Architecture", 1)[1].split("```", 2)[1]
    paths: list[str] = []
    stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (stack[-1][1] if stack else "") + name
        stack.append((indent, path if path.endswith("/") else path + "/"))
        paths.append(path)
    return paths


def test_readme_architecture_tree_names_every_package_folder_and_only_real_paths():
    tree = _architecture_tree()
    for path in tree:
        real = path.replace("<platform>/", "mastodon/")
        assert (ROOT / real).exists(), f"README's Architecture tree names {path}, which does not exist"
    named = {p.replace("<platform>/", "") for p in tree}
    for init in sorted(PACKAGE.rglob("__init__.py")):
        folder = init.parent.relative_to(ROOT).as_posix() + "/"
        parent = init.parent.parent.relative_to(ROOT).as_posix() + "/"
        assert folder in named or parent in named and parent.endswith("sources/") or folder == "pipeline/migrations/", (
            f"{folder} has no line in README's Architecture tree")
    assert "pipeline/detector/train.py" in tree and "tests/support/" in tree


def test_tests_is_a_regular_package_that_a_dependencys_tests_folder_cannot_shadow(tmp_path):
    """tf2onnx installs a top-level `tests/` (no `__init__.py`) into site-packages. As a namespace
    package ours would merge with it, and a dependency shipping `tests/__init__.py` would shadow
    it (`python -m tests.support.services` in .ci/run would then fail). Ours is regular, so the
    first `tests` on the path (the checkout, as pytest and `python -m` from the root put it) wins
    even over a regular impostor package later on the path."""
    import tests

    assert Path(tests.__file__).resolve() == ROOT / "tests" / "__init__.py"
    impostor = tmp_path / "site" / "tests"
    (impostor / "support").mkdir(parents=True)
    (impostor / "__init__.py").write_text("")
    (impostor / "support" / "__init__.py").write_text("raise SystemExit('the impostor was imported')\n")
    probe = "import tests.support.services as s, pathlib; print(pathlib.Path(s.__file__).resolve())"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == ROOT / "tests" / "support" / "services.py"
