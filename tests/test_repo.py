"""Repository-wide checks: lint, the one-way import layering, and that every CLI command is wired."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("backbones", "losses", "data", "eval")


def test_ruff_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _imported_top_level(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", LIBRARIES)
def test_libraries_never_import_the_engine(package):
    """Data flows one way: run.py -> facerec -> {backbones, losses, data, eval}."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / package).rglob("*.py"))
        if "facerec" in _imported_top_level(path)
    ]
    assert not offenders, f"{package} must not import facerec: {offenders}"


def test_every_command_has_help():
    from facerec.cli import COMMANDS, build_parser

    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0


def test_run_py_help_runs():
    result = subprocess.run([sys.executable, "run.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "verify" in result.stdout


def test_packaging_lists_every_package_and_the_console_script():
    """``pip install .`` ships the five packages (and their subpackages) and a ``facerec`` command that
    is ``python run.py``; the dependencies are requirements.txt's."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    on_disk = sorted(
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("facerec", *LIBRARIES)
        for init in (ROOT / top).rglob("__init__.py")
    )
    assert sorted(project["tool"]["setuptools"]["packages"]) == on_disk
    assert {"facerec", *LIBRARIES} <= set(on_disk)
    assert project["project"]["scripts"] == {"facerec": "facerec.cli:main"}
    from facerec import cli

    assert cli.main is __import__("run").main
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    assert "torch" in (ROOT / "requirements.txt").read_text()


def test_benchmarks_are_modules_that_neither_edit_sys_path_nor_import_tests():
    """Benchmarks run as ``python -m benchmarks.<name>`` from the repository root."""
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        source = path.read_text()
        assert "sys.path" not in source, f"{path.name} edits sys.path"
        assert "tests" not in _imported_top_level(path), f"{path.name} imports from tests/"


@pytest.mark.parametrize("tests_pass", [True, False])
def test_ci_script_removes_its_venv(tmp_path, tests_pass):
    """.ci/run builds a fresh venv (about 6 GB) in a temporary folder and removes it on exit, passing or
    failing: left behind, a handful of CI runs filled the disk. A stand-in python3 makes a venv whose pip
    and python only record their calls."""
    fake_bin, scratch = tmp_path / "bin", tmp_path / "tmp"
    fake_bin.mkdir()
    scratch.mkdir()
    calls, tool = tmp_path / "calls.txt", tmp_path / "tool"
    tool.write_text(f'#!/bin/sh\necho "$0 $*" >> {calls}\nexit {0 if tests_pass else 3}\n')
    tool.chmod(0o755)
    (fake_bin / "python3").write_text(  # python3 -m venv DIR
        f'#!/bin/sh\nmkdir -p "$3/bin" && cp {tool} "$3/bin/pip" && cp {tool} "$3/bin/python"\n')
    (fake_bin / "python3").chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "TMPDIR": str(scratch), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True)
    assert done.returncode == (0 if tests_pass else 3), done.stderr
    assert "-m pytest -q" in calls.read_text() or not tests_pass
    assert list(scratch.iterdir()) == []
