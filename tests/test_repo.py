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
