"""The ``unmix.pipeline.shards`` package: its public names, what reading a manifest loads, and the import
rules between its modules and the rest of unmix (readers import only the manifest module; no cycles)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import unmix.pipeline.shards as shards

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "pipeline" / "shards"


def _imports(path: Path) -> set[str]:
    """The ``unmix.*`` modules a file imports (any scope), as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("unmix."))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unmix."):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


@pytest.mark.parametrize("name", shards.__all__)
def test_every_public_name_resolves_to_its_home(name: str):
    value = getattr(shards, name)
    home = importlib.import_module(value.__module__)
    assert getattr(home, name) is value and home.__name__.startswith("unmix.pipeline.shards.")


def test_the_documented_import_works():
    from unmix.pipeline.shards import read_manifest, verify_shards, write_shards
    from unmix.pipeline.shards.manifest import read_manifest as from_manifest
    from unmix.pipeline.shards.verify import verify_shards as from_verify
    from unmix.pipeline.shards.writer import write_shards as from_writer

    assert (read_manifest, verify_shards, write_shards) == (from_manifest, from_verify, from_writer)
    with pytest.raises(AttributeError, match="no attribute 'shard_verify'"):
        _ = shards.shard_verify


def test_reading_a_manifest_loads_neither_the_writer_nor_the_verifier():
    code = (
        "import sys\n"
        "from unmix.pipeline.shards import read_manifest, check_shard_set\n"
        "print(sorted(m for m in sys.modules if m.startswith(('unmix.', 'PIL', 'numpy', 'nvidia'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = eval(proc.stdout)  # a list of module names
    assert loaded == ["unmix.pipeline", "unmix.pipeline.shards", "unmix.pipeline.shards.manifest"], loaded


def test_readers_outside_the_tool_import_only_the_manifest_module():
    """The loaders, training and evaluation read shard sets through ``shards.manifest`` alone; the
    benchmarks and the demo may also write the built-in samples (``shards.sample``), and the benchmarks'
    independent reference readers may split tar member names by the WebDataset rule
    (``shards.dali_index``, standard library only)."""
    readers = [
        ROOT / "pipeline" / "loaders.py",
        *(ROOT / "training").rglob("*.py"),
        *(ROOT / "eval").rglob("*.py"),
    ]
    offenders = []
    for path in readers:
        allowed = {"unmix.pipeline.shards.manifest"}
        if path.name.startswith("bench") or path.name == "demo.py":
            allowed.add("unmix.pipeline.shards.sample")
        if path.name.startswith("bench"):
            allowed.add("unmix.pipeline.shards.dali_index")
        for module in _imports(path):
            if module.startswith("unmix.pipeline.shards") and not any(
                module == a or module.startswith(a + ".") for a in allowed
            ):
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert not offenders, "\n".join(offenders)


def test_no_import_cycle_between_the_shard_modules():
    graph = {}
    for path in PACKAGE.glob("*.py"):
        if path.name == "__init__.py":
            continue
        deps = {m.split(".")[3] for m in _imports(path) if m.startswith("unmix.pipeline.shards.")}
        graph[path.stem] = {d for d in deps if (PACKAGE / f"{d}.py").is_file()} - {path.stem}
    assert "manifest" in graph and not graph["manifest"]  # the readers' module depends on no other

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        assert node not in stack, "import cycle: " + " -> ".join([*stack, node])
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, [*stack, node], done)
        done.add(node)

    done: set[str] = set()
    for node in sorted(graph):
        visit(node, [], done)
