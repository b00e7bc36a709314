"""One import namespace: the wheel installs only ``unmix``; the command runs from a non-editable install.

Also checks the source itself: no module imports a top-level ``pipeline``/``training``/``eval``, and the
standalone-pipeline example of docs/data.md runs as written.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OLD_NAMES = ("pipeline", "training", "eval")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from this checkout (no build isolation: setuptools comes from the test venv)."""
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("unmix-*.whl")
    return whl


def test_wheel_has_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        files = [line.split(",")[0] for line in zf.read(record).decode().splitlines() if line]
        top_level_txt = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if top_level_txt:
            assert zf.read(top_level_txt[0]).decode().split() == ["unmix"]
    tops = {f.split("/")[0] for f in files if not f.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"unmix"}, tops
    # The three packages and the command are inside it.
    for module in (
        "unmix/__main__.py",
        "unmix/cli.py",
        "unmix/pipeline/loaders.py",
        "unmix/pipeline/shards/manifest.py",  # a subpackage: listed in pyproject's packages
        "unmix/training/loop.py",
        "unmix/eval/linear.py",
    ):
        assert module in files, module
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as zf:
        assert "unmix = unmix.cli:main" in zf.read(entry_points).decode()


def test_non_editable_install_runs(wheel: Path, tmp_path: Path) -> None:
    """Install the wheel into a target dir; run ``python -m unmix`` and the ``unmix`` script from it.

    The dependencies come from this venv (``--no-deps``); the checkout is NOT on ``sys.path``: the
    commands run in an empty directory with the target first on PYTHONPATH.
    """
    target = tmp_path / "target"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "unmix"]
    site = sysconfig.get_paths()["purelib"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), site])}
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()

    for name in OLD_NAMES:  # the installed tree offers no top-level pipeline/training/eval
        probe = subprocess.run(
            [sys.executable, "-c", f"import importlib.util as u; print(u.find_spec({name!r}))"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
        )
        assert probe.stdout.strip() == "None", (name, probe.stdout, probe.stderr)

    helped = subprocess.run(
        [sys.executable, "-m", "unmix", "--help"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0, helped.stderr
    for command in ("shards", "train", "linear", "knn", "compare", "demo", "bench"):
        assert re.search(rf"^\s+{command}\s+\S", helped.stdout, re.M), (command, helped.stdout)
    where = subprocess.run(
        [sys.executable, "-c", "import unmix.pipeline, unmix.cli; print(unmix.pipeline.__file__)"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(target)

    script = target / "bin" / "unmix"
    assert script.is_file()
    version = subprocess.run(
        [sys.executable, str(script), "--version"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == "unmix 0.1.0"


def test_help_lists_every_subcommand_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from unmix.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("shards", "train", "linear", "knn", "compare", "demo", "bench"):
        line = re.search(rf"^\s+{command}\s+(\S.*)$", out, re.M)
        assert line, (command, out)


def test_no_top_level_imports_in_the_source() -> None:
    """Every import of our packages goes through the ``unmix`` namespace (code, tests, scripts, docs)."""
    pattern = re.compile(rf"^\s*(from|import)\s+({'|'.join(OLD_NAMES)})(\.|\s|$)", re.M)
    module_flag = re.compile(rf"-m\s+({'|'.join(OLD_NAMES)})\b")
    offenders = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or "__pycache__" in rel.parts or not path.is_file():
            continue
        if path.suffix not in {".py", ".md", ".sh", ".sbatch", ".yaml", ".toml"}:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in list(pattern.finditer(text)) + list(module_flag.finditer(text)):
            offenders.append(f"{rel}:{text[: m.start()].count(chr(10)) + 1}: {m.group(0).strip()}")
    assert not offenders, "\n".join(offenders)


PACKAGE_DIRS = ("unmix", "pipeline", "training", "eval")
SHARED_NAMES = {"__init__.py", "__main__.py", "cli.py"}  # cli.py: each package registers its own commands


def test_no_two_modules_share_a_name() -> None:
    """A module name says which concept it holds: no ``knn.py`` in two packages (one a re-export), no
    two ``tracking.py`` or ``bench.py`` (benchmarks are named after what they measure)."""
    where: dict[str, list[str]] = {}
    for package in PACKAGE_DIRS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts and path.name not in SHARED_NAMES:
                where.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert where["knn.py"] == ["training/knn.py"]  # the scan sees the packages
    shared = {name: paths for name, paths in where.items() if len(paths) > 1}
    assert not shared, shared


def _docs_block(page: str, heading: str) -> str:
    text = (ROOT / page).read_text(encoding="utf-8")
    section = text.split(f"## {heading}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_standalone_pipeline_example_runs(tmp_path: Path) -> None:
    """The "Using the data pipeline on its own" example of docs/data.md, executed as written."""
    code = _docs_block("docs/data.md", "Using the data pipeline on its own")
    assert "from unmix.pipeline import" in code
    # Appended: which of our modules the example imported (the pipeline alone, not training or eval).
    probe = "\nimport sys\nprint('modules', sorted(m for m in sys.modules if m.startswith('unmix.')))\n"
    proc = subprocess.run(
        [sys.executable, "-c", code + probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = int(re.search(r"^(\d+) steps per epoch$", proc.stdout, re.M).group(1))
    left = int(re.search(r"^(\d+) steps left in the epoch$", proc.stdout, re.M).group(1))
    assert left == steps - 3  # three batches consumed before the state was taken
    assert re.search(r"^\d+ val images$", proc.stdout, re.M)
    modules = re.search(r"^modules (.*)$", proc.stdout, re.M).group(1)
    assert "unmix.pipeline" in modules
    assert "unmix.training" not in modules and "unmix.eval" not in modules, modules


def test_every_import_of_our_modules_resolves() -> None:
    """Imports inside functions (lazy, so that the CLI stays cheap) run only when their command does: a
    module that moved leaves them pointing nowhere without any other test noticing. Every ``import
    unmix.x`` / ``from unmix.x import y`` anywhere in the packages must name a module that exists (and,
    for ``from``, a name or submodule it provides)."""
    import ast
    import importlib
    import importlib.util

    broken = []
    for package in PACKAGE_DIRS:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.level == 0
                    and (node.module or "").startswith("unmix")
                ):
                    targets = [(node.module, a.name) for a in node.names]
                elif isinstance(node, ast.Import):
                    targets = [(a.name, None) for a in node.names if a.name.startswith("unmix")]
                else:
                    continue
                for module, name in targets:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    if importlib.util.find_spec(module) is None:
                        broken.append(f"{where}: no module {module}")
                    elif name is not None and name != "*":
                        if importlib.util.find_spec(f"{module}.{name}") if _is_package(module) else None:
                            continue
                        if not hasattr(importlib.import_module(module), name):
                            broken.append(f"{where}: {module} has no {name}")
    assert not broken, "\n".join(broken)


def _is_package(module: str) -> bool:
    import importlib.util

    spec = importlib.util.find_spec(module)
    return spec is not None and spec.submodule_search_locations is not None
